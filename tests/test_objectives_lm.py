"""Chunked next-token cross-entropy against a float64 numpy reference of full logits.

Checked: loss, z-loss, accuracy counts and gradients (hidden and head kernel)
for ragged chunk sizes; next-token targets of packed rows (one-token documents,
padding, prompt tokens); the loss from a real tiny Decoder's logits (tied and
untied heads, fp32 and bf16) against the chunked loss from its hidden states;
that no ``[tokens, vocab]`` buffer exists in the gradient computation; and that
the loss on a (data=4, tensor=2) mesh equals the unsharded one.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning as part
from t5x_like.models import Decoder, DecoderConfig
from t5x_like.objectives import lm

# ---------------------------------------------------------------- numpy reference


def reference(hidden, kernel, targets, weights, z_loss=0.0):
    """Sums and their gradients (w.r.t. hidden and kernel) from full float64 logits."""
    h = np.asarray(hidden, np.float64).reshape(-1, kernel.shape[0])
    w_kernel = np.asarray(kernel, np.float64)
    t = np.asarray(targets).reshape(-1)
    w = np.asarray(weights, np.float64).reshape(-1)
    logits = h @ w_kernel
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    p = np.exp(logits - lse[:, None])
    onehot = np.eye(w_kernel.shape[1])[t]
    target_logit = logits[np.arange(len(t)), t]
    sums = {
        "loss_sum": np.sum(w * (lse - target_logit + z_loss * lse**2)),
        "z_loss_sum": np.sum(w * z_loss * lse**2),
        "weight_sum": np.sum(w),
        "correct_sum": np.sum(w * (logits.argmax(-1) == t)),
    }
    g_logits = w[:, None] * (p - onehot + 2 * z_loss * lse[:, None] * p)
    grads = (
        (g_logits @ w_kernel.T).reshape(np.shape(hidden)),
        h.T @ g_logits,
    )
    return sums, grads


def reference_targets(tokens, segment_ids, loss_weights):
    """Next-token targets written as the rule says, one position at a time."""
    batch, length = tokens.shape
    targets = np.zeros_like(tokens)
    weights = np.zeros((batch, length), np.float32)
    for b in range(batch):
        for t in range(length - 1):
            targets[b, t] = tokens[b, t + 1]
            same = segment_ids[b, t] > 0 and segment_ids[b, t] == segment_ids[b, t + 1]
            weights[b, t] = loss_weights[b, t + 1] if same else 0.0
    return targets, weights


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def random_problem(seed, batch=2, length=13, embed=16, vocab=50, dtype=np.float32):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, embed)).astype(dtype)
    kernel = (rng.normal(size=(embed, vocab)) * 0.5).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    weights = (rng.random((batch, length)) < 0.8).astype(np.float32)
    return hidden, kernel, targets, weights


def chunked_with_grads(hidden, kernel, targets, weights, **kwargs):
    def loss(h, k):
        sums = lm.chunked_cross_entropy(h, k, targets, weights, **kwargs)
        return sums["loss_sum"], sums

    (_, sums), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(hidden), jnp.asarray(kernel))
    return sums, grads


# ------------------------------------------------------------------------ targets


def test_next_token_targets_packed_rows():
    # Row 0: documents of 3, 1 (one token) and 2 tokens, then padding.
    # Row 1: a prompt (loss weight 0) and its answer in one document, filling the row.
    tokens = np.array([[11, 12, 13, 21, 31, 32, 0, 0],
                       [41, 42, 43, 44, 45, 46, 47, 48]], np.int32)
    segment_ids = np.array([[1, 1, 1, 2, 3, 3, 0, 0],
                            [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    loss_weights = np.array([[1, 1, 1, 1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 1, 1, 1, 1]], np.float32)
    targets, weights = lm.next_token_targets(jnp.asarray(tokens), jnp.asarray(segment_ids),
                                             jnp.asarray(loss_weights))
    np.testing.assert_array_equal(targets[0, :6], [12, 13, 21, 31, 32, 0])
    np.testing.assert_array_equal(weights, [[1, 1, 0, 0, 1, 0, 0, 0],
                                            [0, 0, 1, 1, 1, 1, 1, 0]])
    want_t, want_w = reference_targets(tokens, segment_ids, loss_weights)
    np.testing.assert_array_equal(targets, want_t)
    np.testing.assert_array_equal(weights, want_w)


# ----------------------------------------------------- chunked vs full logits (fp32)


# Length 13: one position per chunk, ragged (4, 5), exactly one chunk, a chunk longer than the rows.
@pytest.mark.parametrize("chunk_size, z_loss", [(1, 0.0), (4, 1e-2), (5, 0.0), (13, 1e-2),
                                                (100, 1e-2)])
def test_chunked_matches_full_logits(chunk_size, z_loss):
    hidden, kernel, targets, weights = random_problem(chunk_size)
    sums, (d_hidden, d_kernel) = chunked_with_grads(
        hidden, kernel, targets, weights, chunk_size=chunk_size, z_loss=z_loss)
    want, (want_dh, want_dk) = reference(hidden, kernel, targets, weights, z_loss)
    for key in lm.SUM_KEYS:
        assert rel_err(sums[key], want[key]) <= 1e-5, key
    assert rel_err(d_hidden, want_dh) <= 1e-5
    assert rel_err(d_kernel, want_dk) <= 1e-5


def test_flat_token_axis_and_no_weighted_tokens():
    hidden, kernel, targets, weights = random_problem(1, batch=1, length=37)
    flat = lm.chunked_cross_entropy(jnp.asarray(hidden[0]), kernel, targets[0], weights[0],
                                    chunk_size=8)
    want, _ = reference(hidden, kernel, targets, weights)
    assert rel_err(flat["loss_sum"], want["loss_sum"]) <= 1e-5

    tokens = jnp.asarray(targets)
    loss, sums = lm.lm_loss(jnp.asarray(hidden), kernel, tokens, None, jnp.zeros_like(tokens),
                            chunk_size=8)
    assert float(sums["weight_sum"]) == 0.0 and float(loss) == 0.0  # not NaN


def test_bf16_hidden_logits_in_fp32():
    hidden, kernel, targets, weights = random_problem(2, dtype=np.float32)
    hidden_bf16 = jnp.asarray(hidden, jnp.bfloat16)
    sums, (d_hidden, d_kernel) = chunked_with_grads(hidden_bf16, kernel, targets, weights,
                                                    chunk_size=4, z_loss=1e-2)
    assert d_hidden.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.float32
    # Reference on the bf16-rounded operands: what remains is the fp32 accumulation.
    kernel_bf16 = np.asarray(jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32))
    want, (want_dh, want_dk) = reference(np.asarray(hidden_bf16.astype(jnp.float32)),
                                         kernel_bf16, targets, weights, 1e-2)
    assert rel_err(sums["loss_sum"], want["loss_sum"]) <= 1e-5
    assert rel_err(d_hidden.astype(jnp.float32), want_dh) <= 1e-2
    assert rel_err(d_kernel, want_dk) <= 1e-2


def test_lm_loss_packed_rows_matches_reference():
    rng = np.random.default_rng(3)
    batch, length, embed, vocab = 3, 21, 16, 40
    tokens = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    segment_ids = np.array([
        [1] * 7 + [2] + [3] * 10 + [0] * 3,  # one-token document, then padding
        [1] * 21,
        [1, 2, 3, 4] + [5] * 15 + [0, 0],  # four one-token documents
    ], np.int32)
    loss_weights = (segment_ids > 0).astype(np.float32)
    loss_weights[1, :5] = 0.0  # a prompt
    hidden = rng.normal(size=(batch, length, embed)).astype(np.float32)
    kernel = rng.normal(size=(embed, vocab)).astype(np.float32)

    loss, sums = jax.jit(lambda h: lm.lm_loss(h, kernel, tokens, segment_ids, loss_weights,
                                              chunk_size=6, z_loss=1e-3))(hidden)
    targets, weights = reference_targets(tokens, segment_ids, loss_weights)
    want, _ = reference(hidden, kernel, targets, weights, 1e-3)
    assert want["weight_sum"] == (6 + 0 + 9) + (20 - 4) + (0 + 14)  # rows 0, 1, 2
    assert rel_err(loss, want["loss_sum"] / want["weight_sum"]) <= 1e-5
    metrics = lm.summarize(sums)
    assert rel_err(metrics["z_loss"], want["z_loss_sum"] / want["weight_sum"]) <= 1e-5
    assert rel_err(metrics["accuracy"], want["correct_sum"] / want["weight_sum"]) <= 1e-6


def test_argument_errors():
    hidden, kernel, targets, weights = random_problem(4)
    with pytest.raises(ValueError, match="chunk_size=0"):
        lm.chunked_cross_entropy(hidden, kernel, targets, weights, chunk_size=0)
    with pytest.raises(ValueError, match="normalize='rows'"):
        lm.lm_loss(hidden, kernel, targets, None, None, normalize="rows")
    with pytest.raises(ValueError, match=r"head kernel \(50, 16\)"):
        lm.chunked_cross_entropy(hidden, kernel.T, targets, weights)
    with pytest.raises(ValueError, match="lm_head=False"):
        lm.lm_head_weights({}, DecoderConfig(lm_head=False))


# ------------------------------------------------------------- real tiny decoders

TINY = DecoderConfig(vocab_size=96, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64)


def _packed_batch(rng, batch=2, length=24):
    tokens = rng.integers(1, TINY.vocab_size, size=(batch, length)).astype(np.int32)
    segment_ids = np.array([[1] * 10 + [2] + [3] * 9 + [0] * 4, [1] * 15 + [2] * 9], np.int32)
    positions = np.zeros_like(segment_ids)
    for row in range(batch):
        for seg in np.unique(segment_ids[row]):
            idx = np.flatnonzero(segment_ids[row] == seg)
            positions[row, idx] = np.arange(len(idx))
    return tokens, segment_ids, positions, (segment_ids > 0).astype(np.float32)


def random_params(model, *args, seed=0):
    """Parameters of the right shapes, drawn in numpy (a jitted Flax init takes ~10 s to compile here)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype), shapes)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoder_logits_loss_equals_chunked_loss(tied, dtype):
    config = dataclasses.replace(TINY, tie_embeddings=tied, dtype=dtype)
    tokens, segment_ids, positions, loss_weights = _packed_batch(np.random.default_rng(5))
    model = Decoder(config)
    params = random_params(model, tokens, segment_ids, positions)
    assert ("lm_head" in params) != tied

    def full_logits_loss(params):
        logits = model.apply({"params": params}, tokens, segment_ids, positions)
        targets, weights = lm.next_token_targets(tokens, segment_ids, loss_weights)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    def chunked_loss(params):
        hidden = model.apply({"params": params}, tokens, segment_ids, positions,
                             return_hidden=True)
        head = lm.lm_head_weights(params, config)
        return lm.lm_loss(hidden, head, tokens, segment_ids, loss_weights, chunk_size=5)[0]

    if dtype == "bfloat16":
        # Logits of order 1, so that bf16 rounding of them is visible in the loss.
        params["final_norm"]["scale"] = np.ones_like(params["final_norm"]["scale"])
        head = ("embed", "embedding") if tied else ("lm_head", "kernel")
        params[head[0]][head[1]] = params[head[0]][head[1]] * 3

        def unrounded_loss(params):  # what the chunked loss would be without the model's rounding
            hidden = model.apply({"params": params}, tokens, segment_ids, positions,
                                 return_hidden=True)
            head = lm.lm_head_weights(params, config)
            return lm.lm_loss(hidden, head, tokens, segment_ids, loss_weights, chunk_size=5,
                              logits_dtype=jnp.float32)[0]

        # XLA may skip bf16 roundings inside a fusion (xla_allow_excess_precision, on by
        # default), differently in the two programs: exact parity needs it off.
        got, want, unrounded = jax.jit(
            lambda p: (chunked_loss(p), full_logits_loss(p), unrounded_loss(p)),
            compiler_options={"xla_allow_excess_precision": False})(params)
        assert rel_err(got, want) <= 1e-6  # same operands and roundings as the model
        # The untied head (layers.Dense) rounds logits to bf16; the tied one (attend) does not.
        assert (rel_err(unrounded, want) > 2e-5) == (not tied)
        return
    # One program for both (each decoder gradient costs seconds of XLA compile here).
    (got, grads), (want, want_grads) = jax.jit(
        lambda p: (jax.value_and_grad(chunked_loss)(p), jax.value_and_grad(full_logits_loss)(p))
    )(params)
    assert rel_err(got, want) <= 1e-5
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)


