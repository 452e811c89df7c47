"""glibc malloc settings that keep XLA:CPU's per-call buffers out of the page-fault path.

XLA:CPU allocates every call's temporaries (attention scores, activations) with
``malloc`` and frees them at the end of the call. With glibc's defaults, blocks of a
few MB and more are fresh ``mmap`` regions or live in per-thread arenas that are
trimmed when freed, so the next call touches new pages again: on the MiniLM-shaped
attention layer that was ~14,000 minor page faults a forward (each page zeroed by
the kernel), about half of its time. Three ``mallopt`` settings keep freed memory in
one reusable heap instead: no ``mmap`` for large blocks, one arena, no trimming
below 2 GB free (bench/RESULTS.md, "Profile-guided pass").

They are opt-in, ``T5X_LIKE_MALLOC=on`` (or ``auto``: on where no GPU / TPU is
visible or ``JAX_PLATFORMS`` is ``cpu``; default ``off``): the process keeps its
peak heap, all threads share one arena, and compile-bound runs (many small jobs,
the test suite) were ~15% slower with them, while long CPU runs (embedding a
corpus, benchmarks) gain. They only work when set before the XLA CPU client starts
its threads, so ``t5x_like/__init__.py`` calls :func:`configure` on import.
Equivalent environment variables for other launchers:
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

from t5x_like import host_platform

ENV = "T5X_LIKE_MALLOC"
CHOICES = ("auto", "on", "off")
DEFAULT = "off"
# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest is ~2 GB

# What configure() did, for logs and tests: None until it runs.
applied: bool | None = None


def wanted(env: dict | None = None) -> bool:
    """Whether the settings should apply here, from ``T5X_LIKE_MALLOC`` and the host."""
    env = os.environ if env is None else env
    choice = env.get(ENV, DEFAULT).strip().lower() or DEFAULT
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={env[ENV]!r} is not one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice == "on"
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not host_platform.has_accelerator()


def configure(env: dict | None = None) -> bool:
    """Apply the settings when :func:`wanted`; returns whether they were applied."""
    global applied
    env = os.environ if env is None else env
    if applied is not None:
        return applied
    applied = False
    if sys.platform != "linux" or not wanted(env):
        return applied
    if host_platform.jax_backends_started():
        # The client's threads already own their arenas: settings now change little.
        if "MALLOC_ARENA_MAX" in env:
            return applied  # set in the environment, as the message below advises
        warnings.warn(
            "t5x_like was imported after jax started its CPU client, so its malloc settings "
            f"would not take effect (attention on XLA:CPU runs up to ~2x slower; {ENV}, see "
            "t5x_like/host_malloc.py). Import t5x_like before the first jax computation or "
            "jax.devices(), or set MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 "
            "MALLOC_TRIM_THRESHOLD_=2147483647 in the environment.",
            RuntimeWarning,
            stacklevel=3,
        )
        return applied
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt knobs)
    except (OSError, AttributeError):
        return applied
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    )
    return applied
