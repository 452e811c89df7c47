"""Rotary position embeddings in the Hugging Face (half-rotation) layout.

Positions are explicit so packed documents restart at 0 and context-parallel
shards know their offsets. ``RopeScaling`` carries the base change and the
context-extension schemes, with Hugging Face's definitions (``rope_type`` in a
``config.json``'s ``rope_scaling`` / ``rope_parameters``):

* ``default``: ``theta ** (-2i / d)``.
* ``linear``: positions divided by ``factor`` (position interpolation).
* ``ntk``: static NTK-aware base change, ``theta * factor ** (d / (d - 2))``.
* ``dynamic``: dynamic NTK: the base grows with the longest position in the
  batch once it passes ``max_position_embeddings`` (recomputed every call).
* ``yarn``: NTK-by-parts interpolation plus the attention temperature that
  scales cos and sin.
* ``llama3``: Llama 3.1's wavelength-banded interpolation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are derived; defaults follow Hugging Face."""

    rope_type: str = "default"
    factor: float = 1.0
    # Pretraining context (yarn, llama3); None means the model's max_position_embeddings.
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None derives it from factor / mscale
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dims

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "rope_scaling: llama3 needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )

    @classmethod
    def from_hf(cls, params: dict | None) -> "RopeScaling":
        """From a config.json ``rope_scaling`` / ``rope_parameters`` dict (old or new keys)."""
        if not params:
            return cls()
        rope_type = params.get("rope_type", params.get("type", "default"))
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known and v is not None}
        kwargs["rope_type"] = rope_type
        return cls(**kwargs)

    def to_hf(self, theta: float) -> dict:
        """Fields that differ from the defaults, plus those transformers requires of the type
        (it refuses a llama3 ``rope_parameters`` without ``low_freq_factor``)."""
        out = {"rope_type": self.rope_type, "rope_theta": theta}
        if self.rope_type != "default":
            defaults = RopeScaling()
            required = _HF_REQUIRED.get(self.rope_type, ())
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                if f.name != "rope_type" and value is not None and (
                    f.name in required or value != getattr(defaults, f.name)
                ):
                    out[f.name] = value
        return out


_HF_REQUIRED = {"linear": ("factor",), "ntk": ("factor",), "dynamic": ("factor",),
                "yarn": ("factor",),
                "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                           "high_freq_factor")}


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """Static NTK-aware scaling is this base change."""
    return theta * factor ** (head_dim / (head_dim - 2))


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """``1 / theta ** (2i / head_dim)`` for i in [0, head_dim / 2), float64 on the host."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def scaled_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """Static ``(inv_freq, attention_factor)`` for every type but ``dynamic``."""
    s = scaling
    original = s.original_max_position_embeddings or max_position_embeddings
    if s.rope_type in ("default", "dynamic"):
        return inverse_frequencies(head_dim, theta), 1.0
    if s.rope_type == "linear":
        return inverse_frequencies(head_dim, theta) / s.factor, 1.0
    if s.rope_type == "ntk":
        return inverse_frequencies(head_dim, ntk_theta(theta, s.factor, head_dim)), 1.0
    if s.rope_type == "llama3":
        return _llama3(inverse_frequencies(head_dim, theta), s, original), 1.0
    return _yarn(head_dim, theta, s, original)


def _llama3(inv_freq: np.ndarray, s: RopeScaling, original: int) -> np.ndarray:
    # Long wavelengths (low frequencies) are interpolated by `factor`, short ones kept,
    # and the band between is blended linearly in 1 / wavelength.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling, original: int) -> tuple[np.ndarray, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(s.factor)

    def correction_dim(rotations):
        # The dim whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency; 0: interpolate by factor
    base = inverse_frequencies(head_dim, theta)
    inv_freq = base / s.factor * (1 - extrapolate) + base * extrapolate
    return inv_freq, float(attention_factor)


def dynamic_ntk_frequencies(
    head_dim: int, theta: float, factor: float, max_position_embeddings: int, positions: jax.Array
) -> jax.Array:
    """Dynamic NTK inverse frequencies for the longest position in ``positions`` (traced)."""
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, max_position_embeddings)
    exponent = head_dim / (head_dim - 2)
    base = theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** exponent
    return 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


class Rotary:
    """``rotary(x, positions)`` for one model: frequencies fixed at construction
    (or, for ``dynamic``, derived from ``positions`` on every call)."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                 max_position_embeddings: int = 4096):
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling or RopeScaling()
        self.max_position_embeddings = max_position_embeddings
        self.inv_freq, self.attention_factor = scaled_frequencies(
            head_dim, theta, self.scaling, max_position_embeddings
        )

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        inv_freq = self.inv_freq
        if self.scaling.rope_type == "dynamic":
            inv_freq = dynamic_ntk_frequencies(
                self.head_dim, self.theta, self.scaling.factor, self.max_position_embeddings,
                positions,
            )
        return apply_rope(x, positions, inv_freq, self.attention_factor)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq, attention_factor: float = 1.0
) -> jax.Array:
    """Rotates ``x`` ``[batch, length, heads, head_dim]`` by ``positions`` ``[batch, length]``.

    ``attention_factor`` scales cos and sin (YaRN's temperature).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
