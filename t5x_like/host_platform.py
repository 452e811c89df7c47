"""Keeps jax on its CPU runtime on hosts without a GPU or TPU.

The compile toolchains in requirements.txt (libtpu, the CUDA plugin) register jax
clients that would start on import wherever they are installed: without the chip,
the CUDA plugin prints an initialisation traceback and libtpu waits on TPU host
lookups. Compiling for those chips needs neither client (``t5x_like.targets``
builds devices from topologies), so where no accelerator device node exists and
``JAX_PLATFORMS`` is unset, :func:`configure` sets it to ``cpu``. On a TPU VM or a
GPU host nothing changes; an explicit ``JAX_PLATFORMS`` always wins.
"""

from __future__ import annotations

import glob
import os
import sys

# Device nodes of NVIDIA / AMD GPUs and of TPU VMs (v4 / v5p: accel, v5e / v6e: vfio).
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")

# What configure() did, for logs and tests: None until it runs.
applied: bool | None = None


def has_accelerator() -> bool:
    """Whether this host shows a GPU or TPU device node."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def jax_backends_started() -> bool:
    """Whether jax has started its clients (too late then to choose platforms or malloc)."""
    bridge = sys.modules.get("jax._src.xla_bridge")  # private; absent before jax is imported
    return bool(getattr(bridge, "_backends", None))


def configure(env: dict | None = None) -> bool:
    """Sets ``JAX_PLATFORMS=cpu`` where it is unset and no accelerator is present."""
    global applied
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS", "").strip() or has_accelerator():
        applied = False
        return applied
    if jax_backends_started():
        applied = False  # jax's clients already started: too late to choose
        return applied
    env["JAX_PLATFORMS"] = "cpu"
    jax_config = getattr(sys.modules.get("jax"), "config", None)
    if jax_config is not None:
        jax_config.update("jax_platforms", "cpu")  # jax read the environment on import
    applied = True
    return applied
