"""Devices to compile for: TPU slices through libtpu and GPUs without the GPU.

``get("v5p:4x4x4")``, ``get("h100:8")``, ``get("h200:16")``, ``get("cpu")`` return a
:class:`Target`: the devices of that slice or host group, the platform, the chip and
each device's HBM. Lay a mesh over ``target.devices`` (``target.mesh(MeshShape(...))``)
and ``jax.jit(...).lower(...).compile()`` runs the chip's real compiler on this host:
XLA:TPU and Mosaic for a TPU topology, XLA:GPU with ptxas for sm_90a for the GPUs.
``memory_analysis()`` of the result gives bytes per device (:func:`memory_report`).

What a compile proves: the backend compiler accepts, tiles and partitions the
program, and it fits (or not) in the chip's memory. What it does not: speed (no
autotuning runs without a GPU; XLA:GPU's ``cost_analysis`` is None) or runtime
faults. A GPU compile leaves cuDNN's workspace out of ``memory_analysis``.

TPU topologies are any name libtpu knows (``v4:2x2x1``, ``v5e:16x16``, ``v5p:8x8x8``,
``v6e:4x4``); GPUs are ``h100:N`` / ``h200:N`` with 8 per host (N <= 8 is one host),
compiled against the target configs in ``t5x_like/target_configs/`` (their README gives
the source). No TPU or GPU client is started: the topology's devices exist only to
compile for, so this works with ``JAX_PLATFORMS=cpu`` on any host.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
from typing import Any

import jax

from t5x_like import partitioning

GIB = 2**30
CONFIG_DIR = pathlib.Path(__file__).parent / "target_configs"
GPUS_PER_HOST = 8
GPU_CONFIGS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}
# HBM of one chip and its TensorCores, by libtpu's device_kind. A v4 topology gives one
# device per TensorCore (two per chip); v5p's megacore gives one device per chip.
TPU_CHIPS = {
    "TPU v4": (32 * GIB, 2),
    "TPU v5 lite": (16 * GIB, 1),
    "TPU v5": (95 * GIB, 2),
    "TPU v6 lite": (32 * GIB, 1),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices of one compile target, with what a fit check needs to know."""

    name: str
    platform: str  # "tpu", "gpu" or "cpu": jax's name for the backend
    devices: tuple[Any, ...]
    device_kind: str
    hbm_bytes: int | None  # per device; None for the host (cpu)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def mesh(self, shape: Any) -> jax.sharding.Mesh:
        """A mesh over this target's devices (``shape`` a ``partitioning.MeshShape``)."""
        return partitioning.make_mesh(shape, devices=list(self.devices))


def get(name: str) -> Target:
    """The compile target ``name`` (see the module doc); a clear ValueError otherwise."""
    return _get(name.strip().lower())


@functools.lru_cache(maxsize=None)
def _get(name: str) -> Target:
    if name == "cpu" or name.startswith("cpu:"):
        return _cpu(name)
    match = re.fullmatch(r"(h100|h200):(\d+)", name)
    if match:
        return _gpus(name, match.group(1), int(match.group(2)))
    if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", name):
        return _tpu(name)
    raise ValueError(
        f"compile target {name!r} is not known: use a TPU topology (v4:2x2x1, v5e:4x4, "
        "v5p:4x4x4, v6e:8x8), h100:N or h200:N (GPUs, 8 a host), or cpu"
    )


def _cpu(name: str) -> Target:
    devices = jax.devices("cpu")
    if ":" in name:
        count = int(name.split(":", 1)[1])
        if not 1 <= count <= len(devices):
            raise ValueError(
                f"compile target {name!r}: this process has {len(devices)} CPU devices "
                "(XLA_FLAGS=--xla_force_host_platform_device_count=N gives more)"
            )
        devices = devices[:count]
    return Target(name, "cpu", tuple(devices), devices[0].device_kind, None)


def _tpu(name: str) -> Target:
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"compile target {name!r} needs libtpu (pip install libtpu==0.0.42.1, the pin of "
            "jax[tpu]==0.10.2; scripts/env.sh installs it)"
        )
    from jax.experimental import topologies  # noqa: PLC0415

    from t5x_like import host_platform  # noqa: PLC0415

    if not host_platform.has_accelerator():
        # No chip to guard: let compile-only processes (a test run beside a bench, the
        # launchers' fit check) share libtpu instead of failing on its lockfile.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as err:  # libtpu's error names the topology it refused
        raise ValueError(f"compile target {name!r}: libtpu refused the topology ({err})") from err
    kind = devices[0].device_kind
    if kind not in TPU_CHIPS:
        raise ValueError(f"compile target {name!r}: no HBM figure for {kind!r} in TPU_CHIPS")
    chip_hbm, chip_cores = TPU_CHIPS[kind]
    cores = getattr(devices[0], "num_cores", 1) or 1
    return Target(name, "tpu", tuple(devices), kind, chip_hbm * cores // chip_cores)


def _gpus(name: str, chip: str, count: int) -> Target:
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ValueError(
            f"compile target {name!r}: give 1-{GPUS_PER_HOST} GPUs or a multiple of "
            f"{GPUS_PER_HOST} ({GPUS_PER_HOST} a host)"
        )
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise ValueError(
            f"compile target {name!r} needs the CUDA plugin (jax-cuda12-plugin==0.10.2 with "
            "nvidia-cuda-nvcc-cu12; scripts/env.sh installs them)"
        )
    put_ptxas_on_path()
    from jax.experimental import topologies  # noqa: PLC0415

    config = (CONFIG_DIR / GPU_CONFIGS[chip]).read_text()
    hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
    devices = topologies.get_topology_desc(
        platform="cuda", topology_name=chip, target_config=config,
        topology=f"1x{hosts}x{per_host}",
    ).devices
    memory = int(re.search(r"device_memory_size:\s*(\d+)", config).group(1))
    return Target(name, "gpu", tuple(devices), devices[0].device_kind, memory)


def put_ptxas_on_path() -> None:
    """Puts the nvcc wheel's ``bin`` first on PATH: Mosaic GPU runs the ``ptxas`` it
    finds there, and a system ptxas of another CUDA version may come first."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        return
    bin_dir = str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "bin")
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir] + [p for p in path if p != bin_dir])


def memory_report(compiled: Any, target: Target) -> dict[str, float]:
    """Per-device bytes of a compiled program (``memory_analysis()``), in GiB, and
    whether they fit the target's HBM (arguments + outputs - aliased + temporaries)."""
    stats = compiled.memory_analysis()
    report = {
        "arguments_gib": stats.argument_size_in_bytes / GIB,
        "outputs_gib": stats.output_size_in_bytes / GIB,
        "aliased_gib": stats.alias_size_in_bytes / GIB,
        "temporaries_gib": stats.temp_size_in_bytes / GIB,
    }
    report["peak_gib"] = (
        report["arguments_gib"] + report["outputs_gib"] - report["aliased_gib"]
        + report["temporaries_gib"]
    )
    if target.hbm_bytes is not None:
        report["hbm_gib"] = target.hbm_bytes / GIB
        report["fits"] = float(report["peak_gib"] <= report["hbm_gib"])
    return report


__all__ = ["GPU_CONFIGS", "TPU_CHIPS", "Target", "get", "memory_report", "put_ptxas_on_path"]
