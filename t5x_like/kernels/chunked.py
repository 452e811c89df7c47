"""Blockwise (flash) attention in plain JAX: memory linear in length, any backend.

The forward pass walks query blocks and, inside each, key blocks with an online
softmax; it keeps only the output and the per-row logsumexp. The backward pass
is written by hand (``jax.custom_vjp``) and recomputes each block's
probabilities from the logsumexp, so no ``[q_len, kv_len]`` tensor exists in
either direction. Blocks that no query of the block can see (the causal upper
triangle, outside a sliding window, other documents, padding) are skipped:
the loops run only over the blocks between the causal diagonal and the window's
edges, and ``lax.cond`` skips the rest.

Semantics are those of ``t5x_like.kernels.attention`` (top-left causal, sliding
window, segment ids, zeros for rows that see nothing). This is the portable
backend and the algorithmic twin of the Pallas kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    sliding_window: int | None = None,
) -> jax.Array:
    """q ``[b, Tq, H, d]``, k/v ``[b, Tk, K, d]`` → ``[b, Tq, H, d]`` (see module doc)."""
    b, q_len, h, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq = min(block_q, q_len)
    bk = min(block_k, kv_len)
    q_pad = -q_len % bq
    kv_pad = -kv_len % bk
    qp = _pad_length(q, q_pad).reshape(b, q_len + q_pad, kv_heads, h // kv_heads, d)
    kp = _pad_length(k, kv_pad)
    vp = _pad_length(v, kv_pad)
    qs = None if q_segment_ids is None else _pad_length(q_segment_ids, q_pad)
    ks = None if kv_segment_ids is None else _pad_length(kv_segment_ids, kv_pad)
    static = _Static(
        causal=causal, scale=scale, bq=bq, bk=bk, kv_len=kv_len, sliding_window=sliding_window
    )
    out = _flash(static, qp, kp, vp, qs, ks)
    return out.reshape(b, q_len + q_pad, h, d)[:, :q_len]


def _pad_length(x: jax.Array, pad: int) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The static arguments, hashable (custom_vjp's nondiff argument)."""

    causal: bool
    scale: float
    bq: int
    bk: int
    kv_len: int
    sliding_window: int | None = None  # query i sees key j only when |i - j| < window


def _block_mask(st: _Static, i, j, qs, ks):
    """Visibility ``[b or 1, bq, bk]`` of key block j to query block i."""
    q_pos = i * st.bq + jnp.arange(st.bq)
    kv_pos = j * st.bk + jnp.arange(st.bk)
    mask = (kv_pos < st.kv_len)[None, None, :]
    if st.causal:
        mask = mask & (kv_pos[None, :] <= q_pos[:, None])[None]
    if st.sliding_window is not None:
        mask = mask & (jnp.abs(q_pos[:, None] - kv_pos[None, :]) < st.sliding_window)[None]
    if qs is not None:
        q_ids = lax.dynamic_slice_in_dim(qs, i * st.bq, st.bq, axis=1)
        kv_ids = lax.dynamic_slice_in_dim(ks, j * st.bk, st.bk, axis=1)
        mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
    return mask


# Loop bounds, by position only (segment ids are left to lax.cond). They are tight
# whenever a block sees anything, so a window skips every block outside it.


def _first_kv_block(st: _Static, i):
    """The first key block query block i can see: where its first query's window starts."""
    if st.sliding_window is None:
        return 0
    return jnp.maximum(i * st.bq - st.sliding_window + 1, 0) // st.bk


def _last_kv_block(st: _Static, i, num_kv_blocks: int):
    """One past the last key block query block i can see (causal diagonal or window end)."""
    last_q = i * st.bq + st.bq - 1
    if st.causal:
        last_kv = last_q
    elif st.sliding_window is not None:
        last_kv = last_q + st.sliding_window - 1
    else:
        return num_kv_blocks
    return jnp.minimum(num_kv_blocks, last_kv // st.bk + 1)


def _first_q_block(st: _Static, j):
    """The first query block that can see key block j (causal diagonal or window start)."""
    if st.causal:
        return (j * st.bk) // st.bq
    if st.sliding_window is not None:
        return jnp.maximum(j * st.bk - st.sliding_window + 1, 0) // st.bq
    return 0


def _last_q_block(st: _Static, j, num_q_blocks: int):
    """One past the last query block that can see key block j: its last real key's window end."""
    if st.sliding_window is None:
        return num_q_blocks
    last_kv = jnp.minimum(j * st.bk + st.bk, st.kv_len) - 1  # padding keys are invisible
    return jnp.minimum(num_q_blocks, (last_kv + st.sliding_window - 1) // st.bq + 1)


def _logits(st: _Static, q_blk, k_blk, mask):
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], s * jnp.float32(st.scale), -jnp.inf)


