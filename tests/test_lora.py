"""LoRA adapters: initialisation, merge, gradients, scanned / unrolled layers, export.

Checked: zero ``b`` leaves the model unchanged; a merged multi-dim kernel
(``query`` [embed, heads, head_dim] and ``out`` [heads, head_dim, embed]) gives
``x @ W + s * (x @ a) @ b`` of a float64 numpy reference; gradients through
``merge`` equal numpy's and a finite difference, and the base gets none; the
adapters' logical axes match the kernels' own annotations and shard on a mesh;
scanned and unrolled decoders agree; merge -> save_hf -> load_hf returns the
merged parameters; bad configs and targets fail with the field named.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import partitioning as part
from t5x_like.convert import hf
from t5x_like.models import Decoder, DecoderConfig, Encoder, EncoderConfig, layers, lora

DECODER = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_dim=48)
CONFIG = lora.LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(1, DECODER.vocab_size, size=(2, 12)).astype(np.int32)


def random_params(module, *args, seed=0):
    """Right-shaped parameters drawn in numpy (a jitted Flax init is slow to compile on CPU)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(np.float32), shapes)


def with_random_b(adapters, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (rng.normal(size=x.shape) * 0.1).astype(np.float32)
        if p[-1].key == "b" else x, adapters)


def stack_layers(tree, num_layers):
    """``layer_{i}`` subtrees -> one ``layers`` subtree with a leading axis (the scan layout)."""
    tree = dict(tree)
    per_layer = [tree.pop(f"layer_{i}") for i in range(num_layers)]
    tree["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
    return tree


def max_abs(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def params():
    return random_params(Decoder(DECODER), TOKENS)


# --------------------------------------------------------------------------- init


def test_init_shapes_axes_and_zero_b(params):
    adapters = lora.init(params, CONFIG, jax.random.key(0))
    assert sorted(adapters) == ["layer_0", "layer_1"]
    q = adapters["layer_0"]["attention"]["query"]
    assert q["a"].shape == (32, 4) and q["b"].shape == (4, 4, 8)
    out = adapters["layer_1"]["attention"]["out"]
    assert out["a"].shape == (4, 8, 4) and out["b"].shape == (4, 32)
    assert sorted(adapters["layer_0"]["mlp"]) == ["down", "gate", "up"]
    assert all(not np.any(np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(adapters)
               if p[-1].key == "b")
    # PEFT's lora_A init: uniform within 1/sqrt(fan_in), fan_in = heads * head_dim for `out`.
    assert 0.5 / np.sqrt(32) < np.max(np.abs(out["a"])) <= 1 / np.sqrt(32)
    assert not np.allclose(adapters["layer_0"]["attention"]["out"]["a"], out["a"])

    merged = lora.merge(params, adapters, CONFIG)
    assert max_abs(merged, params) == 0.0
    forward = jax.jit(lambda p: Decoder(DECODER).apply({"params": p}, TOKENS))
    assert max_abs(forward(merged), forward(params)) == 0.0


def test_logical_axes_match_the_kernels_annotations():
    """a takes the kernel's input axes, b its output axes: checked against the model itself."""
    for config in (DECODER, dataclasses.replace(DECODER, scan_layers=True)):
        boxed = jax.eval_shape(Decoder(config).init, jax.random.key(0), TOKENS)["params"]
        kernel_specs = nn.get_partition_spec(boxed)
        adapters = lora.init(nn.unbox(boxed), CONFIG, jax.random.key(0))
        specs = lora.logical_axes(adapters)
        layer = "layers" if config.scan_layers else "layer_0"
        for block, name in [("attention", "query"), ("attention", "key"), ("attention", "out"),
                            ("mlp", "gate"), ("mlp", "down")]:
            kernel = tuple(kernel_specs[layer][block][name]["kernel"])
            split = int(config.scan_layers) + len(lora.PROJECTIONS[name][0])
            lead = kernel[:int(config.scan_layers)]
            assert tuple(specs[layer][block][name]["a"]) == kernel[:split] + (None,)
            assert tuple(specs[layer][block][name]["b"]) == lead + (None,) + kernel[split:]


# ------------------------------------------------------------- merged Dense vs numpy


@pytest.mark.parametrize("name, in_axes, out_axes", [
    ("query", ("embed",), ("heads", "head_dim")),
    ("out", ("heads", "head_dim"), ("embed",)),
])
def test_merged_dense_equals_numpy_low_rank_update(params, name, in_axes, out_axes):
    adapters = with_random_b(lora.init(params, CONFIG, jax.random.key(1)))
    merged = lora.merge(params, adapters, CONFIG)
    w = np.asarray(params["layer_1"]["attention"][name]["kernel"], np.float64)
    a = np.asarray(adapters["layer_1"]["attention"][name]["a"], np.float64)
    b = np.asarray(adapters["layer_1"]["attention"][name]["b"], np.float64)
    n_in = len(in_axes)
    x = np.random.default_rng(2).normal(size=(3, 5) + w.shape[:n_in])

    dense = layers.Dense(features=w.shape[n_in:], in_axes=in_axes, out_axes=out_axes)
    got = dense.apply({"params": {"kernel": merged["layer_1"]["attention"][name]["kernel"]}},
                      jnp.asarray(x, jnp.float32))
    axes = (list(range(2, 2 + n_in)), list(range(n_in)))
    want = np.tensordot(x, w, axes) + CONFIG.scale * np.tensordot(
        np.tensordot(x, a, axes), b, axes=([2], [0]))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


# -------------------------------------------------------------------- gradients


def test_gradients_through_merge(params):
    adapters = with_random_b(lora.init(params, CONFIG, jax.random.key(2)))
    w = params["layer_0"]["attention"]["out"]["kernel"]  # [heads, head_dim, embed]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6,) + w.shape[:2]).astype(np.float32)
    g = rng.normal(size=(6, w.shape[2])).astype(np.float32)

    def loss(params, adapters):  # sum(g * (x @ W_merged)) for one multi-dim kernel
        kernel = lora.merge(params, adapters, CONFIG)["layer_0"]["attention"]["out"]["kernel"]
        return jnp.sum(g * jnp.tensordot(x, kernel, axes=([1, 2], [0, 1])))

    d_params, d_adapters = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, adapters)
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(d_params))  # base frozen

    a = np.asarray(adapters["layer_0"]["attention"]["out"]["a"], np.float64)
    b = np.asarray(adapters["layer_0"]["attention"]["out"]["b"], np.float64)
    d_kernel = np.tensordot(x.astype(np.float64), g, axes=([0], [0]))  # [heads, head_dim, embed]
    want_da = CONFIG.scale * np.tensordot(d_kernel, b, axes=([2], [1]))
    want_db = CONFIG.scale * np.tensordot(a, d_kernel, axes=([0, 1], [0, 1]))
    got = d_adapters["layer_0"]["attention"]["out"]
    np.testing.assert_allclose(got["a"], want_da, rtol=1e-5, atol=1e-5 * np.abs(want_da).max())
    np.testing.assert_allclose(got["b"], want_db, rtol=1e-5, atol=1e-5 * np.abs(want_db).max())
    untouched = d_adapters["layer_1"]["mlp"]["up"]
    assert not np.any(untouched["a"]) and not np.any(untouched["b"])


def test_decoder_gradient_matches_finite_difference(params):
    adapters = with_random_b(lora.init(params, CONFIG, jax.random.key(3)))
    model = Decoder(DECODER)
    # Linear in the logits: its value is not a large constant that fp32 differences lose.
    weights = np.random.default_rng(5).normal(size=TOKENS.shape + (DECODER.vocab_size,))

    def loss(adapters):
        logits = model.apply({"params": lora.merge(params, adapters, CONFIG)}, TOKENS)
        return jnp.sum(logits * weights.astype(np.float32))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, grads = value_and_grad(adapters)
    rng = np.random.default_rng(4)
    direction = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), adapters)
    eps = 1e-3  # the loss is strongly curved along a random direction: stay close
    shifted = [jax.tree.map(lambda x, d, s=s: x + s * eps * d, adapters, direction) for s in (1, -1)]
    plus, minus = (float(value_and_grad(t)[0]) for t in shifted)
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                         jax.tree.leaves(direction)))
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic), (numeric, analytic)


