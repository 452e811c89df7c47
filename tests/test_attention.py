"""Every attention implementation against a float64 numpy reference written here."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.kernels import chunked
from t5x_like.kernels.attention import (
    IMPLEMENTATIONS,
    AttentionSpec,
    dot_product_attention,
    flops,
)

CPU_IMPLEMENTATIONS = ["xla", "chunked"]
# Small blocks so that the blockwise backend crosses many block boundaries.
BLOCKS = {"xla": None, "chunked": (8, 16)}


# ------------------------------------------------------------ float64 reference


def position_mask(tq, tk, causal, window=None):
    """[tq, tk] visibility by position: causal j <= i; window i - w < j (and j - w < i
    without causal), as Hugging Face's Mistral sliding-window mask."""
    i = np.arange(tq)[:, None]
    j = np.arange(tk)[None, :]
    mask = np.ones((tq, tk), bool)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= i - window < j
        if not causal:
            mask &= j - window < i
    return mask


def reference(q, k, v, q_seg, kv_seg, causal, d_out, window=None):
    """Attention and its gradients in float64, dense and direct (no tricks).

    Returns out, dq, dk, dv for the loss sum(out * d_out).
    """
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    b, tq, h, d = q.shape
    tk, kh = k.shape[1], k.shape[2]
    g = h // kh
    scale = 1.0 / np.sqrt(d)
    # Expand kv heads per query head (fine in a reference).
    ke = np.repeat(k, g, axis=2)
    ve = np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    mask = np.broadcast_to(position_mask(tq, tk, causal, window), (b, tq, tk)).copy()
    if q_seg is not None:
        mask &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    mask = mask[:, None]
    s = np.where(mask, s, -np.inf)
    row_max = s.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(mask, np.exp(s - row_max), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = e / np.where(denom == 0, 1.0, denom)
    out = np.einsum("bhqk,bkhd->bqhd", p, ve)
    # Backward.
    dv_e = np.einsum("bhqk,bqhd->bkhd", p, d_out)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, ve)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk_e = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dk = dk_e.reshape(b, tk, kh, g, d).sum(3)
    dv = dv_e.reshape(b, tk, kh, g, d).sum(3)
    return out, dq, dk, dv


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    scale = np.max(np.abs(want))
    assert scale > 0, "reference is all zeros: the test would be vacuous"
    return np.max(np.abs(got - want)) / scale


def packed_segments(rng, batch, length, max_docs, one_token=True, pad=0):
    """Sorted segment ids with 1..max_docs documents, one-token docs, trailing padding."""
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        n_docs = rng.integers(1, max_docs + 1)
        usable = length - pad
        cuts = np.sort(rng.choice(np.arange(1, usable), size=n_docs - 1, replace=False))
        if one_token and n_docs >= 3:
            cuts[1] = cuts[0] + 1  # force a one-token document
            cuts = np.unique(np.clip(cuts, 1, usable - 1))
        bounds = np.concatenate([[0], cuts, [usable]])
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            ids[row, lo:hi] = doc + 1
        ids[row, usable:] = 0  # padding: its own id
    return ids


def random_inputs(rng, b, tq, tk, h, kh, d, dtype):
    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return arr(b, tq, h, d), arr(b, tk, kh, d), arr(b, tk, kh, d), arr(b, tq, h, d)


CASES = [
    # name, b, tq, tk, h, kh, d, causal, segments
    ("mha", 2, 33, 33, 4, 4, 16, False, None),
    ("mha-causal", 2, 33, 33, 4, 4, 16, True, None),
    ("gqa-4:1-causal", 2, 40, 40, 8, 2, 16, True, None),
    ("gqa-8:1", 1, 24, 24, 8, 1, 32, False, None),
    ("q!=kv", 2, 17, 45, 4, 2, 16, False, None),
    ("q!=kv-causal", 2, 45, 19, 4, 2, 16, True, None),
    ("packed-8-docs-causal", 2, 64, 64, 4, 2, 16, True, 8),
    ("packed-3-docs", 2, 50, 50, 4, 4, 8, False, 3),
    ("packed-padded-causal", 3, 48, 48, 6, 3, 16, True, 5),
]


def case_segments(rng, name, b, tq, segments):
    if segments is None:
        return None
    pad = 7 if "padded" in name else 0
    return jnp.asarray(packed_segments(rng, b, tq, segments, pad=pad))


