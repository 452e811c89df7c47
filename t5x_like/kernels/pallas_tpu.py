"""Flash attention as a Pallas TPU (Mosaic) kernel, forward and backward.

Registered as ``implementation="pallas_tpu"`` (and reached through ``"pallas"`` on a
TPU or, with ``interpret=True``, on CPU). Semantics are those of
``t5x_like.kernels.attention``: top-left causal, sliding window, segment ids,
zeros (and zero gradients) for rows that see no key. The algorithm is the one of
``kernels/chunked.py`` laid onto a Pallas grid:

* **Forward**: grid ``(batch, heads, q blocks, kv blocks)``, the kv axis innermost
  and sequential; an online softmax keeps ``m``, ``l`` and the output accumulator in
  VMEM scratch and writes the output and the per-row logsumexp once per q block.
* **Backward** (``jax.custom_vjp``, logsumexp saved): two kernels that recompute the
  block probabilities from the logsumexp: a dq kernel (grid like the forward, kv
  innermost) and a dk/dv kernel (grid ``(batch, kv_heads, kv blocks, groups, q
  blocks)``). Two kernels rather than one fused: a fused kernel must add every
  (q, kv) block's dq contribution into an output block that other grid steps own,
  which a TPU grid cannot do without atomics or a ``[kv blocks, q_len, d]`` partial
  buffer; split, each kernel reduces along its innermost grid axes into VMEM and
  writes its output once. The price is computing ``q k^T`` and ``exp`` twice.
* **GQA** without copies: the kv BlockSpecs index kv head ``h // groups``, and the
  dk/dv grid walks a kv head's query heads as a reduction axis, so dk/dv come out
  per kv head with no sum over repeats.
* **Block skipping**: a block no query of the q block can see (the causal upper
  triangle, outside the window, disjoint segment id ranges, padding) is not
  computed: per q block the first / last visible kv block (and per kv block the
  first / last visible q block) plus per-block min / max segment ids go to SMEM by
  scalar prefetch, and ``pl.when`` gates the compute. The index maps clamp the kv
  (resp. q) block index into that first..last range, so a skipped step asks for
  the block already resident (or the next one needed) and the pipeline issues no
  DMA for it (splash attention's trick, here with O(blocks) SMEM instead of a
  per-block table). Blocks inside the range that are invisible (a gap between
  documents of unsorted ids) are still fetched but not computed.
* **Mask only where needed**: a block whose pairs are all visible (inside the
  causal / window band, no padding, one segment id on both sides) runs without
  building the element mask.

Layout: q, k, v are transposed to ``[batch, heads, length, head_dim]`` (one HBM pass
each way) because a TPU block's last two dims must be (sublane, lane) tiles, and
the ``[b, T, H, d]`` layout would put a squeezed heads axis in the second-minor
place. Lengths are padded up to the block size and the padding masked. Segment ids
and the logsumexp travel lane- / sublane-broadcast (``[.., T, 128]`` /
``[.., 8, T]``) as the TPU vector layout wants.

Real-TPU constraints (checked when not interpreting): ``block_q`` a multiple of 8
and ``block_k`` a multiple of 128 (or the whole padded length). Defaults 512 / 512
(clamped to the rounded-up lengths) suit v4/v5 with head_dim <= 256. In interpret
mode (``interpret=True``, how the CPU tests run it) any block size works. This
kernel has been tested in interpret mode and jit-lowered for a TPU (as a v5e) on the
CPU host, which runs Pallas's Mosaic TPU lowering and its block-shape rules; Mosaic's
compiler in libtpu has not seen it, nor has a TPU run it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from t5x_like.kernels import attention, compile_target
from t5x_like.kernels import flash_blocks as fb

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
NUM_LANES = 128
NUM_SUBLANES = 8


# ----------------------------------------------------------------- static config


def _block_sizes(spec: attention.AttentionSpec, on_tpu: bool) -> tuple[int, int]:
    """``spec.block_sizes`` clamped to the lengths, or TPU-friendly defaults.

    Defaults round the lengths up to the TPU tile (8 rows, 128 lanes) so a short
    sequence still gets a legal block; user blocks are taken as given (tests use
    tiny ones in interpret mode) but must be tile-aligned on a real TPU.
    """
    if spec.block_sizes is None:
        bq = min(DEFAULT_BLOCK_Q, fb.round_up(spec.q_len, NUM_SUBLANES))
        bk = min(DEFAULT_BLOCK_K, fb.round_up(spec.kv_len, NUM_LANES))
        return bq, bk
    bq, bk = min(spec.block_sizes[0], spec.q_len), min(spec.block_sizes[1], spec.kv_len)
    if on_tpu and (
        (bq % NUM_SUBLANES and bq != spec.q_len) or (bk % NUM_LANES and bk != spec.kv_len)
    ):
        raise ValueError(
            f"implementation='pallas_tpu' on a TPU needs block_q % {NUM_SUBLANES} == 0 and "
            f"block_k % {NUM_LANES} == 0 (or a block covering the whole length); got "
            f"block_sizes={spec.block_sizes} for q_len={spec.q_len}, kv_len={spec.kv_len}"
        )
    return bq, bk


def _when_block_runs(cfg: fb.FlashConfig, meta: fb.BlockMeta, b, i, j, step):
    """Runs ``step(masked)`` for a visible block: unmasked when it is full, else masked."""
    runs = fb.block_runs(cfg, meta, b, i, j)
    full = fb.block_full(cfg, meta, b, i, j)
    pl.when(runs & full)(lambda: step(False))
    pl.when(runs & jnp.logical_not(full))(lambda: step(True))


def _element_mask(cfg: fb.FlashConfig, i, j, qs_ref, ks_ref):
    """``[bq, bk]`` visibility inside a block pair (only for blocks that are not full)."""
    shape = (cfg.bq, cfg.bk)
    rows = i * cfg.bq + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * cfg.bk + lax.broadcasted_iota(jnp.int32, shape, 1)
    if not cfg.segmented:
        return fb.element_mask(cfg, rows, cols)
    return fb.element_mask(cfg, rows, cols, qs_ref[:, :1], ks_ref[:1, :])


def _mxu(a, b, a_axis: int, b_axis: int):
    """``a`` and ``b`` contracted over one axis each, fp32 accumulation. 16-bit
    operands say ``Precision.DEFAULT`` outright: under
    ``jax_default_matmul_precision="highest"`` (common in tests and evals) Mosaic
    would get an fp32 contract precision for bf16 operands and refuse ("Bad lhs
    type"); their products are exact in fp32 anyway. fp32 operands follow the config."""
    precision = lax.Precision.DEFAULT if a.dtype.itemsize == 2 else None
    return lax.dot_general(
        a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )


def _logits(cfg: fb.FlashConfig, q, k, mask):
    """``q k^T * scale`` in fp32 ``[bq, bk]``; -inf where masked."""
    s = _mxu(q, k, 1, 1)
    s = s * jnp.float32(cfg.scale)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _lanes(col: jax.Array) -> jax.Array:
    """A ``[rows, 1]`` column broadcast over the 128 lanes of a row-stat buffer."""
    return jnp.broadcast_to(col, (col.shape[0], NUM_LANES))


# ------------------------------------------------------------------ forward


def _fwd_kernel(cfg: fb.FlashConfig, *refs):
    meta, (q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref) = (
        fb.BlockMeta(*refs[:8]), refs[8:]
    )
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
        mask = _element_mask(cfg, i, j, qs_ref, ks_ref) if masked else None
        s = _logits(cfg, q_ref[...], k_ref[...], mask)
        m_prev, l_prev = m_ref[:, :1], l_ref[:, :1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        # A row that has seen nothing yet keeps m = -inf: shift by 0 so exp gives zeros.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - shift)
        rescale = jnp.exp(m_prev - shift)
        l_ref[...] = _lanes(l_prev * rescale + p.sum(axis=1, keepdims=True))
        m_ref[...] = _lanes(m_new)
        pv = _mxu(p.astype(v_ref.dtype), v_ref[...], 1, 0)
        acc_ref[...] = acc_ref[...] * rescale + pv

    _when_block_runs(cfg, meta, b, i, j, step)

    @pl.when(j == cfg.nk - 1)
    def _finish():
        l = l_ref[:, :1]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = _lanes(jnp.where(seen, m_ref[:, :1] + jnp.log(l_safe), -jnp.inf))


def _forward(cfg: fb.FlashConfig, q, k, v, qs, ks, meta: fb.BlockMeta):
    """q ``[b, H, Tq, d]``, k/v ``[b, K, Tk, d]`` (padded) → out (q dtype), lse ``[b, H, Tq]``."""
    batch, heads, tq, d = q.shape
    q_spec, kv_spec, segment_specs = _query_major_specs(cfg, d)
    in_specs = [q_spec, kv_spec, kv_spec] + segment_specs
    lse_spec = pl.BlockSpec((None, None, cfg.bq, NUM_LANES), lambda b, h, i, j, *m: (b, h, i, 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(batch, heads, cfg.nq, cfg.nk),
            in_specs=in_specs,
            out_specs=[q_spec, lse_spec],
            scratch_shapes=[
                pltpu.VMEM((cfg.bq, d), jnp.float32),
                pltpu.VMEM((cfg.bq, NUM_LANES), jnp.float32),
                pltpu.VMEM((cfg.bq, NUM_LANES), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, tq, NUM_LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="t5x_like_flash_fwd",
    )(*meta, q, k, v, qs, ks)
    return out, lse[..., 0]


def _query_major_specs(cfg: fb.FlashConfig, d: int):
    """``(q, k/v, segment-id specs)`` of the grid (batch, heads, q block i, kv block j) that
    the forward and dq kernels share: GQA through ``h // groups``, and the kv block index
    clamped to the row's visible range so a skipped step re-asks for a loaded block."""

    def kv_block(b, h, i, j, *m):
        meta = fb.BlockMeta(*m)
        r = b * cfg.nq + i
        return fb.clamp(j, meta.row_lo[r], meta.row_hi[r])

    q_spec = pl.BlockSpec((None, None, cfg.bq, d), lambda b, h, i, j, *m: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, cfg.bk, d),
        lambda b, h, i, j, *m: (b, h // cfg.groups, kv_block(b, h, i, j, *m), 0),
    )
    segment_specs = _segment_specs(
        cfg,
        q_index=lambda b, h, i, j, *m: (b, i, 0),
        kv_index=lambda b, h, i, j, *m: (b, 0, kv_block(b, h, i, j, *m)),
    )
    return q_spec, kv_spec, segment_specs


def _segment_specs(cfg: fb.FlashConfig, q_index, kv_index) -> list:
    """BlockSpecs of the lane-broadcast q ids ``[b, Tq, 128]`` and sublane-broadcast kv
    ids ``[b, 8, Tk]`` (None, None without segment ids)."""
    if not cfg.segmented:
        return [None, None]
    return [
        pl.BlockSpec((None, cfg.bq, NUM_LANES), q_index),
        pl.BlockSpec((None, NUM_SUBLANES, cfg.bk), kv_index),
    ]


# ------------------------------------------------------------------ backward


def _probabilities(cfg: fb.FlashConfig, q, k, lse, mask):
    """Block probabilities recomputed from the saved logsumexp (masked entries: exp(-inf) = 0)."""
    return jnp.exp(_logits(cfg, q, k, mask) - lse)


def _dq_kernel(cfg: fb.FlashConfig, *refs):
    meta = fb.BlockMeta(*refs[:8])
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref, acc_ref = refs[8:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
        mask = _element_mask(cfg, i, j, qs_ref, ks_ref) if masked else None
        k = k_ref[...]
        p = _probabilities(cfg, q_ref[...], k, lse_ref[:, :1], mask)
        dp = _mxu(do_ref[...], v_ref[...], 1, 1)
        ds = p * (dp - delta_ref[:, :1]) * jnp.float32(cfg.scale)
        acc_ref[...] += _mxu(ds.astype(k.dtype), k, 1, 0)

    _when_block_runs(cfg, meta, b, i, j, step)

    @pl.when(j == cfg.nk - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(cfg: fb.FlashConfig, *refs):
    meta = fb.BlockMeta(*refs[:8])
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
     dk_ref, dv_ref, dk_acc, dv_acc) = refs[8:]
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
        mask = _element_mask(cfg, i, j, qs_ref, ks_ref) if masked else None
        q, do = q_ref[...], do_ref[...]
        p = _probabilities(cfg, q, k_ref[...], lse_ref[:, :1], mask)
        dv_acc[...] += _mxu(p.astype(do.dtype), do, 0, 0)
        dp = _mxu(do, v_ref[...], 1, 1)
        ds = p * (dp - delta_ref[:, :1]) * jnp.float32(cfg.scale)
        dk_acc[...] += _mxu(ds.astype(q.dtype), q, 0, 0)

    _when_block_runs(cfg, meta, b, i, j, step)

    @pl.when((g == cfg.groups - 1) & (i == cfg.nq - 1))
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward_dq(cfg: fb.FlashConfig, q, k, v, do, lse, delta, qs, ks, meta: fb.BlockMeta):
    batch, heads, _, d = q.shape
    q_spec, kv_spec, segment_specs = _query_major_specs(cfg, d)
    row_spec = pl.BlockSpec((None, None, cfg.bq, NUM_LANES), lambda b, h, i, j, *m: (b, h, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + segment_specs
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(batch, heads, cfg.nq, cfg.nk),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((cfg.bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="t5x_like_flash_dq",
    )(*meta, q, k, v, do, lse, delta, qs, ks)


def _backward_dkv(cfg: fb.FlashConfig, q, k, v, do, lse, delta, qs, ks, meta: fb.BlockMeta):
    batch, kv_heads, _, d = k.shape
    g = cfg.groups

    def q_block(b, kh, j, gi, i, *m):
        meta = fb.BlockMeta(*m)
        c = b * cfg.nk + j
        return fb.clamp(i, meta.col_lo[c], meta.col_hi[c])

    def q_index(b, kh, j, gi, i, *m):
        return (b, kh * g + gi, q_block(b, kh, j, gi, i, *m), 0)

    q_spec = pl.BlockSpec((None, None, cfg.bq, d), q_index)
    row_spec = pl.BlockSpec((None, None, cfg.bq, NUM_LANES), q_index)
    kv_spec = pl.BlockSpec((None, None, cfg.bk, d), lambda b, kh, j, gi, i, *m: (b, kh, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + _segment_specs(
        cfg,
        q_index=lambda b, kh, j, gi, i, *m: (b, q_block(b, kh, j, gi, i, *m), 0),
        kv_index=lambda b, kh, j, gi, i, *m: (b, 0, j),
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(batch, kv_heads, cfg.nk, g, cfg.nq),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[
                pltpu.VMEM((cfg.bk, d), jnp.float32),
                pltpu.VMEM((cfg.bk, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="t5x_like_flash_dkv",
    )(*meta, q, k, v, do, lse, delta, qs, ks)


# ------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: fb.FlashConfig, q, k, v, qs, ks, meta: fb.BlockMeta):
    return _forward(cfg, q, k, v, qs, ks, meta)[0]


def _flash_fwd(cfg: fb.FlashConfig, q, k, v, qs, ks, meta: fb.BlockMeta):
    out, lse = _forward(cfg, q, k, v, qs, ks, meta)
    return out, (q, k, v, qs, ks, meta, out, lse)


def _flash_bwd(cfg: fb.FlashConfig, residuals, d_out):
    q, k, v, qs, ks, meta, out, lse = residuals
    lse, delta = fb.backward_row_terms(d_out, out, lse)
    lse_lanes, delta_lanes = (
        jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES)) for x in (lse, delta)
    )
    args = (q, k, v, d_out.astype(q.dtype), lse_lanes, delta_lanes, qs, ks, meta)
    dq = _backward_dq(cfg, *args)
    dk, dv = _backward_dkv(cfg, *args)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------ entry point


@attention.register("pallas_tpu", per_device=True)
def pallas_tpu_attention(
    q, k, v, q_segment_ids, kv_segment_ids, spec: attention.AttentionSpec, *, interpret
):
    """The ``attention.Backend`` for TPUs (and CPU with ``interpret=True``)."""
    fb.check_platform("pallas_tpu", "tpu", "TPUs", interpret)
    bq, bk = _block_sizes(spec, on_tpu=compile_target.platform() == "tpu" and not interpret)
    cfg, qt, kt, vt, qs, ks, meta = fb.prepare(
        spec, q, k, v, q_segment_ids, kv_segment_ids, bq, bk, interpret
    )
    if cfg.segmented:
        qs = jnp.broadcast_to(qs[:, :, None], (*qs.shape, NUM_LANES))
        ks = jnp.broadcast_to(ks[:, None, :], (ks.shape[0], NUM_SUBLANES, ks.shape[1]))
    return fb.tokens_major(_flash(cfg, qt, kt, vt, qs, ks, meta), spec.q_len)


__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_Q", "pallas_tpu_attention"]
