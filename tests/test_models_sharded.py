"""The same forward pass, sharded over 8 devices, gives the same outputs as on one.

For a tiny BERT-shaped encoder and a tiny GQA decoder (looped and scanned
layers) the parameters are initialised ONCE, unsharded, and the reference
forward runs on a single device with no mesh (every logical constraint is then
a no-op). The very same parameter values are then placed on an 8-device mesh
with the shardings the logical-axis rules give, the batch is sharded, and a
jitted forward under ``jax.set_mesh`` must reproduce the reference.

Each layout also checks the per-device parameter shapes it implies, written out
by hand from the layout, so the test cannot pass by silently replicating.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from t5x_like import partitioning as part
from t5x_like.models import DecoderConfig, EncoderConfig, build

BATCH, LENGTH = 8, 32

ENCODER = EncoderConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128,
                        max_position_embeddings=64, dropout_rate=0.0)
DECODER = DecoderConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=8, num_kv_heads=4,
                        head_dim=16, mlp_dim=128)
MODELS = {
    "encoder": ENCODER,
    "decoder": DECODER,
    "decoder-scan": dataclasses.replace(DECODER, scan_layers=True),
}

# Mesh layouts over the 8 devices (unnamed axes are 1). Heads (4 in the encoder,
# 4 kv heads in the decoder) must divide the tensor axis, so tensor is at most 4.
LAYOUTS = {
    "data8": {"data": 8},
    "fsdp8": {"data": 1, "fsdp": 8},
    "data2-tensor4": {"data": 2, "tensor": 4},
    "fsdp2-tensor4": {"data": 1, "fsdp": 2, "tensor": 4},
    # DEFAULT_RULES map `length` to `sequence`: activations are split along length.
    "data4-sequence2": {"data": 4, "sequence": 2},
}


# ------------------------------------------------------------------------ batches


def _encoder_batch(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Token ids with right padding (pad id 0) of varied lengths, and the mask."""
    lengths = np.array([LENGTH, 30, 17, 5, LENGTH, 1, 24, 9])
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    tokens = rng.integers(1, ENCODER.vocab_size, size=(BATCH, LENGTH)) * mask
    return tokens.astype(np.int32), mask


def _packed_batch(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Rows packed with 1-4 documents each (ids 1, 2, ...), then padding (id 0).

    Positions restart at 0 in every document, as the packer writes them.
    """
    tokens = rng.integers(1, DECODER.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
    segment_ids = np.zeros((BATCH, LENGTH), np.int32)
    positions = np.zeros((BATCH, LENGTH), np.int32)
    for row in range(BATCH):
        start = 0
        for doc in range(1, int(rng.integers(1, 5)) + 1):
            n = int(rng.integers(1, LENGTH // 2))
            if start + n > LENGTH:
                break
            segment_ids[row, start:start + n] = doc
            positions[row, start:start + n] = np.arange(n)
            start += n
    tokens = tokens * (segment_ids > 0)
    return tokens, segment_ids, positions


# ---------------------------------------------------------------- one model case


@dataclasses.dataclass(frozen=True)
class Case:
    forward: Callable[[Any, tuple], jax.Array]  # (params, inputs) -> output
    specs: Any  # logical PartitionSpecs of the parameters (from the boxed init)
    params: Any  # unboxed parameter values, on one device
    inputs: tuple[np.ndarray, ...]  # host batch
    reference: np.ndarray  # forward on one device, no mesh
    query_kernel: tuple[str, ...]  # path of the first layer's query kernel


@functools.lru_cache(maxsize=None)
def _case(name: str) -> Case:
    config = MODELS[name]
    model = build(config)
    rng = np.random.default_rng(0)
    if isinstance(config, EncoderConfig):
        inputs = _encoder_batch(rng)

        def forward(params, batch):
            tokens, mask = batch
            return model.apply({"params": params}, tokens, mask)
    else:
        inputs = _packed_batch(rng)

        def forward(params, batch):
            tokens, segment_ids, positions = batch
            return model.apply({"params": params}, tokens, segment_ids=segment_ids,
                               positions=positions)

    # One plain init: the boxed tree carries the logical axis names, the
    # unboxed one the values that every layout below reuses.
    # (Jitted, with the rbg PRNG, only to compile quickly: threefry's bit
    # generation is what makes an init slow to compile on CPU.)
    boxed = jax.jit(model.init)(jax.random.key(0, impl="rbg"), *inputs)["params"]
    params = nn.unbox(boxed)
    reference = np.asarray(jax.jit(forward)(params, inputs))
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0.1
    layer = "layers" if config.scan_layers else "layer_0"
    return Case(forward, nn.get_partition_spec(boxed), params, inputs, reference,
                (layer, "attention", "query", "kernel"))


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _shard_shapes(x: jax.Array) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in x.addressable_shards}


def _distinct_pieces(x: jax.Array) -> int:
    return len({str(s.index) for s in x.addressable_shards})


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("name", list(MODELS))
def test_sharded_forward_matches_one_device(devices, name, layout):
    case = _case(name)
    config = MODELS[name]
    mesh = part.make_mesh(layout, devices)
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]

    # The SAME values, laid out by the rules (divisibility checked per parameter).
    shardings = part.tree_shardings(mesh, case.specs, case.params)
    params = jax.device_put(case.params, shardings)

    # Per-device shapes written out from the layout, not from the rules machinery:
    # the query kernel [(layers,) embed, heads, head_dim] splits embed over fsdp
    # and heads over tensor; the token table [vocab, embed] splits vocab over
    # tensor and embed over fsdp. Data / sequence axes replicate parameters.
    query = _get(params, case.query_kernel)
    layers = (config.num_layers,) if config.scan_layers else ()
    assert _shard_shapes(query) == {
        layers + (config.embed_dim // fsdp, config.num_heads // tensor, config.head_dim)
    }
    assert _distinct_pieces(query) == fsdp * tensor
    table = params["embed"]["embedding"]
    assert _shard_shapes(table) == {(config.vocab_size // tensor, config.embed_dim // fsdp)}
    # ...and by the named mesh axes, not merely into pieces of the right size.
    assert tuple(query.sharding.spec)[len(layers):len(layers) + 2] == ("fsdp", "tensor")

    with jax.set_mesh(mesh):
        inputs = part.shard_batch(mesh, case.inputs)
        assert _distinct_pieces(inputs[0]) == mesh.shape["data"] * fsdp
        out = jax.jit(case.forward)(params, inputs)

    # Activations follow the rules too: batch over (data, fsdp), length over
    # sequence, and the decoder's logits over tensor along vocab.
    last = "vocab" if isinstance(config, DecoderConfig) else "embed"
    want = NamedSharding(mesh, part.logical_to_mesh_axes(("batch", "length", last)))
    assert out.sharding.is_equivalent_to(want, out.ndim), out.sharding
    np.testing.assert_allclose(np.asarray(out), case.reference, rtol=1e-5, atol=1e-5)


def test_hidden_states_match_one_device(devices):
    """``return_hidden=True`` (what embedders pool) also matches, on a mesh using all axes."""
    case = _case("decoder")
    model = build(DECODER)

    def hidden(params, batch):
        tokens, segment_ids, positions = batch
        return model.apply({"params": params}, tokens, segment_ids=segment_ids,
                           positions=positions, return_hidden=True)

    want = np.asarray(jax.jit(hidden)(case.params, case.inputs))
    mesh = part.make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}, devices)
    params = jax.device_put(case.params, part.tree_shardings(mesh, case.specs, case.params))
    with jax.set_mesh(mesh):
        got = jax.jit(hidden)(params, part.shard_batch(mesh, case.inputs))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
