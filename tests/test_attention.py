"""Every attention implementation against a float64 numpy reference written here."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from t5x_like.kernels.attention import IMPLEMENTATIONS, dot_product_attention

CPU_IMPLEMENTATIONS = ["xla", "chunked"]
# Small blocks so that the blockwise backend crosses many block boundaries.
BLOCKS = {"xla": None, "chunked": (8, 16)}


# ------------------------------------------------------------ float64 reference


def reference(q, k, v, q_seg, kv_seg, causal, d_out):
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
    mask = np.ones((b, tq, tk), bool)
    if causal:
        mask &= np.arange(tk)[None, None, :] <= np.arange(tq)[None, :, None]
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
