"""Encoders and decoders against transformers (PyTorch, CPU) on random tiny configs,
loaded through the Hugging Face bridge, and the round trip save_hf -> transformers."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5x_like import models  # noqa: E402
from t5x_like.convert import hf  # noqa: E402

TOL = 1e-4


def tiny_bert(**kw):
    cfg = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)
    cfg.update(kw)
    return transformers.BertModel(transformers.BertConfig(**cfg)).eval()


def tiny_xlmr(**kw):
    cfg = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=40, type_vocab_size=1,
               pad_token_id=1, bos_token_id=0, eos_token_id=2)
    cfg.update(kw)
    return transformers.XLMRobertaModel(transformers.XLMRobertaConfig(**cfg), add_pooling_layer=False).eval()


DECODER_BASE = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                    rms_norm_eps=1e-5)


def tiny_decoder(kind="llama", **kw):
    cfg = dict(DECODER_BASE, **kw)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    return model_cls(config_cls(**cfg)).eval()


def randomize_(model, seed=0, scale=0.3):
    """Random LayerNorm / bias values too, so that a swapped or dropped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def batch(vocab, lengths, total, pad_id, seed=0, low=3):
    rng = np.random.RandomState(seed)
    ids = rng.randint(low, vocab, (len(lengths), total))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad_id
    return ids, mask


def load(model, tmp_path, **save_kw):
    model.save_pretrained(tmp_path, **save_kw)
    return hf.load_hf(tmp_path)


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def max_diff(ours, ref, mask):
    return float(np.abs((np.asarray(ours) - ref) * mask[..., None]).max())


# ---------------------------------------------------------------------- encoders


@pytest.mark.parametrize("pooler", [True, False])
@pytest.mark.slow
def test_bert_matches_transformers(tmp_path, pooler):
    ref_model = randomize_(tiny_bert())
    if not pooler:
        ref_model = transformers.BertModel(ref_model.config, add_pooling_layer=False).eval()
        randomize_(ref_model, seed=1)
    config, params = load(ref_model, tmp_path)
    assert config.pooler == pooler
    ids, mask = batch(101, [17, 9, 1], 17, pad_id=0)
    types = (np.arange(17)[None] >= 5).astype(np.int64) * mask
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types))
    out = models.build(config).apply({"params": params}, ids, mask, types,
                                     with_pooler_output=pooler)
    hidden = out[0] if pooler else out
    assert max_diff(hidden, ref.last_hidden_state.numpy(), mask) <= TOL
    if pooler:
        assert np.abs(np.asarray(out[1]) - ref.pooler_output.numpy()).max() <= TOL


def test_xlm_roberta_matches_transformers_with_padding_offset_positions(tmp_path):
    ref_model = randomize_(tiny_xlmr())
    config, params = load(ref_model, tmp_path)
    assert config.model_type == "xlm-roberta" and config.pad_token_id == 1
    ids, mask = batch(101, [20, 6], 20, pad_id=1)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    # The mask is derived from the padding id, as transformers derives positions.
    out = models.build(config).apply({"params": params}, ids)
    assert max_diff(out, ref.numpy(), mask) <= TOL


# ---------------------------------------------------------------------- decoders

DECODER_CASES = {
    "llama_gqa": ("llama", {}),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=6, tie_word_embeddings=True)),
    "llama_head_dim_not_hidden_over_heads": ("llama", dict(head_dim=16)),
    "mistral_sliding_window": ("mistral", dict(sliding_window=5)),
    "qwen2_qkv_bias": ("qwen2", dict(rope_theta=1e6)),
    "qwen2_sliding_window": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                           max_window_layers=0)),
}

ROPE_CASES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),  # active: 24 tokens > max positions 16
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
    "yarn_mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8,
                        mscale=0.8, mscale_all_dim=0.5, beta_fast=16.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
}


