"""Which chip a trace is compiled for: the mesh's devices, else jax's default backend.

Under ``jax.set_mesh`` over a TPU topology or deviceless H100s (``t5x_like.targets``)
on a CPU host, the default backend is still ``cpu`` while the program is compiled
for the mesh's chips; kernels pick their code path and check their hardware from
this, not from ``jax.default_backend()``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax._src import mesh as _mesh_lib  # get_concrete_mesh: the devices behind set_mesh


def _mesh_device() -> Any | None:
    mesh = _mesh_lib.get_concrete_mesh()
    if mesh is not None and not mesh.empty:
        return mesh.devices.flat[0]
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is not None and not abstract.empty:
        return abstract.abstract_device  # device_kind and platform, no compute capability
    return None


def platform() -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: what the current trace compiles for."""
    device = _mesh_device()
    if device is None or getattr(device, "platform", None) is None:
        return jax.default_backend()
    name = device.platform
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def device() -> Any:
    """One device of the target (the mesh's, else this process's first): for its
    ``device_kind`` and, on a GPU, ``compute_capability``."""
    found = _mesh_device()
    return jax.devices()[0] if found is None else found


__all__ = ["device", "platform"]