def run_case(impl, case, dtype, seed=0):
    name, b, tq, tk, h, kh, d, causal, segments = case
    rng = np.random.default_rng(seed)
    q, k, v, d_out = random_inputs(rng, b, tq, tk, h, kh, d, dtype)
    seg = case_segments(rng, name, b, tq, segments)

    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, causal=causal, segment_ids=seg, implementation=impl,
            block_sizes=BLOCKS[impl],
        )
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    want = reference(q, k, v, seg, seg, causal, d_out)
    return (out,) + tuple(grads), want


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_forward_and_gradients(impl, case):
    got, want = run_case(impl, case, jnp.float32)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32
        err = rel_err(g, w)
        assert err <= 1e-5, f"{impl} {case[0]} {label}: rel. error {err:.2e}"


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[8]], ids=lambda c: c[0])
def test_bf16_forward_and_gradients(impl, case):
    got, want = run_case(impl, case, jnp.bfloat16, seed=1)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16
        err = rel_err(g, w)
        assert err <= 2e-2, f"{impl} {case[0]} {label}: rel. error {err:.2e}"


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_rows_that_see_nothing_are_zero_not_nan(impl):
    rng = np.random.default_rng(2)
    q, k, v, d_out = random_inputs(rng, 1, 16, 24, 2, 1, 8, jnp.float32)
    q_seg = jnp.asarray([[1] * 6 + [9] * 4 + [2] * 6], jnp.int32)  # id 9 has no keys
    kv_seg = jnp.asarray([[1] * 12 + [2] * 12], jnp.int32)

    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, implementation=impl,
            block_sizes=BLOCKS[impl],
        )
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.all(np.asarray(out[0, 6:10]) == 0.0)
    for x in (out,) + grads:
        assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(grads[0][0, 6:10]) == 0.0)
    want = reference(q, k, v, q_seg, kv_seg, False, d_out)
    for g, w in zip((out,) + grads, want):
        assert rel_err(g, w) <= 1e-5


def test_chunked_block_sizes_do_not_change_the_result():
    rng = np.random.default_rng(3)
    q, k, v, _ = random_inputs(rng, 1, 70, 70, 4, 2, 16, jnp.float32)
    seg = jnp.asarray(packed_segments(rng, 1, 70, 4))
    outs = [
        dot_product_attention(q, k, v, causal=True, segment_ids=seg, implementation="chunked",
                              block_sizes=bs)
        for bs in [(70, 70), (16, 8), (7, 33), (1, 1)]
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=2e-6, rtol=0)


def test_cudnn_off_gpu_says_what_to_do():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    q = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU.*'xla' or 'chunked'"):
        dot_product_attention(q, q, q, implementation="cudnn")


def test_registered_implementations():
    assert {"xla", "chunked", "cudnn"} <= set(IMPLEMENTATIONS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=(1, 8, 3, 16), k=(1, 8, 2, 16)), "heads=3 is not a multiple of kv_heads=2"),
        (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 8)), "disagree on batch or head_dim"),
        (dict(q=(1, 8, 16), k=(1, 8, 2, 16)), "q must be"),
        (dict(q=(1, 8, 2, 16), k=(1, 9, 2, 16), seg=(1, 8)), "kv_segment_ids must be given"),
        (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), seg=(1, 7)), "segment_ids must be"),
        (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), impl="flash9"), "unknown; available"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, match):
    q = jnp.ones(kwargs["q"])
    k = jnp.ones(kwargs["k"])
    seg = jnp.zeros(kwargs["seg"], jnp.int32) if "seg" in kwargs else None
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, k, segment_ids=seg, implementation=kwargs.get("impl", "xla"))


def test_float_segment_ids_rejected():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match="must be integer"):
        dot_product_attention(q, q, q, segment_ids=jnp.zeros((1, 8)))


# ------------------------------------------------------------------ sliding window

