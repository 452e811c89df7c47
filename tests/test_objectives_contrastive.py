"""The contrastive objective against a float64 numpy reference, across devices, and
gradient caching against the plain loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning as part
from t5x_like.models.encoder import Encoder, EncoderConfig
from t5x_like.models.pooling import pool
from t5x_like.objectives import contrastive as c


def _logsumexp(x):
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(q, p, scale, teacher=None, *, qq=False, pp=False, kd_weight=0.0, t_temp=1.0,
              c_weight=1.0):
    """Per-query loss in float64, written from the definitions (loops, no vectorised tricks)."""
    q, p = _unit(q.astype(np.float64)), _unit(p.astype(np.float64))
    batch, group, _ = p.shape
    columns = [p[j, g] for j in range(batch) for g in range(group)]  # device-order concatenation
    losses = []
    for i in range(batch):
        row = [scale * q[i] @ col for col in columns]
        positive = row[i * group]
        if qq:
            row += [scale * q[i] @ q[j] for j in range(batch) if j != i]
        if pp:
            row += [scale * p[i, 0] @ p[j, 0] for j in range(batch) if j != i]
        loss = c_weight * (_logsumexp(np.array(row)) - positive)
        if kd_weight:
            student = np.array([scale * q[i] @ p[i, g] for g in range(group)])
            log_s = student - _logsumexp(student)
            log_t = teacher[i] / t_temp - _logsumexp(teacher[i] / t_temp)
            loss += kd_weight * np.sum(np.exp(log_t) * (log_t - log_s))
        losses.append(loss)
    return np.array(losses)


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(16, 32)).astype(np.float32)
    # Positives near their query so accuracy and losses are not all alike.
    p = rng.normal(size=(16, 4, 32)).astype(np.float32)
    p[:, 0] += 0.3 * q
    teacher = rng.normal(size=(16, 4)).astype(np.float32) * 3
    return q, p, teacher


@pytest.mark.parametrize("qq,pp", [(False, False), (True, False), (False, True), (True, True)])
def test_infonce_matches_reference(embeddings, qq, pp):
    q, p, _ = embeddings
    cfg = c.ContrastiveConfig(temperature=0.05, query_query=qq, passage_passage=pp)
    loss_sum, sums = jax.jit(lambda q, p: c.contrastive_loss(cfg, q, p))(q, p)
    want = reference(q, p, 20.0, qq=qq, pp=pp)
    np.testing.assert_allclose(float(loss_sum), want.sum(), rtol=1e-5)
    assert float(sums["weight"]) == 16
    # The accuracy reads the positive's column i * G, not column i.
    qn, pn = _unit(q), _unit(p)
    scores = qn @ pn.reshape(-1, 32).T
    assert float(sums["accuracy"]) == np.sum(np.argmax(scores, -1) == np.arange(16) * 4)


def test_distillation_and_weights(embeddings):
    q, p, teacher = embeddings
    cfg = c.ContrastiveConfig(temperature=0.02, kd_weight=0.7, contrastive_weight=0.3,
                              teacher_temperature=2.0)
    loss_sum, sums = c.contrastive_loss(cfg, jnp.asarray(q), jnp.asarray(p), jnp.asarray(teacher))
    want = reference(q, p, 50.0, teacher, kd_weight=0.7, t_temp=2.0, c_weight=0.3)
    np.testing.assert_allclose(float(loss_sum), want.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="teacher_scores"):
        c.contrastive_loss(cfg, jnp.asarray(q), jnp.asarray(p))


def test_matryoshka_averages_truncated_renormalised_losses(embeddings):
    q, p, _ = embeddings
    cfg = c.ContrastiveConfig(temperature=0.05, matryoshka_dims=(32, 8), matryoshka_weights=(1.0, 3.0))
    loss_sum, _ = c.contrastive_loss(cfg, jnp.asarray(q), jnp.asarray(p))
    full = reference(q, p, 20.0).sum()
    cut = reference(q[:, :8], p[..., :8], 20.0).sum()
    np.testing.assert_allclose(float(loss_sum), (full + 3 * cut) / 4, rtol=1e-5)


def test_learnt_temperature_gets_a_gradient(embeddings):
    q, p, _ = embeddings
    cfg = c.ContrastiveConfig(temperature=0.05, learn_temperature=True)
    log_scale = cfg.initial_log_scale()
    f = lambda s: c.contrastive_loss(cfg, jnp.asarray(q), jnp.asarray(p), log_scale=s)[0]
    g = jax.grad(f)(log_scale)
    eps = 1e-3
    numeric = (reference(q, p, np.exp(float(log_scale) + eps)).sum()
               - reference(q, p, np.exp(float(log_scale) - eps)).sum()) / (2 * eps)
    np.testing.assert_allclose(float(g), numeric, rtol=1e-3)


def test_config_errors():
    with pytest.raises(ValueError, match="temperature"):
        c.ContrastiveConfig(temperature=0)
    with pytest.raises(ValueError, match="matryoshka_weights"):
        c.ContrastiveConfig(matryoshka_dims=(64, 32), matryoshka_weights=(1.0,))
    with pytest.raises(ValueError, match="exceed"):
        c.contrastive_loss(c.ContrastiveConfig(matryoshka_dims=(64,)), jnp.ones((2, 8)), jnp.ones((2, 3, 8)))


# ------------------------------------------------------------ across devices


def test_gathered_loss_over_eight_devices_equals_global_reference(devices, embeddings):
    """Each device holds 2 queries with their positives and hard negatives; every query
    must be scored against all 64 passages, its label at the right global column."""
    q, p, _ = embeddings
    mesh = part.make_mesh(part.MeshShape(data=8))
    cfg = c.ContrastiveConfig(temperature=0.01)
    qs = jax.device_put(q, NamedSharding(mesh, P("data")))
    ps = jax.device_put(p, NamedSharding(mesh, P("data")))
    assert len(qs.addressable_shards) == 8 and qs.addressable_shards[1].data.shape == (2, 32)

    def loss(q, p):
        return c.contrastive_loss(cfg, q, p)[0]

    with jax.set_mesh(mesh):
        value, (gq, gp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(qs, ps)
    np.testing.assert_allclose(float(value), reference(q, p, 100.0).sum(), rtol=1e-5)
    # Gradients flow through the gather: equal to the single-device gradients.
    gq1, gp1 = jax.grad(loss, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(gq), np.asarray(gq1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gp1), rtol=1e-5, atol=1e-4)
    # Another device's hard negatives do matter: make one on device 7 look like query 0 (on
    # device 0) and the sharded loss rises by what the reference says, query 0's share of it.
    p2 = p.copy()
    p2[15, 3] = _unit(q[0]) * 10
    with jax.set_mesh(mesh):
        moved = jax.jit(loss)(qs, jax.device_put(p2, NamedSharding(mesh, P("data"))))
    rise = reference(q, p2, 100.0) - reference(q, p, 100.0)
    assert rise[0] > 1 and rise[0] > 0.9 * rise.sum()
    np.testing.assert_allclose(float(moved) - float(value), rise.sum(), rtol=1e-4)


# ------------------------------------------------------------ gradient cache


def _tiny_encoder():
    cfg = EncoderConfig(vocab_size=97, embed_dim=32, num_layers=1, num_heads=4, mlp_dim=64,
                        max_position_embeddings=32, dropout_rate=0.0)
    module = Encoder(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return module, jax.tree.map(jnp.asarray, flax_unbox(params))


def flax_unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree)


def _batch(rng, batch=16, group=3, q_len=8, p_len=12):
    def rows(n, length):
        tokens = rng.integers(1, 97, size=(n, length))
        lengths = rng.integers(2, length + 1, size=n)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        return {"tokens": (tokens * mask).astype(np.int32), "mask": mask}

    return rows(batch, q_len), rows(batch * group, p_len)


@pytest.mark.slow
def test_gradient_cache_equals_plain_loss_and_gradients(devices):
    module, params = _tiny_encoder()
    queries, passages = _batch(np.random.default_rng(1))
    cfg = c.ContrastiveConfig(temperature=0.05, query_query=True)

    def encode(params, inputs, rng):
        del rng
        return pool(module.apply({"params": params}, inputs["tokens"], inputs["mask"]),
                    inputs["mask"], "mean")

    def loss_from_embeddings(q, p, head):
        return c.contrastive_loss(cfg, q, p.reshape(16, 3, -1))

    def plain(params):
        rng = jax.random.key(0)
        return loss_from_embeddings(encode(params, queries, rng), encode(params, passages, rng), None)

    (want_loss, want_sums), want_grads = jax.value_and_grad(plain, has_aux=True)(params)
    mesh = part.make_mesh(part.MeshShape(data=8))
    batch_sharding = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    q_s, p_s = jax.tree.map(batch_sharding, (queries, passages))
    for chunks in (2,):  # 8 queries a chunk: one per device
        with jax.set_mesh(mesh):
            (loss, sums), grads, _ = jax.jit(lambda p, q, ps: c.gradient_cache(
                encode, loss_from_embeddings, p, q, ps, chunks=chunks,
                rng=jax.random.key(0)))(params, q_s, p_s)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
        np.testing.assert_allclose(float(sums["accuracy"]), float(want_sums["accuracy"]))
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-5)


def test_split_chunks_interleaves_rows_and_merges_back():
    x = jnp.arange(12)
    chunks = c.split_chunks(x, 3)
    np.testing.assert_array_equal(np.asarray(chunks[0]), [0, 3, 6, 9])
    np.testing.assert_array_equal(np.asarray(c.merge_chunks(chunks)), np.arange(12))
    with pytest.raises(ValueError, match="does not split"):
        c.split_chunks(x, 5)
