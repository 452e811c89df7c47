"""Mesh construction, logical-axis rules, and 1-device vs 8-device equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning as part
from t5x_like.models.decoder import Decoder, DecoderConfig


def test_mesh_takes_remaining_devices(devices):
    mesh = part.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert "data=4" in part.describe_mesh(mesh)


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"data": 3, "fsdp": -1}, "multiply to 3, which does not divide 8"),
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"data": 2, "fsdp": 2}, "has 4 devices but 8 are available"),
        ({"data": 0}, "must be positive or -1"),
        ({"dat": 8}, r"unknown field\(s\) \['dat'\]"),
    ],
)
def test_mesh_errors_name_the_problem(devices, shape, match):
    with pytest.raises(ValueError, match=match):
        part.make_mesh(shape)


def test_rules_resolve_like_t5x():
    # Activations: batch takes data and fsdp, so embed falls back to replicated.
    assert part.logical_to_mesh_axes(("batch", "length", "embed")) == P(
        ("data", "fsdp"), "sequence", None
    )
    # Parameters: embed is FSDP-sharded, vocab / heads / mlp tensor-parallel.
    assert part.logical_to_mesh_axes(("vocab", "embed")) == P("tensor", "fsdp")
    assert part.logical_to_mesh_axes(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert part.logical_to_mesh_axes(("heads", "head_dim", "embed")) == P("tensor", None, "fsdp")
    assert part.logical_to_mesh_axes((None, "mlp")) == P(None, "tensor")


def test_rule_table_is_swappable_without_code_change():
    rules = (("batch", "data"), ("embed", "tensor"), ("vocab", None))
    with part.axis_rules(rules):
        assert part.logical_to_mesh_axes(("vocab", "embed")) == P(None, "tensor")
    assert part.logical_to_mesh_axes(("vocab", "embed")) == P("tensor", "fsdp")


def test_rule_errors():
    with pytest.raises(KeyError, match="logical axis 'channels' has no rule"):
        part.logical_to_mesh_axes(("batch", "channels"))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        part.validate_rules((("embed", "model"),))


def test_parameter_that_does_not_divide_is_named(devices):
    mesh = part.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    cfg = DecoderConfig(vocab_size=100, embed_dim=32, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_dim=64)
    tokens = jnp.zeros((8, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"parameter .*embed.*'vocab', size 100.*\('tensor',\)"):
        part.sharded_init(Decoder(cfg), mesh, jax.random.key(0), tokens)


def test_activation_that_does_not_divide_is_named(devices):
    mesh = part.make_mesh({"data": 8})
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"activation: dimension 0 \('batch', size 6\)"):
            jax.jit(lambda x: part.with_logical_constraint(x, ("batch", "embed")))(
                jnp.ones((6, 4))
            )


def test_constraint_is_a_no_op_outside_a_mesh():
    x = jnp.ones((3, 5))
    assert part.with_logical_constraint(x, ("batch", "embed")) is x


def test_shard_batch_splits_the_leading_axis(devices):
    mesh = part.make_mesh({"data": 2, "fsdp": 4})
    batch = part.shard_batch(mesh, {"tokens": np.arange(16 * 3).reshape(16, 3)})
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert len(batch["tokens"].addressable_shards) == 8
    with pytest.raises(ValueError, match="batch: dimension 0 .*size 12"):
        part.shard_batch(mesh, {"tokens": np.zeros((12, 3))})


# ------------------------------------------------- the same layer on 1 and 8 devices

TINY = DecoderConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=128)


def _forward(mesh_shape, devices, tokens, segment_ids, positions):
    mesh = part.make_mesh(mesh_shape, devices=devices)
    model = Decoder(TINY)
    params, shardings = part.sharded_init(model, mesh, jax.random.key(0), tokens)
    with jax.set_mesh(mesh):
        batch = part.shard_batch(mesh, (tokens, segment_ids, positions))
        logits = jax.jit(lambda p, b: model.apply({"params": p}, *b))(params, batch)
    return np.asarray(logits), params, shardings


@pytest.mark.parametrize(
    "layout",
    [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "sequence": 4}],
    ids=["data8", "data2-fsdp2-tensor2", "data2-sequence4"],
)
@pytest.mark.slow
def test_sharded_decoder_matches_one_device(devices, layout):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, size=(8, 32)).astype(np.int32)
    segment_ids = np.repeat(np.arange(4, dtype=np.int32), 8)[None].repeat(8, 0)
    positions = np.tile(np.arange(8, dtype=np.int32), 4)[None].repeat(8, 0)
    want, _, _ = _forward({"data": 1}, devices[:1], tokens, segment_ids, positions)
    got, params, shardings = _forward(layout, devices, tokens, segment_ids, positions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The parameters really are laid out by the rules (not silently replicated).
    emb = params["embed"]["embedding"]
    assert emb.sharding == shardings["embed"]["embedding"]
    expected = P("tensor", "fsdp")
    assert emb.sharding.spec == expected
    if layout.get("tensor", 1) > 1:
        assert len({str(s.index) for s in emb.addressable_shards}) == 4