# ------------------------------------------------------- attached, not merged


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_attached_adapters_equal_the_merged_kernels(params, scan):
    """Training applies adapters unmerged (x @ W + (x @ a) @ b): the same logits and
    the same adapter gradients as the merged kernels, no gradient for the base."""
    adapters = with_random_b(lora.init(params, CONFIG, jax.random.key(6)))
    config, base = DECODER, params
    if scan:
        config = dataclasses.replace(DECODER, scan_layers=True)
        base, adapters = stack_layers(params, 2), stack_layers(adapters, 2)
    model = Decoder(config)
    weights = np.random.default_rng(7).normal(size=TOKENS.shape + (DECODER.vocab_size,)).astype(np.float32)

    def loss(base, adapters, join):
        return jnp.sum(model.apply({"params": join(base, adapters, CONFIG)}, TOKENS) * weights)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (merged_loss, (_, merged_grads)) = grad(base, adapters, lora.merge)
    (attached_loss, (base_grads, attached_grads)) = grad(base, adapters, lora.attach)
    assert abs(float(attached_loss) - float(merged_loss)) <= 1e-4 * abs(float(merged_loss))
    assert max_abs(attached_grads, merged_grads) <= 1e-4 * max(
        float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(merged_grads))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(base_grads))
    attached = lora.attach(base, adapters, CONFIG)
    layer = attached["layers"] if scan else attached["layer_0"]
    assert set(layer["attention"]["query"]) == {"kernel", "lora_a", "lora_b"}


# ----------------------------------------------------------- scanned vs unrolled