def decoder_reference(ref_model, ids, mask, causal=True):
    """transformers' logits and last hidden states; a 4-D all-visible mask drops causality."""
    attention = torch.tensor(mask)
    if not causal:
        keys = torch.tensor(mask, dtype=torch.bool)
        attention = keys[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    with torch.no_grad():
        out = ref_model(torch.tensor(ids), attention_mask=attention, output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def decoder_ours(config, params, ids, mask):
    module = models.build(config)
    logits = module.apply({"params": params}, ids, segment_ids=mask)
    hidden = module.apply({"params": params}, ids, segment_ids=mask, return_hidden=True)
    return logits, hidden


@pytest.mark.parametrize("case", sorted(DECODER_CASES))
def test_decoder_matches_transformers(tmp_path, case):
    kind, kw = DECODER_CASES[case]
    ref_model = randomize_(tiny_decoder(kind, **kw))
    config, params = load(ref_model, tmp_path)
    assert config.model_type == kind
    ids, mask = batch(97, [24, 13], 24, pad_id=0)
    ref_logits, ref_hidden = decoder_reference(ref_model, ids, mask)
    logits, hidden = decoder_ours(config, params, ids, mask)
    assert max_diff(hidden, ref_hidden, mask) <= TOL
    assert max_diff(logits, ref_logits, mask) <= TOL


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_matches_transformers(tmp_path, case):
    ref_model = randomize_(tiny_decoder("llama", max_position_embeddings=16,
                                        rope_parameters=dict(ROPE_CASES[case], rope_theta=500.0)))
    config, params = load(ref_model, tmp_path)
    assert config.rope_scaling.rope_type == ROPE_CASES[case]["rope_type"]
    ids, mask = batch(97, [24, 20], 24, pad_id=0)
    ref_logits, ref_hidden = decoder_reference(ref_model, ids, mask)
    logits, hidden = decoder_ours(config, params, ids, mask)
    assert max_diff(hidden, ref_hidden, mask) <= TOL
    assert max_diff(logits, ref_logits, mask) <= TOL


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_bidirectional_decoder_matches_transformers_without_causal_mask(tmp_path, kind):
    kw = {"sliding_window": 6} if kind == "mistral" else {}
    ref_model = randomize_(tiny_decoder(kind, **kw))
    config, params = load(ref_model, tmp_path)
    config = dataclasses.replace(config, causal=False, sliding_window=None)
    ids, mask = batch(97, [18, 11], 18, pad_id=0)
    ref_logits, ref_hidden = decoder_reference(ref_model, ids, mask, causal=False)
    logits, hidden = decoder_ours(config, params, ids, mask)
    assert max_diff(hidden, ref_hidden, mask) <= TOL
    assert max_diff(logits, ref_logits, mask) <= TOL


# -------------------------------------------------------------- layouts, dtypes


@pytest.mark.parametrize("layout", [dict(scan_layers=True), dict(remat_policy="full"),
                                    dict(scan_layers=True, remat_policy="dots")])
def test_scan_and_remat_give_the_same_outputs(tmp_path, layout):
    ref_model = randomize_(tiny_decoder("qwen2"))
    ref_model.save_pretrained(tmp_path)
    config, params = hf.load_hf(tmp_path)
    ids, mask = batch(97, [12, 7], 12, pad_id=0)
    expected = models.build(config).apply({"params": params}, ids, segment_ids=mask)
    state = hf.read_state_dict(tmp_path)
    scanned_config = dataclasses.replace(config, **layout)
    scanned = hf.params_from_state_dict(scanned_config, state)
    if layout.get("scan_layers"):
        assert "layers" in scanned and scanned["layers"]["mlp"]["up"]["kernel"].shape[0] == 2
    got = models.build(scanned_config).apply({"params": scanned}, ids, segment_ids=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    ref_model = randomize_(tiny_bert())
    config, params = load(ref_model, tmp_path)
    ids, mask = batch(101, [16, 10], 16, pad_id=0)
    fp32 = models.build(config).apply({"params": params}, ids, mask)
    bf16 = models.build(dataclasses.replace(config, dtype="bfloat16")).apply({"params": params}, ids, mask)
    assert bf16.dtype == jnp.bfloat16
    assert max_diff(np.asarray(bf16, np.float32), np.asarray(fp32), mask) < 0.1


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("make", ["bert", "xlmr", "llama_yarn", "mistral", "qwen2_tied",
                                  "mistral_bare"])
def test_save_hf_round_trip_through_transformers(tmp_path, make):
    ref_model = {
        "bert": lambda: tiny_bert(),
        "xlmr": lambda: tiny_xlmr(),
        "llama_yarn": lambda: tiny_decoder("llama", rope_parameters=dict(
            rope_type="yarn", factor=2.0, original_max_position_embeddings=32, rope_theta=1e4)),
        "mistral": lambda: tiny_decoder("mistral", sliding_window=7),
        "qwen2_tied": lambda: tiny_decoder("qwen2", tie_word_embeddings=True),
        # E5-mistral ships as a bare MistralModel: no LM head, hidden states out.
        "mistral_bare": lambda: transformers.MistralModel(
            transformers.MistralConfig(**DECODER_BASE, sliding_window=None)),
    }[make]().eval()
    randomize_(ref_model, seed=3)
    config, params = load(ref_model, tmp_path / "src")
    hf.save_hf(config, params, tmp_path / "out")
    decoder = isinstance(config, models.DecoderConfig) and config.lm_head
    auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModel
    reloaded = auto.from_pretrained(tmp_path / "out").eval()
    pad = getattr(config, "pad_token_id", 0)
    ids, mask = batch(config.vocab_size, [14, 9], 14, pad_id=pad)
    with torch.no_grad():
        a = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask))
        b = reloaded(torch.tensor(ids), attention_mask=torch.tensor(mask))
    key = "logits" if decoder else "last_hidden_state"
    assert max_diff(a[key].numpy(), b[key].numpy(), mask) <= 1e-6
    # And our own reload of what we wrote gives back the same parameters.
    config2, params2 = hf.load_hf(tmp_path / "out")
    assert config2 == config
    assert_same_params(params, params2)


def test_loads_pytorch_bin_and_sharded_safetensors(tmp_path):
    ref_model = randomize_(tiny_decoder("llama"))
    config, params = load(ref_model, tmp_path / "single")
    torch.save(ref_model.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin.pt").rename(tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for variant in ("bin", "sharded"):
        config2, params2 = hf.load_hf(tmp_path / variant)
        assert config2 == config
        assert_same_params(params, params2)


def test_save_hf_shards_large_checkpoints(tmp_path):
    ref_model = randomize_(tiny_decoder("llama"))
    config, params = load(ref_model, tmp_path / "src")
    hf.save_hf(config, params, tmp_path / "out", max_shard_bytes=30_000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    _, params2 = hf.load_hf(tmp_path / "out")
    assert_same_params(params, params2)


# ---------------------------------------------------------------------- errors


def test_missing_and_mismatched_tensors_are_named(tmp_path):
    ref_model = tiny_decoder("llama")
    ref_model.save_pretrained(tmp_path)
    state = hf.read_state_dict(tmp_path)
    config = hf.config_from_hf(hf.read_hf_config(tmp_path))
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 48), np.float32)
    with pytest.raises(hf.CheckpointError) as err:
        hf.params_from_state_dict(config, broken, "ckpt")
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in str(err.value) and "(3, 48)" in str(err.value)


def test_foreign_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(hf.CheckpointError, match="gpt2"):
        hf.load_hf(tmp_path)
    # A BERT checkpoint under a Llama config: the first tensor looked up is named.
    tiny_bert().save_pretrained(tmp_path / "bert")
    llama_config = tiny_decoder("llama").config.to_dict()
    import json
    (tmp_path / "bert" / "config.json").write_text(json.dumps(llama_config))
    with pytest.raises(hf.CheckpointError, match="embed_tokens.weight"):
        hf.load_hf(tmp_path / "bert")
    with pytest.raises(hf.CheckpointError, match="no weights found"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(llama_config))
        hf.load_hf(tmp_path / "empty")
