"""Ring attention: context parallelism over the ``sequence`` mesh axis.

The length dimension of q, k and v is split over the ``n`` devices of the
``sequence`` axis. Inside ``jax.shard_map`` every device keeps its block of
queries and passes its block of keys / values (with their segment ids) to the
next device with ``lax.ppermute``, ``n`` steps around the ring, so that every
query block meets every key block once while no device ever holds more than two
key blocks. Each step runs the blockwise (flash) code of ``kernels.chunked`` on
one (query block, key block) pair and returns the block's normalised output and
per-row logsumexp; the steps are merged by an online softmax kept in fp32 (the
running logsumexp is the running max plus the log of the running denominator).
The next step's keys are sent before the current step computes, so the
transfer can overlap the work.

Backward (``jax.custom_vjp``): the forward keeps only its inputs, the output
and the logsumexp. The backward walks the ring again: k / v rotate as in the
forward, each step recomputes the block probabilities from the saved logsumexp
(``chunked``'s hand-written block backward, given the *global* output and
logsumexp of the query rows, yields exactly that block's share of dq, dk, dv),
and the fp32 dk / dv accumulators travel around the ring with their k / v
blocks; one last hop brings them home to the device that owns those keys.
Autodiff through the loop would instead store every step's block
probabilities.

Masking semantics are those of ``kernels.attention`` (top-left causal, segment
ids, zeros and zero gradients for rows that see no key), in *global* positions:
whether a key block is in the past, on the diagonal or in the future of a
query block is decided from the global chunk indices of both, and inside a
block positions are compared only where both sides' local order is the global
order. Fully masked blocks cost nothing: ``lax.switch`` picks an empty branch.
``sliding_window`` is not supported here.

Layouts (``layout=``), i.e. which part of the sequence each device works on:

* ``"contiguous"``: device ``i`` holds positions ``[i*L, (i+1)*L)`` with
  ``L = length / n``. Under a causal mask device 0 has almost no work (it sees
  only its own block) while the last device sees everything.
* ``"zigzag"`` (default): the sequence is cut into ``2n`` chunks of ``c =
  length / (2n)`` and device ``i`` holds chunks ``i`` and ``2n-1-i``. Every key
  block other than its own is then, for every device, either half visible to
  all of its queries or fully visible to half of them: the same ``L*L/2`` pairs
  on every device at every step.

How callers lay out data: with ``permute=True`` (the default, and what the
``"ring"`` backend of ``dot_product_attention`` does) the arrays are in natural
order, sharded contiguously along ``sequence``, and ``ring_attention`` moves
them into the zig-zag layout inside the ``shard_map`` (two ``ppermute`` of half
blocks, no all-gather) and the output back; the decoder needs no change.
A caller that wants to save those hops for every layer can instead permute its
token ids, positions and segment ids once at the input with ``to_zigzag`` (and
the logits or targets back with ``from_zigzag``) and call with
``permute=False``: q, k, v, segment ids and the output are then all in zig-zag
order. Without a causal mask the work is balanced in any order and nothing is
permuted (attention by segment ids alone does not care where a row sits).

Precision: q, k, v stay in their dtype for the matmuls; the merged output,
logsumexp and the dk / dv accumulators are fp32, but each step's block output
and block gradients come back from ``chunked`` rounded to the input dtype (exact
for fp32; for bf16 an error of the order of bf16's own rounding).

Imports: ``kernels.attention`` (to register the ``"ring"`` backend, which
``attention`` lists as a lazy stub that imports this module on first use) and
``kernels.chunked``, whose block forward / backward (``_forward``,
``_flash_bwd``) run each step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from t5x_like.kernels import chunked as _chunked
from t5x_like.kernels.attention import IMPLEMENTATIONS, AttentionSpec, register

LAYOUTS = ("zigzag", "contiguous")


# ----------------------------------------------------------- zig-zag order (global)


def zigzag_chunk_order(num_devices: int) -> np.ndarray:
    """The natural-order chunk index at each zig-zag slot: ``[0, 2n-1, 1, 2n-2, ...]``.

    Zig-zag slot ``2i`` / ``2i+1`` (device ``i``'s first / second chunk) holds chunk
    ``i`` / ``2n-1-i`` of the sequence cut into ``2n`` chunks.
    """
    n = num_devices
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def _check_zigzag_length(length: int, num_devices: int) -> int:
    if num_devices < 1 or length % (2 * num_devices):
        raise ValueError(
            f"ring attention (zigzag layout): length {length} must divide into 2 * sequence = "
            f"{2 * num_devices} chunks; pad the length to a multiple of {2 * num_devices} or use "
            "layout='contiguous'"
        )
    return length // (2 * num_devices)


def _reorder_chunks(x: jax.Array, num_devices: int, order: np.ndarray, axis: int) -> jax.Array:
    axis = axis % x.ndim
    chunk = _check_zigzag_length(x.shape[axis], num_devices)
    chunks = x.reshape(x.shape[:axis] + (2 * num_devices, chunk) + x.shape[axis + 1:])
    return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(x.shape)


def to_zigzag(x: jax.Array, num_devices: int, axis: int = 1) -> jax.Array:
    """Permutes ``x`` (e.g. ``[batch, length, ...]``) from natural into zig-zag order.

    Sharding the result contiguously over ``num_devices`` gives device ``i`` the
    chunks ``i`` and ``2n-1-i``. Apply it to token ids, positions and segment ids
    alike, then call ``ring_attention(..., permute=False)``.
    """
    return _reorder_chunks(x, num_devices, zigzag_chunk_order(num_devices), axis)


def from_zigzag(x: jax.Array, num_devices: int, axis: int = 1) -> jax.Array:
    """The inverse of ``to_zigzag``: zig-zag order back to natural order."""
    return _reorder_chunks(x, num_devices, np.argsort(zigzag_chunk_order(num_devices)), axis)


# ------------------------------------------------------- zig-zag order (inside the ring)


def _half_perms(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where each device's first / second half goes in the zig-zag layout.

    Contiguously, device ``d`` holds chunks ``2d`` and ``2d+1``; chunk ``m`` belongs to
    zig-zag device ``m`` when ``m < n``, else ``2n-1-m``. Both maps are permutations
    of the devices, and an even device receives its first chunk (an even one) from
    the first-half map, an odd device from the second-half map.
    """

    def owner(m):
        return m if m < n else 2 * n - 1 - m

    return ([(d, owner(2 * d)) for d in range(n)], [(d, owner(2 * d + 1)) for d in range(n)])


def _swap_halves_if_odd(cfg: "_Ring", a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    even = lax.axis_index(cfg.axis) % 2 == 0
    return jnp.where(even, a, b), jnp.where(even, b, a)


def _local_to_zigzag(cfg: "_Ring", x: jax.Array) -> jax.Array:
    """This device's contiguous block ``[b, L, ...]`` → its zig-zag block."""
    c = x.shape[1] // 2
    first, second = _half_perms(cfg.n)
    from_first = lax.ppermute(x[:, :c], cfg.axis, first)
    from_second = lax.ppermute(x[:, c:], cfg.axis, second)
    return jnp.concatenate(_swap_halves_if_odd(cfg, from_first, from_second), axis=1)


def _local_from_zigzag(cfg: "_Ring", x: jax.Array) -> jax.Array:
    """The inverse of ``_local_to_zigzag``: even chunks go home as first halves."""
    c = x.shape[1] // 2
    first, second = _half_perms(cfg.n)
    even_chunk, odd_chunk = _swap_halves_if_odd(cfg, x[:, :c], x[:, c:])
    back_first = lax.ppermute(even_chunk, cfg.axis, [(dst, src) for src, dst in first])
    back_second = lax.ppermute(odd_chunk, cfg.axis, [(dst, src) for src, dst in second])
    return jnp.concatenate([back_first, back_second], axis=1)


# ------------------------------------------------------------------- public entry


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static facts of one ring call (hashable: custom_vjp's nondiff argument)."""

    axis: str
    n: int
    causal: bool
    zigzag: bool
    scale: float
    block_q: int
    block_k: int


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mesh: Any | None = None,
    axis: str = "sequence",
    scale: float | None = None,
    layout: str = "zigzag",
    permute: bool = True,
    block_sizes: tuple[int, int] | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
) -> jax.Array:
    """Self-attention with the length dimension sharded over ``axis`` (see module doc).

    q ``[batch, length, heads, head_dim]``, k / v ``[batch, length, kv_heads,
    head_dim]`` (GQA when ``heads % kv_heads == 0``; k / v are never copied per
    query head), ``segment_ids`` ``[batch, length]`` (int) for the queries and,
    unless ``kv_segment_ids`` is given, the keys. ``mesh`` defaults to the one set
    by ``jax.set_mesh``. Inside the ``shard_map`` the batch stays split over
    ``batch_axes`` and the heads over ``head_axis`` where the mesh has them (the
    default logical rules: batch -> (data, fsdp), heads / kv_heads -> tensor,
    length -> sequence).
    ``block_sizes`` ``(block_q, block_k)`` are the flash blocks inside each step.
    ``permute=False``: the inputs (and the output) are already in ``layout``'s
    order, e.g. from ``to_zigzag``.
    """
    mesh = _mesh_or_context(mesh)
    if axis not in mesh.axis_names:
        raise ValueError(f"ring attention: the mesh has no {axis!r} axis (axes: {mesh.axis_names})")
    if layout not in LAYOUTS:
        raise ValueError(f"ring attention: layout={layout!r} is not one of {LAYOUTS}")
    n = int(mesh.shape[axis])
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names and a != axis)
    head_axis = head_axis if head_axis in mesh.axis_names and head_axis != axis else None
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    elif segment_ids is None:
        raise ValueError("ring attention: kv_segment_ids was given without segment_ids")
    _check_shapes(q, k, v, (segment_ids, kv_segment_ids), mesh, n, layout, batch_axes, head_axis)
    block_q, block_k = block_sizes or (_chunked.DEFAULT_BLOCK_Q, _chunked.DEFAULT_BLOCK_K)
    cfg = _Ring(
        axis=axis, n=n, causal=bool(causal), zigzag=layout == "zigzag" and bool(causal),
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        block_q=int(block_q), block_k=int(block_k),
    )
    permute_here = permute and cfg.zigzag
    batch = batch_axes or None
    qkv_spec = P(batch, axis, head_axis, None)
    ids_spec = P(batch, axis)

    def per_device(q, k, v, qs, ks):
        if permute_here:
            q, k, v, qs, ks = (
                None if x is None else _local_to_zigzag(cfg, x) for x in (q, k, v, qs, ks)
            )
        b, t, h, d = q.shape
        out = _ring(cfg, q.reshape(b, t, k.shape[2], h // k.shape[2], d), k, v, qs, ks)
        out = out.reshape(b, t, h, d)
        return _local_from_zigzag(cfg, out) if permute_here else out

    # check_vma=False: the custom_vjp's cotangents carry no varying-axes types.
    return jax.shard_map(
        per_device, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, ids_spec, ids_spec),
        out_specs=qkv_spec, check_vma=False,
    )(q, k, v, segment_ids, kv_segment_ids)


def _mesh_or_context(mesh):
    if mesh is not None:
        return mesh
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError(
            "ring attention needs a mesh: pass mesh= or call inside jax.set_mesh(mesh)"
        )
    return mesh


def _check_shapes(q, k, v, segment_ids: tuple, mesh, n, layout, batch_axes, head_axis) -> None:
    """Clear errors, before any compute, for shapes the ring cannot split."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"ring attention: q {q.shape}, k {k.shape}, v {v.shape} must be 4-D, k == v")
    batch, length, heads, _ = q.shape
    kv_heads = k.shape[2]
    if k.shape[1] != length:
        raise ValueError(
            f"ring attention is self-attention: q_len={length} and kv_len={k.shape[1]} differ"
        )
    if heads % kv_heads:
        raise ValueError(f"ring attention: heads={heads} is not a multiple of kv_heads={kv_heads}")
    for ids in segment_ids:
        if ids is not None and ids.shape != (batch, length):
            raise ValueError(
                f"ring attention: segment ids must be [batch, length]=({batch}, {length}), "
                f"got {ids.shape}"
            )
    if layout == "zigzag":
        _check_zigzag_length(length, n)
    elif length % n:
        raise ValueError(f"ring attention: length {length} does not divide sequence={n}")
    parts = int(np.prod([mesh.shape[a] for a in batch_axes], dtype=int))
    if batch % parts:
        raise ValueError(f"ring attention: batch {batch} does not divide mesh axes {batch_axes} ({parts})")
    if head_axis is not None and kv_heads % mesh.shape[head_axis]:
        raise ValueError(
            f"ring attention: kv_heads={kv_heads} does not divide mesh axis {head_axis!r} "
            f"(size {mesh.shape[head_axis]}); the heads are split over it inside the ring. "
            "Use a tensor size that divides kv_heads"
        )


# ----------------------------------------------------------------- one ring step


def _pad(x, pad, axis=1):
    if x is None or pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _static(cfg: _Ring, causal: bool, tq: int, tk: int) -> _chunked._Static:
    return _chunked._Static(
        causal=causal, scale=cfg.scale, bq=min(cfg.block_q, tq), bk=min(cfg.block_k, tk), kv_len=tk
    )


def _block_forward(cfg: _Ring, causal, q, k, v, qs, ks):
    """One (query block, key block) pair with chunked's flash loop: out (q dtype), lse."""
    tq, tk = q.shape[1], k.shape[1]
    st = _static(cfg, causal, tq, tk)
    pq, pk = -tq % st.bq, -tk % st.bk
    out, lse = _chunked._forward(
        st, _pad(q, pq), _pad(k, pk), _pad(v, pk), _pad(qs, pq), _pad(ks, pk)
    )
    return out[:, :tq], lse[..., :tq]


def _block_backward(cfg: _Ring, causal, q, k, v, qs, ks, out, lse, d_out):
    """That pair's share of dq, dk, dv (fp32), from the rows' global out and lse.

    Padded query rows get ``d_out = 0`` (and ``out = 0``), so they add nothing.
    """
    tq, tk = q.shape[1], k.shape[1]
    st = _static(cfg, causal, tq, tk)
    pq, pk = -tq % st.bq, -tk % st.bk
    residuals = (
        _pad(q, pq), _pad(k, pk), _pad(v, pk), _pad(qs, pq), _pad(ks, pk),
        _pad(out, pq), _pad(lse, pq, axis=3),
    )
    dq, dk, dv = _chunked._flash_bwd(st, residuals, _pad(d_out, pq))[:3]
    f32 = jnp.float32
    return dq[:, :tq].astype(f32), dk[:, :tk].astype(f32), dv[:, :tk].astype(f32)


def _relation(cfg: _Ring, src):
    """Which branch the key block from device ``src`` needs (see ``_step_*``).

    0: nothing visible (or, zig-zag: only the second half of the queries sees it),
    1: all visible to all queries (zig-zag: only its first half is visible),
    2: the diagonal block (the device's own keys). Without causal: always 1.
    """
    me = lax.axis_index(cfg.axis)
    return jnp.where(src == me, 2, jnp.where(src < me, 1, 0))


def _step_forward(cfg: _Ring, src, q, qs, kv):
    """(out fp32, lse) of this device's queries against the key block of ``src``."""
    k, v, ks = kv
    c = q.shape[1] // 2

    def full(q, k, v, qs, ks):
        out, lse = _block_forward(cfg, False, q, k, v, qs, ks)
        return out.astype(jnp.float32), lse

    if not cfg.causal:
        return full(q, k, v, qs, ks)

    def diagonal():
        # Both sides list the same global positions in increasing order, so the
        # top-left causal mask on local indices is the global causal mask.
        out, lse = _block_forward(cfg, True, q, k, v, qs, ks)
        return out.astype(jnp.float32), lse

    def none_visible():
        return _empty_rows(q)

    def all_visible():
        return full(q, k, v, qs, ks)

    def past_zigzag():
        # src < me: its chunk src is before both of ours; its chunk 2n-1-src after both.
        return full(q, k[:, :c], v[:, :c], qs, _half(ks, 0, c))

    def future_zigzag():
        # src > me: both its chunks are after our chunk me and before our chunk 2n-1-me.
        out, lse = full(q[:, c:], k, v, _half(qs, 1, c), ks)
        empty_out, empty_lse = _empty_rows(q[:, :c])
        return (jnp.concatenate([empty_out, out], axis=1),
                jnp.concatenate([empty_lse, lse], axis=-1))

    branches = [future_zigzag, past_zigzag, diagonal] if cfg.zigzag else [
        none_visible, all_visible, diagonal]
    return lax.switch(_relation(cfg, src), branches)


def _half(x, which, c):
    if x is None:
        return None
    return x[:, :c] if which == 0 else x[:, c:]


def _empty_rows(q):
    b, t, kh, g, d = q.shape
    return (jnp.zeros((b, t, kh, g, d), jnp.float32),
            jnp.full((b, kh, g, t), -jnp.inf, jnp.float32))


def _merge(state, step):
    """Online-softmax merge of two (normalised out fp32, lse) partial results.

    Rows with no visible key so far have lse = -inf and out = 0; they stay so.
    """
    (out_a, lse_a), (out_b, lse_b) = state, step
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = w_a + w_b
    seen = total > 0
    inv = 1.0 / jnp.where(seen, total, 1.0)
    out = out_a * _rows(w_a * inv) + out_b * _rows(w_b * inv)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out, lse


def _rows(w):
    """[b, K, G, T] row weights → broadcastable against out [b, T, K, G, d]."""
    return w.transpose(0, 3, 1, 2)[..., None]


def _step_backward(cfg: _Ring, src, q, qs, kv, out, lse, d_out):
    """This device's queries' share of dq and of the ``src`` block's dk, dv (fp32)."""
    k, v, ks = kv
    c = q.shape[1] // 2

    def block(causal, q, k, v, qs, ks, out, lse, d_out):
        return _block_backward(cfg, causal, q, k, v, qs, ks, out, lse, d_out)

    if not cfg.causal:
        return block(False, q, k, v, qs, ks, out, lse, d_out)

    zeros = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
             jnp.zeros(v.shape, jnp.float32))

    def diagonal():
        return block(True, q, k, v, qs, ks, out, lse, d_out)

    def none_visible():
        return zeros

    def all_visible():
        return block(False, q, k, v, qs, ks, out, lse, d_out)

    def past_zigzag():
        dq, dk, dv = block(False, q, k[:, :c], v[:, :c], qs, _half(ks, 0, c), out, lse, d_out)
        return dq, _pad(dk, c), _pad(dv, c)

    def future_zigzag():
        dq, dk, dv = block(False, q[:, c:], k, v, _half(qs, 1, c), ks, out[:, c:],
                           lse[..., c:], d_out[:, c:])
        return jnp.concatenate([zeros[0][:, :c], dq], axis=1), dk, dv

    branches = [future_zigzag, past_zigzag, diagonal] if cfg.zigzag else [
        none_visible, all_visible, diagonal]
    return lax.switch(_relation(cfg, src), branches)


# ------------------------------------------------------------------ the ring loop


def _shift(cfg: _Ring, tree):
    """Every device sends ``tree`` to the next one on the ring."""
    perm = [(i, (i + 1) % cfg.n) for i in range(cfg.n)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis, perm), tree)


