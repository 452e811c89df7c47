"""Cached generation (t5x_like.generate) against transformers' generate and our own
uncached forward: tiny random Llama (GQA) / Mistral (sliding window smaller than
prompt + generation) checkpoints written by transformers, fp32."""

import dataclasses
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from t5x_like import generate as gen  # noqa: E402
from t5x_like import partitioning as part  # noqa: E402
from t5x_like.convert import hf  # noqa: E402
from t5x_like.models import DecoderConfig, build  # noqa: E402

PAD = 0
NEW = 16
# Prompts of different lengths (ids >= 3: 0 pad, 1 bos, 2 eos in the tiny configs).
PROMPTS = [[5, 17, 33, 8, 61, 12, 40, 9, 71], [44, 3], [90, 15, 27, 8, 66], [7]]

HF_BASE = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
               rms_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def _hf_model(kind, seed=0, **kw):
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**dict(HF_BASE, **kw))).eval()
    gen_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights: confident, well-separated argmaxes
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen_) * 0.3)
    return model


def _hf_greedy(model, prompts, new):
    """transformers' batched greedy generate: left padding and an attention mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=PAD,
                             eos_token_id=None)
    return out[:, width:].numpy()


CASES = {
    # GQA 6:2 heads, looped layers.
    "llama-gqa": ("llama", {}, False),
    # Window 6 < prompt (<= 9) + 16 new tokens: it masks keys during decoding; scanned layers.
    "mistral-window-scan": ("mistral", {"sliding_window": 6}, True),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    kind, kw, scan = CASES[request.param]
    model = _hf_model(kind, **kw)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    config, params = hf.load_hf(path)
    if scan:
        config = dataclasses.replace(config, scan_layers=True)
        params = hf._maybe_stack(config, dict(params))
    return model, config, params


def test_greedy_matches_transformers(hf_case):
    model, config, params = hf_case
    want = _hf_greedy(model, PROMPTS, NEW)
    out = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, pad_id=PAD, return_logits=True)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, [NEW] * len(PROMPTS))
    assert out.steps == NEW
    # A right-padded array with per-row lengths gives the same tokens.
    width = max(map(len, PROMPTS))
    right = np.full((len(PROMPTS), width), PAD, np.int32)
    for i, p in enumerate(PROMPTS):
        right[i, :len(p)] = p
    again = gen.generate(config, params, right, max_new_tokens=NEW, pad_id=PAD,
                         prompt_lengths=[len(p) for p in PROMPTS], return_logits=True)
    np.testing.assert_array_equal(again.tokens, want)
    np.testing.assert_allclose(again.logits, out.logits, rtol=1e-6, atol=1e-5)

    # The cached decode's logits at every generated position equal the uncached
    # forward over prompt + generated tokens (row by row, no padding).
    # One right-padded batch: causal, so the trailing padding changes no earlier logit.
    width = max(map(len, PROMPTS)) + NEW - 1
    seqs = np.full((len(PROMPTS), width), PAD, np.int32)
    for i, p in enumerate(PROMPTS):
        seqs[i, :len(p) + NEW - 1] = p + out.tokens[i, :-1].tolist()
    full = np.asarray(jax.jit(build(config).apply)({"params": params}, seqs))
    for i, p in enumerate(PROMPTS):
        row = full[i, len(p) - 1:len(p) - 1 + NEW]
        np.testing.assert_allclose(out.logits[i], row, rtol=1e-5, atol=1e-5 * np.abs(row).max())


# ------------------------------------------------------------------ our own tiny model

TINY = DecoderConfig(vocab_size=128, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_position_embeddings=64, sliding_window=5)


@pytest.fixture(scope="module")
def tiny():
    boxed = jax.jit(build(TINY).init)(jax.random.key(0, impl="rbg"), np.zeros((1, 4), np.int32))
    params = jax.tree.map(lambda x: x * 20.0, nn.unbox(boxed)["params"])  # peaked distributions
    return TINY, params


def test_stop_tokens_pad_the_row_and_end_the_loop(tiny):
    config, params = tiny
    free = gen.generate(config, params, PROMPTS, max_new_tokens=8)
    assert free.steps == 8
    # Row 1 stops at its third token (the first step where that id appears in it).
    stop = int(free.tokens[1, 2])
    first = [int(np.argmax(r == stop)) if (r == stop).any() else None for r in free.tokens]
    out = gen.generate(config, params, PROMPTS, max_new_tokens=8, stop_tokens=(stop,), pad_id=PAD)
    for i, f in enumerate(first):
        if f is None:  # never emits it: continues to the end, unchanged
            np.testing.assert_array_equal(out.tokens[i], free.tokens[i])
            assert out.lengths[i] == 8
        else:  # stop token kept, pad after; nothing before it changes
            np.testing.assert_array_equal(out.tokens[i, :f + 1], free.tokens[i, :f + 1])
            assert (out.tokens[i, f + 1:] == PAD).all() and out.lengths[i] == f + 1
    assert out.steps == 8 and first[1] == 2
    # Every row's third token is a stop token: the loop ends after three steps.
    ended = gen.generate(config, params, PROMPTS, max_new_tokens=8, pad_id=PAD,
                         stop_tokens=tuple(int(t) for t in free.tokens[:, 2]))
    assert ended.steps <= 3 and (ended.lengths <= 3).all()
    assert (ended.tokens[:, 3:] == PAD).all()


def test_sampling_seeded_and_filters(tiny):
    config, params = tiny
    kw = dict(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.9, pad_id=PAD)
    a = gen.generate(config, params, PROMPTS, seed=3, **kw)
    b = gen.generate(config, params, PROMPTS, seed=3, **kw)
    c = gen.generate(config, params, PROMPTS, seed=4, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    greedy = gen.generate(config, params, PROMPTS, max_new_tokens=8)
    top1 = gen.generate(config, params, PROMPTS, max_new_tokens=8, temperature=2.0, top_k=1,
                        top_p=0.9, seed=5)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_top_p_mask_is_the_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for p in (0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        got = np.asarray(gen.top_p_mask(probs.astype(np.float32), p))
        for row, keep in zip(probs, got):
            order = np.argsort(-row)
            cum = np.cumsum(row[order])
            m = min(int(np.searchsorted(cum, p - 1e-12)), len(row) - 1) + 1  # first count >= p
            want = np.zeros(len(row), bool)
            want[order[:m]] = True
            np.testing.assert_array_equal(keep, want)
            assert row[keep].sum() >= min(p, 1.0) - 1e-6 and row[keep].sum() - row[keep].min() < p
    # top-k: the k largest survive; with top-p after it, the nucleus of the renormalised k.
    filtered = np.asarray(gen.filter_logits(logits.astype(np.float32), 1.0, top_k=5))
    np.testing.assert_array_equal(np.isfinite(filtered).sum(-1), 5)
    np.testing.assert_array_equal(np.isfinite(filtered),
                                  logits >= np.sort(logits, -1)[:, -5:-4])


def test_sharded_equals_unsharded(devices, tiny):
    """data=4 x tensor=2 (kv heads split); 6 rows padded to the 4 batch shards."""
    config, params = tiny
    prompts = PROMPTS + [[9, 8, 7, 6, 5, 4], [100, 101, 102]]
    mesh = part.make_mesh({"data": 4, "tensor": 2}, devices)
    # Sampled (the random stream does not depend on the sharding), with a stop token;
    # the logits, equal too, are what greedy decoding takes the argmax of.
    for kw in (dict(temperature=1.0, top_k=20, top_p=0.95, seed=7, stop_tokens=(2,)),):
        want = gen.generate(config, params, prompts, max_new_tokens=8, return_logits=True, **kw)
        got = gen.generate(config, params, prompts, max_new_tokens=8, return_logits=True,
                           mesh=mesh, **kw)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5,
                                   atol=1e-5 * np.abs(want.logits).max())


def test_generate_text_with_sentencepiece(tmp_path):
    from t5x_like.convert.tokenizer import load_tokenizer
    from t5x_like.paths import shared_data

    model = _hf_model("llama", seed=1, vocab_size=32000, num_hidden_layers=1)
    model.save_pretrained(tmp_path)
    shutil.copy(shared_data("tokenizers/llama2.model"), tmp_path / "tokenizer.model")
    prompts = ["The pass key is", "Once upon a time there was a"]
    texts = gen.generate_text(tmp_path, prompts, max_new_tokens=6)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(prompts, 64)
    want = _hf_greedy(model, ids, 6)
    assert texts == [tok.decode(r.tolist()) for r in want]
    assert all(isinstance(t, str) and t for t in texts)
