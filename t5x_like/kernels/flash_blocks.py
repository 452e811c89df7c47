"""Block bookkeeping shared by the flash-attention kernels (``pallas_tpu``, ``pallas_gpu``).

The static facts of one call (:class:`FlashConfig`), which (q block, kv block) pairs
can see each other by position and by segment-id range (:func:`block_meta`, computed
in plain JAX before the kernel), and the elementwise mask inside a block pair. The
in-kernel helpers take block indices as Python ints, jnp arrays or kernel scalars
alike, and index the :class:`BlockMeta` arrays whether they are jnp arrays or refs
(TPU SMEM after scalar prefetch, GPU GMEM).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from t5x_like.kernels import compile_target


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Everything static about one call (hashable: custom_vjp's nondiff argument)."""

    causal: bool
    window: int | None
    scale: float
    q_len: int  # real lengths; the arrays are padded to nq * bq and nk * bk
    kv_len: int
    bq: int
    bk: int
    groups: int
    segmented: bool
    interpret: bool

    @property
    def nq(self) -> int:
        return -(-self.q_len // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.kv_len // self.bk)

    @property
    def q_padded(self) -> bool:
        return self.nq * self.bq != self.q_len

    @property
    def kv_padded(self) -> bool:
        return self.nk * self.bk != self.kv_len



def round_up(n: int, m: int) -> int:
    return -(-n // m) * m



# ------------------------------------------------------------------ block visibility


def distance_bounds(cfg: FlashConfig) -> tuple[int | None, int | None]:
    """The allowed ``q_pos - kv_pos``: ``[lo, hi]``, None meaning unbounded."""
    lo = 0 if cfg.causal else None
    hi = None
    if cfg.window is not None:
        hi = cfg.window - 1
        lo = lo if lo is not None else -(cfg.window - 1)
    return lo, hi


def distance_range(cfg: FlashConfig, i, j):
    """Smallest and largest ``q_pos - kv_pos`` between the real rows of q block ``i``
    and the real keys of kv block ``j`` (padding excluded: it sees nothing)."""
    q_first = i * cfg.bq
    q_last = jnp.minimum(q_first + cfg.bq, cfg.q_len) - 1
    k_first = j * cfg.bk
    k_last = jnp.minimum(k_first + cfg.bk, cfg.kv_len) - 1
    return q_first - k_last, q_last - k_first


def block_sees_by_position(cfg: FlashConfig, i, j):
    """Whether some pair of the blocks is visible by position (segments aside).

    The distances form one contiguous integer interval, so the blocks see each
    other iff it meets the allowed interval.
    """
    dmin, dmax = distance_range(cfg, i, j)
    lo, hi = distance_bounds(cfg)
    sees = jnp.ones(jnp.shape(dmin), bool)
    if lo is not None:
        sees = sees & (dmax >= lo)
    if hi is not None:
        sees = sees & (dmin <= hi)
    return sees


def block_full_by_position(cfg: FlashConfig, i, j):
    """Whether every pair of the blocks is visible by position and none is padding."""
    dmin, dmax = distance_range(cfg, i, j)
    lo, hi = distance_bounds(cfg)
    full = jnp.ones(jnp.shape(dmin), bool)
    if lo is not None:
        full = full & (dmin >= lo)
    if hi is not None:
        full = full & (dmax <= hi)
    if cfg.q_padded:
        full = full & ((i + 1) * cfg.bq <= cfg.q_len)
    if cfg.kv_padded:
        full = full & ((j + 1) * cfg.bk <= cfg.kv_len)
    return full


class BlockMeta(NamedTuple):
    """Scalar-prefetched (SMEM) block facts, each 1-D: ``[batch * nq]`` or ``[batch * nk]``.

    ``row_lo..row_hi``: the visible kv blocks of a q block (empty: 0, -1);
    ``col_lo..col_hi``: the visible q blocks of a kv block; ``*_min/_max``: the
    segment id range of a block's real tokens (all 0 without segment ids).
    """

    row_lo: jax.Array
    row_hi: jax.Array
    col_lo: jax.Array
    col_hi: jax.Array
    q_min: jax.Array
    q_max: jax.Array
    kv_min: jax.Array
    kv_max: jax.Array


def block_meta(cfg: FlashConfig, batch: int, qs, ks) -> BlockMeta:
    """Per-block bounds from positions and segment-id ranges (plain JAX, O(nq * nk)).

    Two blocks whose id ranges are disjoint share no id, whatever the order of the
    ids, so skipping them is exact; for sorted (packed) ids it is also tight.
    """
    visible = block_sees_by_position(cfg, jnp.arange(cfg.nq)[:, None], jnp.arange(cfg.nk)[None])
    visible = jnp.broadcast_to(visible, (batch, cfg.nq, cfg.nk))
    if qs is None:
        q_min = q_max = jnp.zeros((batch, cfg.nq), jnp.int32)
        kv_min = kv_max = jnp.zeros((batch, cfg.nk), jnp.int32)
    else:
        q_min, q_max = id_ranges(qs, cfg.bq)
        kv_min, kv_max = id_ranges(ks, cfg.bk)
        visible = (
            visible
            & (q_min[:, :, None] <= kv_max[:, None, :])
            & (kv_min[:, None, :] <= q_max[:, :, None])
        )
    row_lo, row_hi = first_last(visible, axis=2)
    col_lo, col_hi = first_last(visible, axis=1)
    flat = (row_lo, row_hi, col_lo, col_hi, q_min, q_max, kv_min, kv_max)
    return BlockMeta(*(x.reshape(-1).astype(jnp.int32) for x in flat))


def id_ranges(ids: jax.Array, block: int):
    """Min and max id per block, ``[batch, n]``; ids are edge-padded, so padding adds
    no new id."""
    blocks = ids.reshape(ids.shape[0], -1, block)
    return blocks.min(axis=2), blocks.max(axis=2)


def first_last(visible: jax.Array, axis: int):
    """First and last True index along ``axis``; ``(0, -1)`` where there is none."""
    n = visible.shape[axis]
    idx = lax.broadcasted_iota(jnp.int32, visible.shape, axis)
    last = jnp.max(jnp.where(visible, idx, -1), axis=axis)
    first = jnp.min(jnp.where(visible, idx, n), axis=axis)
    return jnp.where(last >= 0, first, 0), last


def clamp(x, lo, hi):
    """``x`` clamped into ``[lo, hi]``; an empty range (hi < lo) gives lo."""
    return jnp.minimum(jnp.maximum(x, lo), jnp.maximum(hi, lo))


def block_runs(cfg: FlashConfig, meta: BlockMeta, b, i, j):
    """In-kernel: whether q block i and kv block j of batch row b share a visible pair."""
    r, c = b * cfg.nq + i, b * cfg.nk + j
    in_band = (meta.row_lo[r] <= j) & (j <= meta.row_hi[r])
    ids_meet = (meta.q_min[r] <= meta.kv_max[c]) & (meta.kv_min[c] <= meta.q_max[r])
    return in_band & ids_meet


def block_full(cfg: FlashConfig, meta: BlockMeta, b, i, j):
    """In-kernel: whether every pair of the blocks is visible (no element mask needed)."""
    r, c = b * cfg.nq + i, b * cfg.nk + j
    one_id = (
        (meta.q_min[r] == meta.q_max[r])
        & (meta.kv_min[c] == meta.kv_max[c])
        & (meta.q_min[r] == meta.kv_min[c])
    )
    return block_full_by_position(cfg, i, j) & one_id



def element_mask(cfg: FlashConfig, q_pos, kv_pos, q_ids=None, kv_ids=None):
    """Visibility of each (query, key) pair of a block pair, elementwise.

    ``q_pos`` / ``kv_pos``: absolute positions, any (equal) shape, so a kernel can build
    them in its own register layout or orientation; ``q_ids`` / ``kv_ids``: segment ids
    broadcast to the same shape (only read when ``cfg.segmented``).
    """
    mask = jnp.ones(jnp.shape(q_pos), bool)
    if cfg.q_padded:
        mask = mask & (q_pos < cfg.q_len)
    if cfg.kv_padded:
        mask = mask & (kv_pos < cfg.kv_len)
    lo, hi = distance_bounds(cfg)
    if lo is not None:
        mask = mask & (q_pos - kv_pos >= lo)
    if hi is not None:
        mask = mask & (q_pos - kv_pos <= hi)
    if cfg.segmented:
        mask = mask & (q_ids == kv_ids)
    return mask


def edge_pad(ids: jax.Array, pad: int) -> jax.Array:
    """Pads ids with their last value, so per-block id ranges stay those of real tokens."""
    return jnp.pad(ids, ((0, 0), (0, pad)), mode="edge") if pad else ids


def heads_major(x: jax.Array, pad: int) -> jax.Array:
    """``[b, T, H, d]`` → ``[b, H, T + pad, d]`` (zeros in the padding)."""
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)


# ------------------------------------------------------------------ host-side glue


def prepare(spec, q, k, v, q_segment_ids, kv_segment_ids, bq: int, bk: int, interpret: bool):
    """What both kernels start from: the config, q / k / v heads-major and zero-padded
    to whole blocks, segment ids edge-padded (None without them), and the block meta.

    ``spec`` is the entry point's ``AttentionSpec`` (not imported: kernels/attention
    imports this package's modules lazily).
    """
    cfg = FlashConfig(
        causal=spec.causal, window=spec.sliding_window, scale=spec.scale,
        q_len=spec.q_len, kv_len=spec.kv_len, bq=bq, bk=bk, groups=spec.groups,
        segmented=q_segment_ids is not None, interpret=bool(interpret),
    )
    q_pad, kv_pad = cfg.nq * bq - spec.q_len, cfg.nk * bk - spec.kv_len
    qh, kh, vh = (heads_major(x, pad) for x, pad in ((q, q_pad), (k, kv_pad), (v, kv_pad)))
    qs = ks = None
    if cfg.segmented:
        qs = edge_pad(q_segment_ids.astype(jnp.int32), q_pad)
        ks = edge_pad(kv_segment_ids.astype(jnp.int32), kv_pad)
    return cfg, qh, kh, vh, qs, ks, block_meta(cfg, spec.batch, qs, ks)


def backward_row_terms(d_out, out, lse):
    """The backward's per-query-row terms from the forward's residuals: ``delta_i =
    sum_d dO_i O_i`` (the softmax Jacobian's row term) and the logsumexp with rows that
    saw nothing (lse = -inf, every logit -inf) shifted by 0, so p = exp(-inf) = 0 there."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    return jnp.where(jnp.isfinite(lse), lse, 0.0), delta


def check_platform(implementation: str, platform: str, hardware: str, interpret: bool) -> None:
    """A kernel compiled only for ``platform`` ("gpu", "tpu"): elsewhere it needs the
    interpreter. The target is the mesh's chip (``compile_target``), so a TPU
    topology or deviceless H100s on a CPU host compile the real kernel."""
    target = compile_target.platform()
    if target != platform and not interpret:
        raise ValueError(
            f"implementation={implementation!r} compiles only for {hardware} (this call "
            f"compiles for {target!r}: the mesh's devices, else jax's default backend); pass "
            "interpret=True to run it in the Pallas interpreter"
        )


def tokens_major(out: jax.Array, q_len: int) -> jax.Array:
    """A kernel's heads-major, padded ``[b, H, T, d]`` output back to ``[b, q_len, H, d]``."""
    return out.transpose(0, 2, 1, 3)[:, :q_len]
