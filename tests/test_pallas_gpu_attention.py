"""The Pallas Mosaic GPU flash-attention kernel, in Mosaic GPU's interpret mode on CPU
(simulated SMEM, TMA, barriers and wgmma), against the float64 reference of
test_attention.py; its race detector checks the TMA ring's barriers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import (
    assert_blind_rows_are_zero,
    assert_matches,
    attend_and_grads,
    random_inputs,
    reference,
    run_kernel_case,
)

from t5x_like.kernels import attention
from t5x_like.kernels.attention import dot_product_attention

IMPLEMENTATION = "pallas_gpu"

pallas_gpu = pytest.importorskip("t5x_like.kernels.pallas_gpu")
gpu_interpret = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
gpu_callbacks = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks")


# wgmma-sized blocks (64); lengths mostly not multiples of them, so padding is masked.
CASES = [
    # name, b, tq, tk, h, kh, d, causal, docs, window, blocks
    ("mha-causal-len100", 1, 100, 100, 2, 2, 64, True, None, None, (64, 64)),
    ("causal-len192-full-and-diagonal-blocks", 1, 192, 192, 2, 1, 64, True, None, None, (64, 64)),
    ("bidir-len128-nothing-to-mask", 1, 128, 128, 2, 2, 64, False, None, None, (64, 64)),
    ("gqa-8:1-bidir-len70", 1, 70, 70, 8, 1, 64, False, None, None, (64, 64)),
    ("gqa-4:1-packed-8-docs-causal", 2, 128, 128, 4, 1, 64, True, 8, None, (64, 64)),
    ("packed-padded-bidir-d128", 1, 100, 100, 2, 2, 128, False, 5, None, (64, 64)),
    ("q<kv-gqa-2:1", 2, 60, 150, 4, 2, 64, False, None, None, (64, 64)),
    ("q>kv-causal-bk128", 1, 150, 70, 2, 1, 64, True, None, None, (64, 128)),
    ("causal-window40-len130-d128", 1, 130, 130, 2, 1, 128, True, None, 40, (64, 64)),
    ("gqa-2:1-packed-causal-d256", 1, 90, 90, 4, 2, 256, True, 3, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_fp32_forward_and_gradients(case):
    """fp32 runs only in interpret mode (wgmma exact there): the algorithm at 1e-5."""
    got, want = run_kernel_case(IMPLEMENTATION, case, jnp.float32)
    assert all(g.dtype == jnp.float32 for g in got)
    assert_matches(got, want, 1e-5, case[0])


@pytest.fixture
def race_detector(monkeypatch, capfd):
    """Interpret with the happens-before race detector: a slot read before its TMA
    barrier was waited on, or refilled while still read, is reported. It prints each
    race as the kernel runs and keeps a flag for the last kernel (here dk/dv)."""
    params = gpu_interpret.InterpretGPUParams(detect_races=True)
    monkeypatch.setattr(pallas_gpu, "_interpret_params", lambda interpret: params)
    yield
    assert "RACE DETECTED" not in capfd.readouterr().out
    assert not gpu_callbacks.get_races().races_found, "Mosaic GPU interpreter found data races"


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=lambda c: c[0])
def test_bf16_forward_and_gradients_without_races(case, race_detector):
    got, want = run_kernel_case(IMPLEMENTATION, case, jnp.bfloat16, seed=1)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    assert_matches(got, want, 2e-2, case[0])


def test_fp16_default_blocks_pad_a_short_sequence():
    rng = np.random.default_rng(6)
    q, k, v, d_out = random_inputs(rng, 1, 21, 21, 2, 1, 64, jnp.float16)
    got = attend_and_grads(q, k, v, d_out, implementation=IMPLEMENTATION, causal=True)
    assert_matches(got, reference(q, k, v, None, None, True, d_out), 2e-2, "fp16 default blocks")


def test_query_ids_missing_on_the_kv_side_give_zeros():
    rng = np.random.default_rng(2)
    q, k, v, d_out = random_inputs(rng, 1, 128, 100, 2, 1, 64, jnp.float32)
    q_seg = jnp.asarray([[1] * 20 + [9] * 70 + [2] * 38], jnp.int32)  # id 9 has no keys
    kv_seg = jnp.asarray([[1] * 50 + [2] * 50], jnp.int32)
    got = attend_and_grads(
        q, k, v, d_out, implementation=IMPLEMENTATION,
        q_seg=q_seg, kv_seg=kv_seg, block_sizes=(64, 64))
    want = reference(q, k, v, q_seg, kv_seg, False, d_out)
    assert_blind_rows_are_zero(got, want, slice(20, 90))


def test_nan_in_blocks_nobody_sees_never_reaches_the_result():
    """NaN in kv blocks no query can see (a kv-only document; keys past the causal
    reach) and in a q block that sees nothing: read or computed, they would leak."""
    rng = np.random.default_rng(4)
    q, k, v, d_out = random_inputs(rng, 1, 192, 320, 2, 1, 64, jnp.float32)
    q_seg = jnp.asarray([[1] * 64 + [5] * 64 + [2] * 64], jnp.int32)  # id 5: no keys
    kv_seg = jnp.asarray([[1] * 64 + [7] * 64 + [2] * 192], jnp.int32)  # id 7: no queries
    want = reference(q, k, v, q_seg, kv_seg, True, d_out)
    k_bad, v_bad = k, v
    for rows in (slice(64, 128), slice(192, 320)):  # kv block 1 (id 7); blocks 3, 4 (j > 191)
        k_bad = k_bad.at[:, rows].set(jnp.nan)
        v_bad = v_bad.at[:, rows].set(jnp.nan)
    q_bad = q.at[:, 64:128].set(jnp.nan)  # q block 1 (id 5) sees nothing
    got = attend_and_grads(
        q_bad, k_bad, v_bad, d_out, implementation=IMPLEMENTATION,
        q_seg=q_seg, kv_seg=kv_seg, causal=True, block_sizes=(64, 64)
    )
    for x in got:
        assert np.all(np.isfinite(np.asarray(x)))
    # Gradients of the poisoned (invisible) rows are zero; compare the rest.
    out, dq, dk, dv = (np.asarray(x) for x in got)
    np.testing.assert_allclose(out, np.asarray(want[0]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dq, np.asarray(want[1]), atol=1e-5, rtol=1e-5)
    seen = np.r_[0:64, 128:192]
    for g, w in ((dk, want[2]), (dv, want[3])):
        np.testing.assert_allclose(g[:, seen], np.asarray(w)[:, seen], atol=1e-5, rtol=1e-5)
        assert np.all(g[:, 64:128] == 0.0) and np.all(g[:, 192:] == 0.0)


# ------------------------------------------------------------ dispatch and errors


def test_pallas_dispatches_to_the_gpu_kernel_on_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setitem(
        attention.IMPLEMENTATIONS, "pallas_gpu", lambda *a, **kw: calls.append(kw) or a[0]
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    dot_product_attention(q, q, q, implementation="pallas")
    assert calls == [{"interpret": False}]


class _Ampere:
    device_kind = "NVIDIA A100-SXM4-80GB"
    compute_capability = "8.0"


def test_gpus_before_hopper_are_refused(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [_Ampere()])
    q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="Hopper GPU.*A100.*'cudnn'"):
        dot_product_attention(q, q, q, implementation="pallas")


def test_on_cpu_without_interpret_says_what_to_do():
    q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="NVIDIA GPUs.*interpret=True"):
        dot_product_attention(q, q, q, implementation="pallas_gpu")


@pytest.mark.parametrize(
    "dtype, head_dim, blocks, message",
    [
        (jnp.float32, 64, None, "bf16 or fp16.*'chunked' or 'xla' for fp32"),
        (jnp.bfloat16, 96, None, "head_dim a multiple of 64"),
        (jnp.bfloat16, 320, None, "head_dim a multiple of 64 up to 256"),
        (jnp.bfloat16, 64, (64, 48), "multiples of 64"),
        (jnp.bfloat16, 64, (64, 512), "at most 256"),
        (jnp.bfloat16, 256, (256, 256), "forward kernel with blocks .256, 256. needs 512 KiB"),
    ],
)
def test_unsupported_inputs_are_refused_before_compiling(monkeypatch, dtype, head_dim, blocks,
                                                         message):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_gpu, "_check_hopper", lambda: None)
    q = jnp.ones((1, 512, 2, head_dim), dtype)
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, q, q, implementation="pallas_gpu", block_sizes=blocks)


# Compiled for a real H100 (ptxas, sm_90a): tests/test_compile_targets.py.