def _source(cfg: _Ring, step):
    """The device whose keys this device holds after ``step`` shifts."""
    return (lax.axis_index(cfg.axis) - step) % cfg.n


def _ring_forward(cfg: _Ring, q, k, v, qs, ks):
    """Returns out (q dtype) ``[b, L, K, G, d]`` and lse ``[b, K, G, L]`` (fp32)."""
    state = _empty_rows(q)

    def step(s, kv, state):
        return _merge(state, _step_forward(cfg, _source(cfg, s), q, qs, kv))

    def body(s, carry):
        kv, state = carry
        incoming = _shift(cfg, kv)  # sent before the compute, so the two may overlap
        return incoming, step(s, kv, state)

    kv, state = lax.fori_loop(0, cfg.n - 1, body, ((k, v, ks), state))
    out, lse = step(cfg.n - 1, kv, state)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, qs, ks):
    return _ring_forward(cfg, q, k, v, qs, ks)[0]


def _ring_fwd(cfg: _Ring, q, k, v, qs, ks):
    out, lse = _ring_forward(cfg, q, k, v, qs, ks)
    return out, (q, k, v, qs, ks, out, lse)


def _ring_bwd(cfg: _Ring, residuals, d_out):
    q, k, v, qs, ks, out, lse = residuals
    dq = jnp.zeros(q.shape, jnp.float32)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

    def step(s, kv, dq, dkv):
        dq_s, dk_s, dv_s = _step_backward(cfg, _source(cfg, s), q, qs, kv, out, lse, d_out)
        return dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)

    def body(s, carry):
        kv, dq, dkv = carry
        incoming = _shift(cfg, kv)
        dq, dkv = step(s, kv, dq, dkv)
        # The accumulators follow their keys: after n hops in all they are home.
        return incoming, dq, _shift(cfg, dkv)

    kv, dq, dkv = lax.fori_loop(0, cfg.n - 1, body, ((k, v, ks), dq, dkv))
    dq, dkv = step(cfg.n - 1, kv, dq, dkv)
    dk, dv = _shift(cfg, dkv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------- the backend


@register("ring")
def _ring_backend(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, interpret):
    """``dot_product_attention(..., implementation="ring")``: the mesh comes from
    ``jax.set_mesh``. Without a mesh, with ``sequence`` of size 1, or for attention
    that is not self-attention over one length (decoding against a KV cache) it is
    the chunked backend; the zig-zag layout is used, permuted internally."""
    mesh = jax.sharding.get_abstract_mesh()
    ring_size = 1
    if mesh is not None and not mesh.empty and "sequence" in mesh.axis_names:
        ring_size = int(mesh.shape["sequence"])
    if ring_size == 1 or spec.q_len != spec.kv_len:
        return IMPLEMENTATIONS["chunked"](
            q, k, v, q_segment_ids, kv_segment_ids, spec, interpret=interpret
        )
    if spec.sliding_window is not None:
        raise ValueError(
            "implementation='ring' does not support sliding_window; use 'chunked' or a mesh "
            "with sequence=1"
        )
    return ring_attention(
        q, k, v, causal=spec.causal, segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        mesh=mesh, scale=spec.scale, block_sizes=spec.block_sizes,
    )


__all__ = ["LAYOUTS", "from_zigzag", "ring_attention", "to_zigzag", "zigzag_chunk_order"]