# --------------------------------------------------------------------- memory


def _intermediate_sizes(jaxpr) -> list[tuple[int, tuple[int, ...]]]:
    """(size, shape) of every value any equation produces, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [(int(np.prod(v.aval.shape)), v.aval.shape) for v in eqn.outvars
                if hasattr(v.aval, "shape")]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _intermediate_sizes(sub)
    return out


def test_no_tokens_by_vocab_buffer_in_the_backward_pass():
    batch, length, embed, vocab, chunk = 2, 512, 32, 2048, 32
    hidden, kernel, targets, weights = random_problem(6, batch, length, embed, vocab)
    full = batch * length * vocab

    def chunked(h, k):
        return lm.chunked_cross_entropy(h, k, targets, weights, chunk_size=chunk)["loss_sum"]

    def naive(h, k):
        logits = jnp.einsum("ble,ev->blv", h, k)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights)

    grad = jax.grad(chunked, argnums=(0, 1))
    # 1) The traced gradient: the largest value is one chunk's logits, [batch, chunk, vocab].
    largest = max(_intermediate_sizes(jax.make_jaxpr(grad)(hidden, kernel).jaxpr))
    assert largest[0] == batch * chunk * vocab, largest
    # 2) The compiled program: temporaries far below one fp32 [tokens, vocab] buffer,
    #    which the full-logits version does need (so the measure can tell them apart).
    temp = jax.jit(grad).lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes
    naive_temp = (jax.jit(jax.grad(naive, argnums=(0, 1))).lower(hidden, kernel).compile()
                  .memory_analysis().temp_size_in_bytes)
    chunk_logits = 4 * batch * chunk * vocab
    assert naive_temp >= 4 * full
    assert temp <= 4 * chunk_logits <= 4 * full // 4, (temp, chunk_logits, 4 * full)


# ------------------------------------------------------------------------ sharded


@pytest.mark.parametrize("layout, chunk_size", [
    ({"data": 4, "tensor": 2}, 6),
    # length over `sequence`: chunks of 10 positions split over it, chunks of 5 cannot (replicated)
    ({"data": 2, "tensor": 2, "sequence": 2}, 10),
    ({"data": 2, "tensor": 2, "sequence": 2}, 6),
], ids=["data4-tensor2", "seq2-even-chunks", "seq2-odd-chunks"])
def test_sharded_mesh_equals_unsharded(devices, layout, chunk_size):
    batch, length, embed, vocab = 8, 20, 16, 64
    hidden, kernel, _, _ = random_problem(7, batch, length, embed, vocab)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    segment_ids = np.repeat(np.arange(1, 5), 5)[None].repeat(batch, 0).astype(np.int32)
    segment_ids[::3, -3:] = 0
    loss_weights = (segment_ids > 0).astype(np.float32)

    def loss_and_grads(h, k, t, s, w):
        def loss(h, k):
            return lm.lm_loss(h, k, t, s, w, chunk_size=chunk_size, z_loss=1e-3)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(h, k)

    want_loss, (want_dh, want_dk) = jax.jit(loss_and_grads)(hidden, kernel, tokens, segment_ids,
                                                            loss_weights)
    mesh = part.make_mesh(layout)
    rows = part.logical_sharding(mesh, ("batch", "length"))
    hidden_sharding = part.logical_sharding(mesh, ("batch", "length", "embed"))
    kernel_sharding = part.logical_sharding(mesh, ("embed", "vocab"))
    assert kernel_sharding.spec == P("fsdp", "tensor") and rows.spec[0] == ("data", "fsdp")
    args = [jax.device_put(x, s) for x, s in zip(
        (hidden, kernel, tokens, segment_ids, loss_weights),
        (hidden_sharding, kernel_sharding, rows, rows, rows))]
    with jax.set_mesh(mesh):
        got_loss, (got_dh, got_dk) = jax.jit(
            loss_and_grads, out_shardings=(None, (hidden_sharding, kernel_sharding)))(*args)
    assert got_dk.sharding.spec == P("fsdp", "tensor")
    assert rel_err(got_loss, want_loss) <= 1e-6
    assert rel_err(got_dh, want_dh) <= 1e-6
    assert rel_err(got_dk, want_dk) <= 1e-6


def test_flat_token_axis_sharded(devices):
    tokens_n, embed, vocab = 96, 16, 64
    hidden, kernel, targets, weights = random_problem(8, 1, tokens_n, embed, vocab)
    hidden, targets, weights = hidden[0], targets[0], weights[0]  # [tokens, embed], [tokens]
    fn = jax.jit(lambda h, k: lm.chunked_cross_entropy(h, k, targets, weights, chunk_size=24))
    want = fn(hidden, kernel)
    mesh = part.make_mesh({"data": 4, "tensor": 2})
    with jax.set_mesh(mesh):
        got = fn(jax.device_put(hidden, part.logical_sharding(mesh, ("batch", "embed"))),
                 jax.device_put(kernel, part.logical_sharding(mesh, ("embed", "vocab"))))
    for key in lm.SUM_KEYS:
        assert rel_err(got[key], want[key]) <= 1e-6, key
