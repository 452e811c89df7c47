"""The Pallas TPU flash-attention kernel, in interpret mode on CPU, against the float64
reference of test_attention.py; plus proofs that skipped blocks are really skipped."""

import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import (
    assert_blind_rows_are_zero,
    assert_matches,
    attend_and_grads,
    packed_segments,
    random_inputs,
    reference,
    run_kernel_case,
)

from t5x_like.kernels import attention, flash_blocks
from t5x_like.kernels.attention import AttentionSpec, dot_product_attention

IMPLEMENTATION = "pallas"

pallas_tpu = pytest.importorskip("t5x_like.kernels.pallas_tpu")


# Small blocks so every case crosses block edges; lengths mostly not multiples of them.
CASES = [
    # name, b, tq, tk, h, kh, d, causal, docs, window, blocks
    ("mha-causal-len37", 2, 37, 37, 2, 2, 64, True, None, None, (16, 16)),
    ("gqa-8:1-len40", 1, 40, 40, 8, 1, 64, False, None, None, (16, 16)),
    ("gqa-4:1-packed-8-docs-causal", 2, 64, 64, 4, 1, 64, True, 8, None, (16, 16)),
    ("packed-padded-bidir-d128", 2, 48, 48, 2, 2, 128, False, 5, None, (16, 32)),
    ("q<kv-gqa-2:1", 2, 20, 45, 4, 2, 64, False, None, None, (8, 16)),
    ("q>kv-causal", 1, 45, 19, 2, 1, 64, True, None, None, (16, 8)),
    ("causal-window9-len50", 1, 50, 50, 2, 1, 64, True, None, 9, (16, 16)),
    ("packed-bidir-window6", 1, 40, 40, 2, 2, 64, False, 4, 6, (8, 8)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_forward_and_gradients(case):
    got, want = run_kernel_case(IMPLEMENTATION, case, jnp.float32)
    assert all(g.dtype == jnp.float32 for g in got)
    assert_matches(got, want, 1e-5, case[0])


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=lambda c: c[0])
def test_bf16_forward_and_gradients(case):
    got, want = run_kernel_case(IMPLEMENTATION, case, jnp.bfloat16, seed=1)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    assert_matches(got, want, 2e-2, case[0])


def test_head_dim_256_forward_and_gradients():
    case = ("gqa-2:1-packed-d256", 1, 40, 40, 4, 2, 256, True, 3, None, (16, 16))
    got, want = run_kernel_case(IMPLEMENTATION, case, jnp.float32, seed=5)
    assert_matches(got, want, 1e-5, case[0])


def test_default_blocks_pad_a_short_sequence():
    """No block_sizes: TPU-shaped defaults (8-row / 128-lane tiles) on a 21-token input."""
    rng = np.random.default_rng(6)
    q, k, v, d_out = random_inputs(rng, 1, 21, 21, 2, 1, 64, jnp.float32)
    got = attend_and_grads(q, k, v, d_out, implementation=IMPLEMENTATION, causal=True)
    assert_matches(got, reference(q, k, v, None, None, True, d_out), 1e-5, "default blocks")


# ------------------------------------------------------- rows that see no key


def test_query_ids_missing_on_the_kv_side_give_zeros():
    rng = np.random.default_rng(2)
    q, k, v, d_out = random_inputs(rng, 1, 32, 24, 2, 1, 64, jnp.float32)
    q_seg = jnp.asarray([[1] * 6 + [9] * 18 + [2] * 8], jnp.int32)  # id 9 has no keys
    kv_seg = jnp.asarray([[1] * 12 + [2] * 12], jnp.int32)
    got = attend_and_grads(
        q, k, v, d_out, implementation=IMPLEMENTATION,
        q_seg=q_seg, kv_seg=kv_seg, block_sizes=(8, 8))
    want = reference(q, k, v, q_seg, kv_seg, False, d_out)
    assert_blind_rows_are_zero(got, want, slice(6, 24))


def test_queries_past_the_window_give_zeros():
    """Causal, q_len > kv_len + window: the last queries' windows hold no key."""
    rng = np.random.default_rng(3)
    q, k, v, d_out = random_inputs(rng, 2, 45, 19, 2, 1, 64, jnp.float32)
    got = attend_and_grads(
        q, k, v, d_out, implementation=IMPLEMENTATION,
        causal=True, sliding_window=6, block_sizes=(16, 8))
    want = reference(q, k, v, None, None, True, d_out, 6)
    assert_blind_rows_are_zero(got, want, slice(19 + 6 - 1, 45))


# --------------------------------------------------------------- block skipping


def test_nan_in_blocks_nobody_sees_never_reaches_the_result():
    """NaN in k/v blocks no query can see (a kv-only document; keys past the causal
    reach) and in q blocks that see nothing: had the kernels read or computed those
    blocks, NaN would leak (0 * NaN) into out / dq / dk / dv."""
    rng = np.random.default_rng(4)
    q, k, v, d_out = random_inputs(rng, 1, 48, 80, 2, 1, 64, jnp.float32)
    q_seg = jnp.asarray([[1] * 16 + [5] * 16 + [2] * 16], jnp.int32)  # id 5: no keys
    kv_seg = jnp.asarray([[1] * 16 + [7] * 16 + [2] * 48], jnp.int32)  # id 7: no queries
    want = reference(q, k, v, q_seg, kv_seg, True, d_out)
    poisoned = (slice(16, 32), slice(48, 80))  # kv block 1 (id 7); kv blocks 3, 4 (j > 47)
    k_bad, v_bad = k, v
    for rows in poisoned:
        k_bad = k_bad.at[:, rows].set(jnp.nan)
        v_bad = v_bad.at[:, rows].set(jnp.nan)
    q_bad = q.at[:, 16:32].set(jnp.nan)  # q block 1 (id 5) sees nothing
    got = attend_and_grads(
        q_bad, k_bad, v_bad, d_out, implementation=IMPLEMENTATION,
        q_seg=q_seg, kv_seg=kv_seg, causal=True,
        block_sizes=(16, 16),
    )
    for x in got:
        assert np.all(np.isfinite(np.asarray(x))), "a skipped block was read"
    for rows in poisoned:
        assert np.all(np.asarray(got[2])[:, rows] == 0) and np.all(np.asarray(got[3])[:, rows] == 0)
    # The poisoned rows' true gradients are zero, so the reference of the clean inputs holds.
    assert_matches(got, want, 1e-5, "poisoned")


def dense_block_visibility(cfg, q_seg, kv_seg):
    """[b, nq, nk]: whether any (query, key) pair of the two blocks is visible (numpy)."""
    window = cfg.window
    mask = np.ones((cfg.q_len, cfg.kv_len), bool)
    i, j = np.arange(cfg.q_len)[:, None], np.arange(cfg.kv_len)[None]
    if cfg.causal:
        mask &= j <= i
    if window is not None:
        mask &= np.abs(i - j) < window
    mask = mask[None] & (q_seg[:, :, None] == kv_seg[:, None, :])
    padded = np.zeros((len(q_seg), cfg.nq * cfg.bq, cfg.nk * cfg.bk), bool)
    padded[:, : cfg.q_len, : cfg.kv_len] = mask
    blocks = padded.reshape(len(q_seg), cfg.nq, cfg.bq, cfg.nk, cfg.bk)
    return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


@pytest.mark.parametrize(
    "causal, window, tq, tk, blocks, docs",
    [
        (True, None, 64, 64, (8, 8), 8),
        (False, None, 50, 50, (16, 8), 5),
        (True, 10, 72, 72, (8, 16), 4),
        (False, 7, 45, 45, (8, 8), 1),
        (True, None, 70, 30, (16, 8), 1),
    ],
)
def test_exactly_the_visible_blocks_run_and_only_they_are_fetched(
    causal, window, tq, tk, blocks, docs
):
    """The in-kernel predicates and the index-map clamp, evaluated on the block metadata:
    a block runs iff some pair in it is visible; a block runs unmasked only when every
    pair is; and with sorted (packed) ids the clamped index maps fetch only visible
    blocks, so skipped steps cost no DMA."""
    rng = np.random.default_rng(7)
    b = 3
    q_seg = packed_segments(rng, b, tq, docs)
    kv_seg = q_seg if tq == tk else np.ones((b, tk), np.int32)
    spec = AttentionSpec(b, tq, tk, 2, 1, 16, causal, 1.0, blocks, window)
    bq, bk = pallas_tpu._block_sizes(spec, on_tpu=False)
    cfg = flash_blocks.FlashConfig(
        causal=causal, window=window, scale=1.0, q_len=tq, kv_len=tk, bq=bq, bk=bk,
        groups=2, segmented=True, interpret=True,
    )
    qs = flash_blocks.edge_pad(jnp.asarray(q_seg), cfg.nq * bq - tq)
    ks = flash_blocks.edge_pad(jnp.asarray(kv_seg), cfg.nk * bk - tk)
    meta = flash_blocks.block_meta(cfg, b, qs, ks)
    visible, full = dense_block_visibility(cfg, q_seg, kv_seg)
    for r in range(b):
        for i in range(cfg.nq):
            for j in range(cfg.nk):
                runs = bool(flash_blocks.block_runs(cfg, meta, r, i, j))
                unmasked = runs and bool(flash_blocks.block_full(cfg, meta, r, i, j))
                assert runs == visible[r, i, j], (r, i, j)
                assert not unmasked or full[r, i, j], (r, i, j)
            row = r * cfg.nq + i
            fetched = {int(flash_blocks.clamp(j, meta.row_lo[row], meta.row_hi[row]))
                       for j in range(cfg.nk)}
            if visible[r, i].any():
                assert fetched == set(np.flatnonzero(visible[r, i])), (r, i)
        for j in range(cfg.nk):
            col = r * cfg.nk + j
            fetched = {int(flash_blocks.clamp(i, meta.col_lo[col], meta.col_hi[col]))
                       for i in range(cfg.nq)}
            if visible[r, :, j].any():
                assert fetched == set(np.flatnonzero(visible[r, :, j])), (r, j)
    assert not visible.all()  # every layout here has blocks to skip
    if docs == 1 and window is None:
        assert full.any()  # and some blocks need no mask


# ------------------------------------------------------------ dispatch and errors


def test_pallas_dispatches_to_the_tpu_kernel_on_cpu():
    assert attention.IMPLEMENTATIONS["pallas_tpu"] is pallas_tpu.pallas_tpu_attention
    rng = np.random.default_rng(8)
    q, k, v, _ = random_inputs(rng, 1, 16, 16, 2, 1, 64, jnp.float32)
    outs = [
        dot_product_attention(q, k, v, causal=True, implementation=impl, interpret=True,
                              block_sizes=(8, 8))
        for impl in ("pallas", "pallas_tpu")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_pallas_on_cpu_without_interpret_says_what_to_do():
    q = jnp.ones((1, 8, 2, 64))
    with pytest.raises(ValueError, match="interpret=True"):
        dot_product_attention(q, q, q, implementation="pallas")


# Compiled by libtpu for v5e / v5p / v6e: tests/test_compile_targets.py.


def test_unaligned_blocks_are_refused_on_a_real_tpu():
    spec = AttentionSpec(1, 1024, 1024, 2, 2, 128, True, 1.0, (100, 64))
    with pytest.raises(ValueError, match="block_q % 8 == 0 and block_k % 128 == 0"):
        pallas_tpu._block_sizes(spec, on_tpu=True)
    defaults = dataclasses.replace(spec, block_sizes=None)
    assert pallas_tpu._block_sizes(defaults, on_tpu=True) == (512, 512)
    short = dataclasses.replace(defaults, q_len=21, kv_len=21)
    assert pallas_tpu._block_sizes(short, on_tpu=True) == (24, 128)  # 8-row, 128-lane tiles


def test_importing_attention_does_not_import_pallas():
    """The interpreter-heavy module stays off the default path (fresh interpreter)."""
    code = (
        "import sys, t5x_like.kernels.attention as a; "
        "assert 'pallas_tpu' in a.IMPLEMENTATIONS and 'pallas' in a.IMPLEMENTATIONS; "
        "assert 'pallas_gpu' in a.IMPLEMENTATIONS; "
        "assert 't5x_like.kernels.pallas_tpu' not in sys.modules; "
        "assert 't5x_like.kernels.pallas_gpu' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