WINDOW_CASES = [
    # name, b, tq, tk, h, kh, d, causal, segments, window, chunked block sizes
    ("causal-w12", 2, 40, 40, 4, 2, 16, True, None, 12, (8, 8)),
    ("bidir-w12", 2, 40, 40, 4, 2, 16, False, None, 12, (8, 8)),
    ("causal-w5-len-37", 2, 37, 37, 4, 4, 16, True, None, 5, (8, 16)),
    ("bidir-w9-len-45", 2, 45, 45, 4, 2, 8, False, None, 9, (16, 8)),
    ("gqa-8:1-causal-w12", 1, 40, 40, 8, 1, 32, True, None, 12, (8, 8)),
    ("packed-8-docs-causal-w6", 2, 64, 64, 4, 2, 16, True, 8, 6, (8, 8)),
    ("packed-padded-bidir-w10", 3, 48, 48, 6, 3, 16, False, 5, 10, (8, 8)),
    ("causal-w100-len-33", 2, 33, 33, 4, 4, 16, True, None, 100, (8, 8)),
    ("causal-w1", 2, 40, 40, 4, 2, 16, True, None, 1, (8, 8)),
    ("bidir-w1", 2, 37, 37, 4, 2, 16, False, None, 1, (8, 8)),
    # Queries past kv_len + window - 1 see nothing: zeros, zero grads.
    ("q>kv-causal-w6", 2, 45, 19, 4, 2, 16, True, None, 6, (8, 8)),
    ("q<kv-bidir-w6", 2, 17, 45, 4, 2, 16, False, None, 6, (8, 8)),
]

# Windows not aligned to the blocks and smaller than them: a loop bound off by one
# block (a ceil for a floor, the causal bound for the window's) drops visible keys.
SMALL_WINDOW_CASES = [
    ("causal-w3-8x8", 1, 40, 40, 2, 1, 16, True, None, 3, (8, 8)),
    ("bidir-w3-8x8", 1, 40, 40, 2, 1, 16, False, None, 3, (8, 8)),
    ("causal-w10-8x16", 1, 40, 40, 2, 1, 16, True, None, 10, (8, 16)),
    ("bidir-w5-16x8-len-37", 1, 37, 37, 2, 1, 16, False, None, 5, (16, 8)),
    ("causal-w2-1x1", 1, 12, 12, 2, 1, 8, True, None, 2, (1, 1)),
    ("bidir-w4-5x3-q<kv", 1, 13, 22, 2, 1, 8, False, None, 4, (5, 3)),
]


def run_window_case(impl, case, dtype, seed=0):
    name, b, tq, tk, h, kh, d, causal, segments, window, blocks = case
    rng = np.random.default_rng(seed)
    q, k, v, d_out = random_inputs(rng, b, tq, tk, h, kh, d, dtype)
    seg = case_segments(rng, name, b, tq, segments)

    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, causal=causal, segment_ids=seg, implementation=impl,
            block_sizes=blocks if impl == "chunked" else None, sliding_window=window,
        )
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    want = reference(q, k, v, seg, seg, causal, d_out, window)
    return (out,) + tuple(grads), want


def assert_matches(got, want, tol, what):
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        if np.any(w):
            err = rel_err(g, w)
        else:
            # Window 1: one key per row, so the softmax is constant and dq = dk = 0.
            err = np.max(np.abs(np.asarray(g, np.float64)))
        assert err <= tol, f"{what} {label}: error {err:.2e}"


def attend_and_grads(q, k, v, d_out, *, implementation, q_seg=None, kv_seg=None, **kwargs):
    """Output and dq, dk, dv of ``sum(out * d_out)``, jitted, a kernel in interpret mode."""

    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, implementation=implementation,
            interpret=True, **kwargs,
        )
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out,) + tuple(grads)


def assert_blind_rows_are_zero(got, want, rows, tol=1e-5):
    """Rows that see no key: finite everywhere, zero output and dq there, the rest
    matching the reference."""
    out, dq = np.asarray(got[0]), np.asarray(got[1])
    for x in got:
        assert np.all(np.isfinite(np.asarray(x, np.float32)))
    assert np.all(out[:, rows] == 0.0) and np.all(dq[:, rows] == 0.0)
    assert_matches(got, want, tol, "blind rows")


def run_kernel_case(implementation, case, dtype, seed=0):
    """One ``(name, b, tq, tk, h, kh, d, causal, docs, window, blocks)`` case of the
    Pallas kernels' tests: (got, float64 reference); "padded" in the name pads 5 ids."""
    name, b, tq, tk, h, kh, d, causal, docs, window, blocks = case
    rng = np.random.default_rng(seed)
    q, k, v, d_out = random_inputs(rng, b, tq, tk, h, kh, d, dtype)
    seg = None
    if docs is not None:
        seg = jnp.asarray(packed_segments(rng, b, tq, docs, pad=5 if "padded" in name else 0))
    got = attend_and_grads(
        q, k, v, d_out, implementation=implementation, q_seg=seg, causal=causal,
        sliding_window=window, block_sizes=blocks,
    )
    return got, reference(q, k, v, seg, seg, causal, d_out, window)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_window_fp32_forward_and_gradients(impl, case):
    got, want = run_window_case(impl, case, jnp.float32)
    assert all(g.dtype == jnp.float32 for g in got)
    assert_matches(got, want, 1e-5, f"{impl} {case[0]}")


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [WINDOW_CASES[0], WINDOW_CASES[5]], ids=lambda c: c[0])
def test_window_bf16_forward_and_gradients(impl, case):
    got, want = run_window_case(impl, case, jnp.bfloat16, seed=1)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    assert_matches(got, want, 2e-2, f"{impl} {case[0]}")


