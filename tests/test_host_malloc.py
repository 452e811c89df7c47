"""glibc malloc settings applied on import (t5x_like.host_malloc)."""

import os
import subprocess
import sys
import textwrap

import pytest

from t5x_like import host_malloc


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"T5X_LIKE_MALLOC": "on", "JAX_PLATFORMS": "cuda"}, True),
        ({"T5X_LIKE_MALLOC": "off", "JAX_PLATFORMS": "cpu"}, False),
        ({"T5X_LIKE_MALLOC": " Off "}, False),
        ({"JAX_PLATFORMS": "cpu"}, False),  # opt-in: off unless asked
        ({"T5X_LIKE_MALLOC": "auto", "JAX_PLATFORMS": "cpu"}, True),
        ({"T5X_LIKE_MALLOC": "auto", "JAX_PLATFORMS": "cuda,cpu"}, False),
        ({"T5X_LIKE_MALLOC": "auto", "JAX_PLATFORMS": "tpu"}, False),
    ],
)
def test_wanted_follows_the_switch_and_the_platform(env, expected):
    assert host_malloc.wanted(env) is expected


def test_bad_switch_names_the_variable():
    with pytest.raises(ValueError, match="T5X_LIKE_MALLOC='yes' is not one of auto, on, off"):
        host_malloc.wanted({"T5X_LIKE_MALLOC": "yes"})


# Malloc, touch and free a 32 MB block five times; count the page faults of the last four.
# With glibc's defaults each round maps fresh pages (8192 faults at 4 KB); with the settings
# the freed block stays in the heap and is reused without faults.
_FAULTS = textwrap.dedent("""
    import ctypes, resource, t5x_like
    from t5x_like import host_malloc
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 32 << 20
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(host_malloc.applied, sum(faults[1:]))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
@pytest.mark.parametrize("switch", ["on", "off"])
def test_import_applies_the_settings_before_anything_allocates(switch):
    env = dict(os.environ, T5X_LIKE_MALLOC=switch)
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    applied, faults = out[0] == "True", int(out[1])
    if switch == "on":
        assert applied and faults < 100, faults
    else:
        assert not applied and faults >= 4 * 4096, faults


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_importing_after_jax_started_warns_and_says_what_to_do():
    code = "import jax; jax.devices(); import t5x_like; print(t5x_like.host_malloc.applied)"
    env = dict(os.environ, T5X_LIKE_MALLOC="on", JAX_PLATFORMS="cpu")
    env.pop("MALLOC_ARENA_MAX", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False"]
    assert "imported after jax started its CPU client" in done.stderr
    assert "Import t5x_like before the first jax computation" in done.stderr