def test_scanned_and_unrolled_decoders_agree(params):
    adapters = with_random_b(lora.init(params, CONFIG, jax.random.key(4)))
    unrolled = jax.jit(lambda p, a: Decoder(DECODER).apply({"params": lora.merge(p, a, CONFIG)},
                                                           TOKENS))(params, adapters)

    scanned_config = dataclasses.replace(DECODER, scan_layers=True)
    scanned_params = stack_layers(params, DECODER.num_layers)
    scanned_adapters = stack_layers(adapters, DECODER.num_layers)
    assert scanned_adapters["layers"]["attention"]["out"]["a"].shape == (2, 4, 8, 4)
    scanned = jax.jit(lambda p, a: Decoder(scanned_config).apply(
        {"params": lora.merge(p, a, CONFIG)}, TOKENS))(scanned_params, scanned_adapters)
    assert max_abs(scanned, unrolled) <= 1e-5

    fresh = lora.init(scanned_params, CONFIG, jax.random.key(0))  # init on a scanned tree
    assert fresh["layers"]["mlp"]["down"]["a"].shape == (2, 48, 4)
    assert fresh["layers"]["mlp"]["down"]["b"].shape == (2, 4, 32)
    assert lora.logical_axes(fresh)["layers"]["mlp"]["down"]["b"] == \
        jax.sharding.PartitionSpec("layers", None, "embed")


def test_sharded_merge_equals_unsharded(params, devices):
    config = dataclasses.replace(DECODER, scan_layers=True)
    base = stack_layers(params, DECODER.num_layers)
    adapters = with_random_b(lora.init(base, CONFIG, jax.random.key(5)))
    want = lora.merge(base, adapters, CONFIG)

    mesh = part.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(Decoder(config).init, jax.random.key(0), TOKENS)["params"]
    base_shardings = part.tree_shardings(mesh, nn.get_partition_spec(boxed), base)
    lora_shardings = part.tree_shardings(mesh, lora.logical_axes(adapters), adapters)
    assert lora_shardings["layers"]["attention"]["query"]["b"].spec == \
        jax.sharding.PartitionSpec(None, None, "tensor", None)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda p, a: lora.merge(p, a, CONFIG), out_shardings=base_shardings)(
            jax.device_put(base, base_shardings), jax.device_put(adapters, lora_shardings))
    assert max_abs(got, want) <= 1e-6


# ----------------------------------------------------------------------- export


def test_merge_save_hf_load_hf_round_trip(params, tmp_path):
    config = dataclasses.replace(DECODER, scan_layers=True)
    base = stack_layers(params, DECODER.num_layers)
    adapters = with_random_b(lora.init(base, CONFIG, jax.random.key(6)))
    merged = lora.merge(base, adapters, CONFIG)
    hf.save_hf(config, merged, tmp_path / "merged")
    loaded_config, loaded = hf.load_hf(tmp_path / "merged")
    assert loaded_config.num_layers == config.num_layers
    loaded = stack_layers(loaded, config.num_layers) if "layers" not in loaded else loaded
    assert jax.tree.structure(loaded) == jax.tree.structure(merged)
    assert max_abs(loaded, merged) == 0.0
    assert max_abs(loaded, base) > 1e-3  # the adapters really are in the export


# ----------------------------------------------------------------------- errors


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"LoraConfig.targets has unknown .*'q_proj'.*'query'"):
        lora.LoraConfig(targets=("q_proj",))
    with pytest.raises(ValueError, match="LoraConfig.rank=0"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="LoraConfig.alpha"):
        lora.LoraConfig(alpha=0.0)
    with pytest.raises(ValueError, match="LoraConfig.dropout=0.1"):
        lora.LoraConfig(dropout=0.1)
    assert lora.LoraConfig(targets=["query", "value"]).targets == ("query", "value")


def test_targets_missing_from_the_params_list_what_is_there(params):
    encoder = EncoderConfig(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32,
                            max_position_embeddings=16)
    shapes = nn.unbox(jax.eval_shape(Encoder(encoder).init, jax.random.key(0), TOKENS[:, :8]))
    with pytest.raises(ValueError, match=r"\['gate'\] match no kernel.*\['down', 'key', 'out', "
                                         r"'query', 'up', 'value'\]"):
        lora.init(shapes["params"], lora.LoraConfig(targets=("query", "gate")), jax.random.key(0))
    # BERT-shaped encoders adapt too (biases untouched).
    adapters = lora.init(shapes["params"], lora.LoraConfig(targets=("query", "up")),
                         jax.random.key(0))
    assert sorted(adapters["layer_0"]) == ["attention", "mlp"]

    adapters = lora.init(params, CONFIG, jax.random.key(0))
    with pytest.raises(ValueError, match="LoraConfig.rank=8"):
        lora.merge(params, adapters, lora.LoraConfig(rank=8))
    with pytest.raises(ValueError, match=r"layer_0/attention/key.*LoraConfig.targets"):
        lora.merge(params, adapters, lora.LoraConfig(rank=4, targets=("query",)))