def _forward(st: _Static, q, k, v, qs, ks):
    """Returns out ``[b, Tq, K, G, d]`` (q dtype) and lse ``[b, K, G, Tq]`` (fp32)."""
    b, tq, kh, g, d = q.shape
    nq, nk = tq // st.bq, k.shape[1] // st.bk

    def q_block(i):
        q_blk = lax.dynamic_slice_in_dim(q, i * st.bq, st.bq, axis=1)

        def kv_step(j, carry):
            mask = _block_mask(st, i, j, qs, ks)

            def update(carry):
                acc, m, l = carry
                k_blk = lax.dynamic_slice_in_dim(k, j * st.bk, st.bk, axis=1)
                v_blk = lax.dynamic_slice_in_dim(v, j * st.bk, st.bk, axis=1)
                s = _logits(st, q_blk, k_blk, mask)
                m_new = jnp.maximum(m, s.max(axis=-1))
                shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - shift[..., None])
                rescale = jnp.exp(m - shift)
                l = l * rescale + p.sum(axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(v.dtype), v_blk,
                    preferred_element_type=jnp.float32,
                )
                return acc * rescale[..., None] + pv, m_new, l

            return lax.cond(jnp.any(mask), update, lambda c: c, carry)

        init = (
            jnp.zeros((b, kh, g, st.bq, d), jnp.float32),
            jnp.full((b, kh, g, st.bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, st.bq), jnp.float32),
        )
        acc, m, l = lax.fori_loop(
            _first_kv_block(st, i), _last_kv_block(st, i, nk), kv_step, init
        )
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    outs, lses = lax.map(q_block, jnp.arange(nq))  # [nq, b, K, G, bq, d], [nq, b, K, G, bq]
    out = outs.transpose(1, 0, 4, 2, 3, 5).reshape(b, tq, kh, g, d)
    lse = lses.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, tq)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, qs, ks):
    return _forward(st, q, k, v, qs, ks)[0]


def _flash_fwd(st: _Static, q, k, v, qs, ks):
    out, lse = _forward(st, q, k, v, qs, ks)
    return out, (q, k, v, qs, ks, out, lse)


def _flash_bwd(st: _Static, residuals, d_out):
    q, k, v, qs, ks, out, lse = residuals
    b, tq, kh, g, d = q.shape
    tk = k.shape[1]
    nq, nk = tq // st.bq, tk // st.bk
    # delta_i = sum_d dO_i * O_i: the softmax Jacobian's row term.
    delta = jnp.einsum(
        "bqkgd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32)
    )
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def kv_block(j, carry):
        dq, dk, dv = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * st.bk, st.bk, axis=1)
        v_blk = lax.dynamic_slice_in_dim(v, j * st.bk, st.bk, axis=1)

        def q_step(i, inner):
            mask = _block_mask(st, i, j, qs, ks)

            def update(inner):
                dq, dk_blk, dv_blk = inner
                q_blk = lax.dynamic_slice_in_dim(q, i * st.bq, st.bq, axis=1)
                do_blk = lax.dynamic_slice_in_dim(d_out, i * st.bq, st.bq, axis=1)
                lse_blk = lax.dynamic_slice_in_dim(lse_safe, i * st.bq, st.bq, axis=3)
                delta_blk = lax.dynamic_slice_in_dim(delta, i * st.bq, st.bq, axis=3)
                s = _logits(st, q_blk, k_blk, mask)
                p = jnp.where(mask[:, None, None], jnp.exp(s - lse_blk[..., None]), 0.0)
                dv_blk = dv_blk + jnp.einsum(
                    "bkgqs,bqkgd->bskd", p.astype(d_out.dtype), do_blk,
                    preferred_element_type=jnp.float32,
                )
                dp = jnp.einsum(
                    "bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32
                )
                ds = (p * (dp - delta_blk[..., None]) * jnp.float32(st.scale)).astype(q.dtype)
                dk_blk = dk_blk + jnp.einsum(
                    "bkgqs,bqkgd->bskd", ds, q_blk, preferred_element_type=jnp.float32
                )
                dq_blk = jnp.einsum(
                    "bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=jnp.float32
                )
                prev = lax.dynamic_slice_in_dim(dq, i * st.bq, st.bq, axis=1)
                dq = lax.dynamic_update_slice_in_dim(dq, prev + dq_blk, i * st.bq, axis=1)
                return dq, dk_blk, dv_blk

            return lax.cond(jnp.any(mask), update, lambda c: c, inner)

        zeros = jnp.zeros((b, st.bk, kh, d), jnp.float32)
        dq, dk_blk, dv_blk = lax.fori_loop(
            _first_q_block(st, j), _last_q_block(st, j, nq), q_step, (dq, zeros, zeros)
        )
        dk = lax.dynamic_update_slice_in_dim(dk, dk_blk, j * st.bk, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_blk, j * st.bk, axis=1)
        return dq, dk, dv

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    dq, dk, dv = lax.fori_loop(0, nk, kv_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