@pytest.mark.parametrize("case", SMALL_WINDOW_CASES, ids=[c[0] for c in SMALL_WINDOW_CASES])
def test_chunked_small_unaligned_window_keeps_every_visible_block(case):
    got, want = run_window_case("chunked", case, jnp.float32)
    assert_matches(got, want, 1e-5, f"chunked {case[0]}")


@pytest.mark.parametrize(
    "causal, window, tq, tk, blocks",
    [
        (True, 12, 40, 40, (8, 8)),
        (False, 12, 40, 40, (8, 8)),
        (True, 3, 40, 40, (8, 8)),
        (False, 5, 37, 37, (16, 8)),
        (True, 10, 40, 40, (8, 16)),
        (True, 6, 45, 19, (8, 8)),
        (False, 6, 17, 45, (8, 8)),
        (True, None, 45, 19, (8, 8)),
    ],
)
def test_chunked_loops_visit_exactly_the_visible_blocks(causal, window, tq, tk, blocks):
    """The loop bounds, against the block mask: no visible block left out, none outside
    the first..last visible block visited (so a window skips blocks, not just masks them)."""
    bq, bk = min(blocks[0], tq), min(blocks[1], tk)
    nq, nk = -(-tq // bq), -(-tk // bk)
    st = chunked._Static(causal=causal, scale=1.0, bq=bq, bk=bk, kv_len=tk, sliding_window=window)
    visible = np.array(
        [[bool(jnp.any(chunked._block_mask(st, i, j, None, None))) for j in range(nk)]
         for i in range(nq)]
    )
    visited = 0
    for i in range(nq):
        lo, hi = int(chunked._first_kv_block(st, i)), int(chunked._last_kv_block(st, i, nk))
        seen = np.flatnonzero(visible[i])
        if seen.size:
            assert (lo, hi) == (seen[0], seen[-1] + 1), f"forward, query block {i}"
        visited += max(hi - lo, 0)
    for j in range(nk):
        lo, hi = int(chunked._first_q_block(st, j)), int(chunked._last_q_block(st, j, nq))
        seen = np.flatnonzero(visible[:, j])
        if seen.size:
            assert (lo, hi) == (seen[0], seen[-1] + 1), f"backward, key block {j}"
    if window is not None and window < min(tq, tk) // 2:
        assert visited < nq * nk  # some blocks are never looked at


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_window_at_least_the_length_is_no_window(impl, causal):
    rng = np.random.default_rng(4)
    q, k, v, _ = random_inputs(rng, 1, 33, 33, 4, 2, 16, jnp.float32)
    outs = [
        dot_product_attention(q, k, v, causal=causal, implementation=impl,
                              block_sizes=BLOCKS[impl], sliding_window=w)
        for w in (None, 33, 1000)
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [0, -2, 2.5, True])
def test_bad_sliding_window_rejected(window):
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match="sliding_window"):
        dot_product_attention(q, q, q, causal=True, sliding_window=window)


def test_cudnn_rejects_a_symmetric_window():
    q = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="sliding_window only with causal=True"):
        dot_product_attention(q, q, q, implementation="cudnn", sliding_window=4)


def test_flops_count_the_pairs_inside_the_window():
    t = 16
    spec = AttentionSpec(1, t, t, 1, 1, 1, True, 1.0)
    assert flops(spec) == 4 * t * t / 2  # causal, no window: the half convention
    assert flops(spec, backward=True) == 3.5 * flops(spec)
    for causal in (True, False):
        for w in (1, 5, t):
            windowed = dataclasses.replace(spec, causal=causal, sliding_window=w)
            assert flops(windowed) == 4 * position_mask(t, t, causal, w).sum(), (causal, w)
    longer = dataclasses.replace(spec, sliding_window=t + 1)
    assert flops(longer) == flops(spec)
