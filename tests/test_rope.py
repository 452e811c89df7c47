"""RoPE frequencies against transformers' own rope initialisers, and the config plumbing."""

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import rope

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM = 64
MAX_POS = 2048
CASES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256),
    "yarn_no_truncate": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256,
                             truncate=False, beta_fast=24.0, beta_slow=2.0),
    "yarn_mscale": dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=128,
                        mscale=1.0, mscale_all_dim=0.7),
    "yarn_attention_factor": dict(rope_type="yarn", factor=4.0, attention_factor=1.3,
                                  original_max_position_embeddings=512),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256),
}


def hf_frequencies(params, theta, seq_len=None):
    config = transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=MAX_POS,
        rope_parameters=dict(params, rope_theta=theta),
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.double().numpy(), factor


@pytest.mark.parametrize("case", sorted(set(CASES) - {"dynamic"}))
def test_static_frequencies_match_transformers(case):
    scaling = rope.RopeScaling.from_hf(CASES[case])
    ours, factor = rope.scaled_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS)
    ref, ref_factor = hf_frequencies(CASES[case], 10000.0)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-6)


@pytest.mark.parametrize("seq_len", [100, MAX_POS, 3000, 9000])
def test_dynamic_ntk_follows_the_longest_position(seq_len):
    positions = jnp.arange(seq_len)[None]
    ours = rope.dynamic_ntk_frequencies(HEAD_DIM, 10000.0, 2.0, MAX_POS, positions)
    ref, _ = hf_frequencies(CASES["dynamic"], 10000.0, seq_len=seq_len)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-5)
    if seq_len <= MAX_POS:  # no scaling inside the original context
        np.testing.assert_allclose(np.asarray(ours), rope.inverse_frequencies(HEAD_DIM, 1e4), rtol=2e-6)


def test_static_ntk_is_a_base_change():
    ours, _ = rope.scaled_frequencies(HEAD_DIM, 1e4, rope.RopeScaling("ntk", factor=4.0), MAX_POS)
    expected = rope.inverse_frequencies(HEAD_DIM, 1e4 * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2)))
    np.testing.assert_allclose(ours, expected)


def test_rotation_preserves_norms_and_depends_only_on_relative_position():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(1, 1, 1, HEAD_DIM), jnp.float32)
    k = jnp.asarray(rng.randn(1, 1, 1, HEAD_DIM), jnp.float32)
    rot = rope.Rotary(HEAD_DIM, 1e4)

    def score(i, j):
        return float(jnp.sum(rot(q, jnp.full((1, 1), i)) * rot(k, jnp.full((1, 1), j))))

    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, jnp.full((1, 1), 55))), jnp.linalg.norm(q),
                               rtol=1e-6)


def test_config_round_trip_and_validation():
    for params in CASES.values():
        scaling = rope.RopeScaling.from_hf(params)
        again = rope.RopeScaling.from_hf(scaling.to_hf(5e5))
        assert again == scaling
    assert rope.RopeScaling.from_hf({"type": "linear", "factor": 2.0}).rope_type == "linear"  # old key
    assert rope.RopeScaling.from_hf(None) == rope.RopeScaling()
    with pytest.raises(ValueError, match="longrope"):
        rope.RopeScaling.from_hf({"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        rope.RopeScaling("linear", factor=0.0)


# ------------------------------------------- config.model.rope_scaling on a pretrained decoder

OVERRIDES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "ntk": dict(rope_type="ntk", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=2.0, beta_fast=16.0),
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0),
}


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory):
    """A small random Llama (context 32) written by transformers."""
    import torch

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=32,
        initializer_range=0.2))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_rope_scaling_override_extends_a_pretrained_decoder_and_exports(case, pretrained_llama,
                                                                        tmp_path):
    """An override on a pretrained model scores a 64-token row (twice its context) as
    transformers scores the exported directory, which it reads back unaided."""
    import torch

    from t5x_like import models, run_config
    from t5x_like.config_cli import load_with_overrides
    from t5x_like.convert import hf

    overrides = {f"model.rope_scaling.{k}": v for k, v in OVERRIDES[case].items()}
    # Dynamic NTK grows the base past max_position_embeddings, so that one stays at 32.
    context = {"model.max_position_embeddings": 32 if case == "dynamic" else 64}
    cfg = load_with_overrides("configs/base.py", **{
        "model.pretrained": str(pretrained_llama), **context, **overrides})
    config, params, _ = run_config.load_model(cfg)
    assert config.rope_scaling.rope_type == case
    if case in ("yarn", "llama3"):  # extends from the model's own context
        assert config.rope_scaling.original_max_position_embeddings == 32
    hf.save_hf(config, params, tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.RandomState(1).randint(0, 97, size=(2, 64))
    mask = np.ones_like(ids)
    ours = np.asarray(models.build(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        ref = exported(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    # And the scaling changed the logits past the original context (it is not a no-op).
    base_config, base_params, _ = run_config.load_model(load_with_overrides(
        "configs/base.py", **{"model.pretrained": str(pretrained_llama), **context}))
    base = np.asarray(models.build(base_config).apply({"params": base_params}, jnp.asarray(ids),
                                                     jnp.asarray(mask)))
    assert np.abs(base[:, 40:] - ours[:, 40:]).max() > 1e-2


def test_rope_scaling_override_errors_name_the_field(pretrained_llama):
    from t5x_like import run_config
    from t5x_like.config_cli import load_with_overrides

    def build(**overrides):
        return run_config.model_config(load_with_overrides("configs/base.py", **overrides))

    pretrained = {"model.pretrained": str(pretrained_llama)}
    with pytest.raises(ValueError, match=r"rope_scaling: \['factor'\] set without rope_type"):
        build(**pretrained, **{"model.rope_scaling.factor": 2.0})
    with pytest.raises(ValueError, match="rope_type='yarn' needs config.model.rope_scaling.factor"):
        build(**pretrained, **{"model.rope_scaling.rope_type": "yarn"})
    with pytest.raises(ValueError, match="config.model.rope_scaling.rope_type='longrope' is not one of"):
        build(**pretrained, **{"model.rope_scaling.rope_type": "longrope", "model.rope_scaling.factor": 2.0})
    with pytest.raises(ValueError, match="applies to decoders .* EncoderConfig"):
        build(**{"model.config.vocab_size": 10, "model.rope_scaling.rope_type": "linear",
                 "model.rope_scaling.factor": 2.0})
