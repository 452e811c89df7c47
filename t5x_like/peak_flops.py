"""Dense bf16 peak FLOP/s of the chips we name, for MFU (``train.peak_flops_per_device``
overrides it for any other)."""

from __future__ import annotations

import jax

PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(device=None) -> float | None:
    """The table's figure for ``device`` (default: the first), or None for a chip it lacks."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None
