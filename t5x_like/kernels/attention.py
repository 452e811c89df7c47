"""The one attention entry point of t5x_like.

``dot_product_attention(q, k, v, *, causal, segment_ids, implementation, ...)``
with q ``[batch, q_len, heads, head_dim]`` and k, v
``[batch, kv_len, kv_heads, head_dim]`` (the layout of
``jax.nn.dot_product_attention``). Grouped-query attention when
``heads % kv_heads == 0``: query head ``h`` reads kv head ``h // (heads // kv_heads)``.

Masking semantics, shared by every backend:

* ``causal``: query ``i`` sees key ``j`` only when ``j <= i``, both counted from 0
  (top-left aligned, as ``jax.nn.dot_product_attention``).
* ``sliding_window`` ``w`` (local attention, as Mistral / Qwen2; the sliding-window
  causal mask of Hugging Face transformers): query ``i`` sees key ``j`` only when
  ``i - w < j``, so at most ``w`` keys including itself; with ``causal`` also
  ``j <= i``. Without ``causal`` the window is symmetric: ``|i - j| < w``. Indices
  as for ``causal``; ``w >= max(q_len, kv_len)`` is no window.
* ``segment_ids`` ``[batch, q_len]`` / ``kv_segment_ids`` ``[batch, kv_len]``
  (int32): a query sees only keys with the same id. Give padding its own id.
  ``kv_segment_ids`` defaults to ``segment_ids`` (which then needs
  ``q_len == kv_len``).
* A query row that sees no key returns zeros (never NaN), with zero gradients.

Backends register themselves in ``IMPLEMENTATIONS``; the Pallas kernels plug in
there. Every backend is tested against a float64 numpy reference.

Sharding. XLA partitions the pure-JAX backends (``xla``, ``chunked``) and cuDNN's
call by itself. A Pallas kernel is one opaque custom call that XLA cannot split
(Mosaic TPU refuses to compile it on more than one chip; on GPUs every device would
gather the whole batch), so the backends registered ``per_device`` run inside
``jax.shard_map`` over the mesh set by ``jax.set_mesh``: the batch split over the
mesh axes of ``shard_axes.batch`` and the heads over ``shard_axes.heads`` (the
logical rules give both; the model layer passes them). Each device's kernel then
sees its own shard. Self-attention with the length split over ``sequence`` goes to
ring attention (not with a sliding window: an error says so); decoding against a KV
cache gathers its few query rows along the length.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from t5x_like.kernels import chunked as _chunked
from t5x_like.kernels import compile_target


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Validated, static facts about one attention call, passed to backends."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    scale: float
    block_sizes: tuple[int, int] | None = None  # (block_q, block_k) for blockwise backends
    sliding_window: int | None = None  # keys visible to a query, itself included

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


class Backend(Protocol):
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_segment_ids: jax.Array | None,
        kv_segment_ids: jax.Array | None,
        spec: AttentionSpec,
        *,
        interpret: bool,
    ) -> jax.Array: ...


IMPLEMENTATIONS: dict[str, Backend] = {}
# Backends that see one device's shard (custom calls XLA cannot partition).
PER_DEVICE: set[str] = set()


def register(name: str, *, per_device: bool = False) -> Callable[[Backend], Backend]:
    """Decorator that adds a backend under ``name`` (used by kernels/pallas_*.py).

    ``per_device``: the backend is called inside ``jax.shard_map`` on each device's
    shard of the batch and heads (see the module doc)."""

    def wrap(fn: Backend) -> Backend:
        IMPLEMENTATIONS[name] = fn
        if per_device:
            PER_DEVICE.add(name)
        return fn

    return wrap


@dataclasses.dataclass(frozen=True)
class ShardAxes:
    """The mesh axes that split the operands' ``batch``, ``length`` and heads.

    The defaults are what ``partitioning.DEFAULT_RULES`` give; the model layer passes
    what the active rules give. Axes absent from the mesh, of size 1 or already
    manual (inside another ``shard_map``) are skipped."""

    batch: tuple[str, ...] = ("data", "fsdp")
    length: tuple[str, ...] = ("sequence",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    implementation: str = "xla",
    interpret: bool = False,
    scale: float | None = None,
    block_sizes: tuple[int, int] | None = None,
    sliding_window: int | None = None,
    shard_axes: ShardAxes | None = None,
) -> jax.Array:
    """Scaled dot-product attention; returns ``[batch, q_len, heads, head_dim]`` in q's dtype.

    ``implementation``: ``"xla"`` (the plain reference), ``"chunked"`` (online
    softmax over blocks, memory linear in length), ``"cudnn"`` (NVIDIA GPUs), or
    any backend registered later (``"pallas"``). ``interpret`` runs Pallas kernels
    in interpret mode (needed on CPU). ``scale`` defaults to ``head_dim ** -0.5``.
    ``block_sizes`` ``(block_q, block_k)`` tunes blockwise backends (others ignore it).
    ``sliding_window`` (an int >= 1) restricts each query to a local window of keys
    (see the module doc). ``shard_axes``: the mesh axes of the operands' dimensions,
    for the backends that run per device (default :class:`ShardAxes`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is unknown; "
            f"available: {sorted(IMPLEMENTATIONS)}"
        )
    spec = _validate(q, k, v, causal, segment_ids, kv_segment_ids, scale, sliding_window)
    if block_sizes is not None:
        if len(block_sizes) != 2 or min(block_sizes) < 1:
            raise ValueError(f"attention: block_sizes must be (block_q, block_k) >= 1, got {block_sizes}")
        spec = dataclasses.replace(spec, block_sizes=(int(block_sizes[0]), int(block_sizes[1])))
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids was given without segment_ids (the query side's ids)")
    if implementation in PER_DEVICE:
        return _per_device(
            implementation, q, k, v, segment_ids, kv_segment_ids, spec, interpret,
            shard_axes or ShardAxes(),
        )
    return IMPLEMENTATIONS[implementation](
        q, k, v, segment_ids, kv_segment_ids, spec, interpret=interpret
    )


def _per_device(name, q, k, v, q_segment_ids, kv_segment_ids, spec, interpret, axes: ShardAxes):
    """Runs backend ``name`` on each device's shard under ``jax.shard_map`` (module doc)."""
    backend = IMPLEMENTATIONS[name]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return backend(q, k, v, q_segment_ids, kv_segment_ids, spec, interpret=interpret)
    manual = set(getattr(mesh, "manual_axes", ()))

    def split(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in manual)

    length = split(axes.length)
    batch, heads = split(axes.batch), split(axes.heads)
    if heads != split(axes.kv_heads):
        raise ValueError(
            f"attention implementation={name!r}: heads are split over {heads} but kv_heads "
            f"over {split(axes.kv_heads)}; a device's query heads need their kv heads, so "
            "map 'heads' and 'kv_heads' to the same mesh axes"
        )
    if length and spec.q_len == spec.kv_len:
        return _as_ring(name, q, k, v, q_segment_ids, kv_segment_ids, spec, length, batch, heads)
    # Decoding against a KV cache (q_len != kv_len): the few query rows are gathered
    # along the length and each device attends its batch / heads shard to the whole cache.
    if not batch and not heads:
        return backend(q, k, v, q_segment_ids, kv_segment_ids, spec, interpret=interpret)
    parts_b = math.prod(mesh.shape[a] for a in batch)
    parts_h = math.prod(mesh.shape[a] for a in heads)
    for what, size, parts, names in (
        ("batch", spec.batch, parts_b, batch),
        ("heads", spec.heads, parts_h, heads),
        ("kv_heads", spec.kv_heads, parts_h, heads),
    ):
        if size % parts:
            raise ValueError(
                f"attention implementation={name!r}: {what}={size} does not divide mesh axes "
                f"{names} (size {parts}); each device runs the kernel on its shard"
            )
    local = dataclasses.replace(
        spec, batch=spec.batch // parts_b, heads=spec.heads // parts_h,
        kv_heads=spec.kv_heads // parts_h,
    )
    qkv = jax.sharding.PartitionSpec(batch or None, None, heads or None, None)
    ids = jax.sharding.PartitionSpec(batch or None, None)

    def per_device(q, k, v, qs, ks):
        return backend(q, k, v, qs, ks, local, interpret=interpret)

    # Manual over every axis not already manual: the unnamed ones see whole operands
    # (a length split over another axis is gathered). check_vma=False: the kernels'
    # custom_vjp cotangents carry no varying-axes types.
    return jax.shard_map(
        per_device, mesh=mesh, in_specs=(qkv, qkv, qkv, ids, ids), out_specs=qkv,
        axis_names=set(mesh.axis_names) - manual, check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids)


def _as_ring(name, q, k, v, q_segment_ids, kv_segment_ids, spec, length, batch, heads):
    """Self-attention split along the length: ring attention (context parallelism),
    with the batch and heads split as the rules say. A kernel on a length shard would
    miss the other shards' keys."""
    if length != ("sequence",):
        raise ValueError(
            f"attention: the length is split over mesh axes {length}; ring attention "
            "runs over the 'sequence' axis only. Map 'length' to 'sequence' in the rules"
        )
    if spec.sliding_window is not None:
        raise ValueError(
            f"attention implementation={name!r} with sliding_window on a mesh that splits "
            "the length over 'sequence': ring attention has no window. Use "
            "implementation='chunked' (XLA partitions it) or sequence=1"
        )
    if len(heads) > 1:
        raise ValueError(
            f"attention: ring attention splits the heads over one mesh axis, not {heads}"
        )
    from t5x_like.kernels import ring  # noqa: PLC0415  (ring imports this module)

    return ring.ring_attention(
        q, k, v, causal=spec.causal, segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        scale=spec.scale, block_sizes=spec.block_sizes, batch_axes=batch,
        head_axis=heads[0] if heads else None,
    )


def _validate(
    q, k, v, causal, segment_ids, kv_segment_ids, scale, sliding_window
) -> AttentionSpec:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"attention: {name} must be [batch, length, heads, head_dim], got shape {x.shape}"
            )
    batch, q_len, heads, head_dim = q.shape
    _, kv_len, kv_heads, _ = k.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must have the same shape")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"attention: q {q.shape} and k {k.shape} disagree on batch or head_dim"
        )
    if heads % kv_heads:
        raise ValueError(
            f"attention: heads={heads} is not a multiple of kv_heads={kv_heads} (GQA needs it)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if segment_ids is not None:
        _check_ids("segment_ids", segment_ids, batch, q_len)
        if kv_segment_ids is None and q_len != kv_len:
            raise ValueError(
                f"attention: q_len={q_len} != kv_len={kv_len}, so kv_segment_ids must be given"
            )
    if kv_segment_ids is not None:
        _check_ids("kv_segment_ids", kv_segment_ids, batch, kv_len)
    _check_window(sliding_window)
    return AttentionSpec(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=bool(causal),
        scale=float(head_dim**-0.5 if scale is None else scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
    )


def _check_ids(name: str, ids: jax.Array, batch: int, length: int) -> None:
    if ids.shape != (batch, length):
        raise ValueError(f"attention: {name} must be [batch, length]=({batch}, {length}), got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"attention: {name} must be integer, got {ids.dtype}")


def _check_window(window) -> None:
    # bool is an int to Python, but sliding_window=True is surely a mistake.
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"attention: sliding_window must be an int >= 1 or None, got {window!r}")


# ------------------------------------------------------------------------ masks


def attention_mask(
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    spec: AttentionSpec,
    q_offset: jax.Array | int = 0,
    kv_offset: jax.Array | int = 0,
) -> jax.Array | None:
    """Boolean visibility ``[batch or 1, q, kv]`` for positions offset by q/kv_offset."""
    mask = None
    if spec.causal or spec.sliding_window is not None:
        q_pos = q_offset + jnp.arange(spec.q_len)[:, None]
        kv_pos = kv_offset + jnp.arange(spec.kv_len)[None, :]
        mask = _positions_visible(q_pos - kv_pos, spec)[None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def _positions_visible(dist: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Whether a query sees a key ``dist = q_pos - kv_pos`` positions before it."""
    visible = dist >= 0 if spec.causal else jnp.ones(dist.shape, bool)
    if spec.sliding_window is not None:
        # With causal this is 0 <= dist < w (HF Mistral: j > i - w); without, symmetric.
        visible = visible & (jnp.abs(dist) < spec.sliding_window)
    return visible


# ----------------------------------------------------------------- xla (reference)


@register("xla")
def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, interpret):
    del interpret
    b, t, h, d = q.shape
    kv_heads, groups, s = spec.kv_heads, spec.groups, spec.kv_len
    # Heads-major operands with each kv head's query groups stacked along the length:
    # [b, K, g*t, d] x [b, K, s, d] is a plain batched matmul (k/v read once per kv head,
    # no unit dims). The [b, t, K, g, d] einsum it replaces made XLA:CPU pick transposed
    # operand layouts and copy the scores twice (MHA backward 10-30%, GQA 1.6-1.9x
    # slower on CPU; bench/RESULTS.md, "Profile-guided pass").
    qh = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    qh = qh.reshape(b, kv_heads, groups * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    # Logits [batch, kv_heads, groups, q, kv] in fp32 (the reshapes are free: bitcasts).
    logits = logits.reshape(b, kv_heads, groups, t, s) * jnp.float32(spec.scale)
    mask = attention_mask(q_segment_ids, kv_segment_ids, spec)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    # Rows that see nothing have max -inf; shift by 0 so exp gives exact zeros.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # Normalise the [.., q, d] output rather than the [.., q, kv] probabilities: one pass
    # over the quadratic tensor fewer (about 20% faster on CPU at 512 tokens).
    p = p.reshape(b, kv_heads, groups * t, s).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", p, vh, preferred_element_type=jnp.float32)
    out = out.reshape(b, kv_heads, groups, t, d) / jnp.where(denom == 0, 1.0, denom)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


# ------------------------------------------------------------------------ chunked


@register("chunked")
def _chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, interpret):
    del interpret
    block_q, block_k = spec.block_sizes or (_chunked.DEFAULT_BLOCK_Q, _chunked.DEFAULT_BLOCK_K)
    return _chunked.flash_attention(
        q, k, v, q_segment_ids, kv_segment_ids,
        causal=spec.causal, scale=spec.scale, block_q=block_q, block_k=block_k,
        sliding_window=spec.sliding_window,
    )


# -------------------------------------------------------------------------- cudnn


@register("cudnn")
def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, interpret):
    del interpret
    if spec.sliding_window is not None and not spec.causal:
        # jax's cudnn path raises for any right window when the mask is not causal.
        raise ValueError(
            "implementation='cudnn' supports sliding_window only with causal=True (cuDNN "
            "has no right-hand window); use implementation='xla' or 'chunked'"
        )
    target = compile_target.platform()
    if target != "gpu":
        raise RuntimeError(
            f"implementation='cudnn' needs an NVIDIA GPU, but this call compiles for "
            f"{target!r} (the mesh's devices, else jax's default backend); use "
            "implementation='xla' or 'chunked' here"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"implementation='cudnn' takes bfloat16 or float16 inputs, got {q.dtype}; cast first "
            "or use implementation='xla'"
        )
    mask = None
    if q_segment_ids is not None:
        # cuDNN's fused kernel has no segment ids: a dense [b, 1, q, kv] mask stands in
        # (quadratic memory; the Pallas kernel is the packed-document path).
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=spec.causal, scale=spec.scale, implementation="cudnn",
        local_window_size=_cudnn_window(spec),
    )
    sees_any = _cudnn_rows_that_see_a_key(q_segment_ids, kv_segment_ids, spec)
    if sees_any is not None:
        out = jnp.where(sees_any[:, :, None, None], out, jnp.zeros_like(out))
    return out


def _cudnn_window(spec: AttentionSpec) -> tuple[int, int] | None:
    """Our causal window as ``jax.nn.dot_product_attention``'s ``local_window_size``.

    Checked in jax 0.10.2 (``jax/_src/nn/functions.py``): ``(left, right)`` lets query
    ``i`` see keys ``i - left <= j <= i + right`` (``_get_window_mask``), so the counts
    exclude the diagonal and our ``i - w < j`` is ``left = w - 1``. Its cudnn branch
    then hands cuDNN ``sliding_window_length = left + 1 = w``, documented there
    (``jax/_src/cudnn/fused_attention_stablehlo.py``) as the keys ``(i - w, i]``.
    """
    if spec.sliding_window is None:
        return None
    return (spec.sliding_window - 1, 0)


def _cudnn_rows_that_see_a_key(q_segment_ids, kv_segment_ids, spec: AttentionSpec):
    """``[batch or 1, q_len]`` bool, or None when every query row sees some key."""
    if q_segment_ids is not None:
        return jnp.any(attention_mask(q_segment_ids, kv_segment_ids, spec), axis=-1)
    window = spec.sliding_window
    if window is not None and spec.q_len >= spec.kv_len + window:
        # Causal, top-left: query i's nearest key is kv_len - 1, outside the window here.
        return (jnp.arange(spec.q_len) < spec.kv_len - 1 + window)[None]
    return None


# ------------------------------------------------------------------------- pallas
# Pallas kernels live in modules of their own, imported on first use: importing
# jax.experimental.pallas is slow, and most runs never call them. Each module
# registers its real backend on import, replacing the stub registered here.

_PALLAS_MODULES = {
    "pallas_tpu": "t5x_like.kernels.pallas_tpu",
    "pallas_gpu": "t5x_like.kernels.pallas_gpu",
}


def _lazy_backend(name: str, module: str) -> Backend:
    def import_then_call(*args, **kwargs):
        importlib.import_module(module)
        if IMPLEMENTATIONS[name] is import_then_call:
            raise RuntimeError(f"{module} did not register the attention backend {name!r}")
        return IMPLEMENTATIONS[name](*args, **kwargs)

    return import_then_call


for _name, _module in _PALLAS_MODULES.items():
    register(_name, per_device=True)(_lazy_backend(_name, _module))

# Ring attention (context parallelism over the `sequence` mesh axis) imports this module.
register("ring")(_lazy_backend("ring", "t5x_like.kernels.ring"))


@register("pallas", per_device=True)
def _pallas_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, interpret):
    """The target's Pallas kernel: Mosaic GPU for a GPU, pltpu for a TPU and, with
    ``interpret=True``, on CPU (the GPU kernel runs on CPU as ``"pallas_gpu"``)."""
    name = "pallas_gpu" if compile_target.platform() == "gpu" else "pallas_tpu"
    return IMPLEMENTATIONS[name](q, k, v, q_segment_ids, kv_segment_ids, spec, interpret=interpret)


def flops(spec: AttentionSpec, backward: bool = False) -> float:
    """Model FLOPs of one call, for benchmarks and MFU: ``4 * head_dim`` per (query, key) pair.

    Pairs counted: all ``q_len * kv_len``; causal counts half. A sliding window
    ``w <= q_len`` counts only the pairs inside it, as if ``kv_len == q_len = T``:
    ``T*w - w*(w-1)/2`` causal, ``T*(2w-1) - w*(w-1)`` symmetric. Segment ids are ignored.
    """
    pairs = float(spec.q_len * spec.kv_len)
    t, w = spec.q_len, spec.sliding_window
    if w is not None and w <= t:
        pairs = t * w - w * (w - 1) / 2 if spec.causal else t * (2 * w - 1) - w * (w - 1)
    elif spec.causal:
        pairs /= 2
    f = 4.0 * spec.batch * spec.heads * spec.head_dim * pairs
    return f * (3.5 if backward else 1.0)  # fwd+bwd = fwd + 2.5 fwd (recomputed logits)


__all__ = [
    "AttentionSpec",
    "IMPLEMENTATIONS",
    "PER_DEVICE",
    "ShardAxes",
    "attention_mask",
    "dot_product_attention",
    "flops",
    "register",
]
