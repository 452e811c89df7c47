"""Long-context probes: prompt builders (exact lengths, needle depth), the teacher-forced
scorer and sliding-window perplexity against float64 references from a tiny random decoder's
full logits, the plots, and the CLI end to end on a checkpoint written by save_hf."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.convert import hf
from t5x_like.convert.tokenizer import load_tokenizer
from t5x_like.evaluation import long_context as lc
from t5x_like.models.decoder import Decoder, DecoderConfig
from t5x_like.paths import shared_data

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer_path():
    return shared_data("tokenizers/llama2.model")


@pytest.fixture(scope="module")
def pieces(tokenizer_path):
    return lc.PieceTokenizer(load_tokenizer(tokenizer_path))


@pytest.fixture(scope="module")
def book_path():
    return shared_data("text/gutenberg/frankenstein_pg84.txt")


@pytest.fixture(scope="module")
def tiny():
    config = DecoderConfig(vocab_size=32000, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=8, mlp_dim=64, max_position_embeddings=512)
    # Decoder.init's shapes, numpy values: compiling the init's RNG alone takes ~8 s on 2 cores.
    shapes = nn.unbox(jax.eval_shape(Decoder(config).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))["params"]
    rng = np.random.default_rng(0)

    def random_leaf(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        return (0.5 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return config, jax.tree_util.tree_map_with_path(random_leaf, shapes)


@pytest.fixture(scope="module")
def scorer(tiny):
    return lc.LMScorer(*tiny)


@pytest.fixture(scope="module")
def full_logits(tiny):
    """fp32 logits of one unpadded row, the model's own forward (no chunking, no padding)."""
    config, params = tiny
    apply = jax.jit(lambda p, t: Decoder(config).apply({"params": p}, t))
    return lambda tokens: np.asarray(apply(params, jnp.asarray(tokens, jnp.int32)[None])[0], np.float64)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def find_all(haystack: np.ndarray, needle: list[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if list(haystack[i: i + n]) == needle]


# ----------------------------------------------------------------- prompts


@pytest.mark.parametrize("length", [74, 75, 128, 301, 1000])
def test_passkey_prompt_has_the_exact_length_and_the_needle_at_its_depth(pieces, length):
    prompts = lc.PasskeyPrompts(pieces)
    assert prompts.min_length() <= 74
    longest_filler = max(map(len, prompts.filler))
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        key = lc.passkey_key(0, length, depth, 0)
        probe = prompts.build(length, depth, key)
        assert probe.tokens.shape == (length,) and probe.length == length
        needle, answer = pieces.continuation([lc.PASSKEY_NEEDLE.format(key=key), str(key)])
        assert find_all(probe.tokens, needle) == [probe.needle_start]
        offset = probe.needle_start - probe.haystack_start
        assert abs(offset - depth * probe.haystack_length) <= longest_filler / 2 + 1
        assert list(probe.tokens[probe.answer_start:]) == answer
        question = probe.tokens[probe.answer_start - len(prompts.question): probe.answer_start]
        assert list(question) == prompts.question
        assert list(probe.tokens[:1 + len(prompts.intro)]) == pieces.special_prefix + prompts.intro
        if depth == 0.0:
            assert probe.needle_start == 1 + len(prompts.intro)
        if depth == 1.0:
            assert probe.needle_start + len(needle) == probe.answer_start - len(prompts.question)
    assert 10_000 <= key < 100_000
    assert key == lc.passkey_key(0, length, 1.0, 0) != lc.passkey_key(1, length, 1.0, 0)


def test_passkey_text_reads_as_the_landmark_prompt(pieces, tokenizer_path):
    import sentencepiece as spm

    text = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).decode(
        lc.PasskeyPrompts(pieces).build(200, 0.5, 31415).tokens.tolist())
    assert text.startswith(lc.PASSKEY_INTRO + " The grass is green. The sky is blue.")
    assert " The pass key is 31415. Remember it. 31415 is the pass key. " in text
    assert text.endswith(" What is the pass key? The pass key is 31415")


@pytest.mark.parametrize("length", [100, 1024, 3000])
def test_needle_prompt_on_a_book_has_the_exact_length_and_depth(pieces, book_path, length):
    prompts = lc.NeedlePrompts(pieces, [lc.read_book(book_path)])
    sentences = prompts._book_sentences(0, length)
    longest = max(map(len, sentences[:200]))
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        probe = prompts.build(length, depth)
        assert probe.length == length
        # The question + answer repeat the needle sentence: search the haystack only.
        context = probe.tokens[: probe.answer_start - len(prompts.question)]
        assert find_all(context, prompts.needle) == [probe.needle_start]
        offset = probe.needle_depth * probe.haystack_length - depth * probe.haystack_length
        assert abs(offset) <= longest / 2 + 1
        assert list(probe.tokens[-len(prompts.answer):]) == prompts.answer
        # The haystack is the book from its first sentence on, whole sentences before the needle.
        before = probe.tokens[1: probe.needle_start].tolist()
        assert before == sum(sentences, [])[: len(before)]
        starts = np.cumsum([0] + [len(s) for s in sentences])
        assert len(before) in [*starts[starts < probe.haystack_length], probe.haystack_length]


def test_short_lengths_and_short_books_are_refused(pieces):
    with pytest.raises(ValueError, match="too short"):
        lc.PasskeyPrompts(pieces).build(40, 0.5, 12345)
    with pytest.raises(ValueError, match="only"):
        lc.NeedlePrompts(pieces, ["One sentence. Two sentences."]).build(200, 0.5)
    with pytest.raises(ValueError, match="depth"):
        lc.PasskeyPrompts(pieces).build(100, 1.5, 12345)


# ----------------------------------------------------------------- scoring


def reference_answer_scores(full_logits, probe: lc.Probe) -> tuple[float, float]:
    logp = log_softmax64(full_logits(probe.tokens))
    positions = np.arange(probe.answer_start - 1, probe.length - 1)
    targets = probe.tokens[positions + 1]
    exact = float(np.all(logp[positions].argmax(-1) == targets))
    return exact, float(logp[positions, targets].mean())


def greedy_answer(full_logits, probe: lc.Probe) -> lc.Probe:
    """The probe with its answer replaced by the model's own greedy continuation."""
    tokens = probe.tokens.copy()
    for t in range(probe.answer_start, probe.length):
        tokens[t] = full_logits(tokens)[t - 1].argmax()  # causal: later tokens do not matter
    return lc.Probe(tokens=tokens, answer_start=probe.answer_start, needle_start=probe.needle_start,
                    needle_length=probe.needle_length, haystack_start=probe.haystack_start,
                    haystack_length=probe.haystack_length, depth=probe.depth, answer="greedy")


def test_scorer_matches_float64_full_logits_with_padding(pieces, scorer, full_logits):
    prompts = lc.PasskeyPrompts(pieces)
    # 75 and 90 pad to 80 and 96; batches of 2 get an all-padding row.
    probes = [prompts.build(length, depth, lc.passkey_key(0, length, depth, 0))
              for length, depth in [(75, 0.0), (90, 0.5), (96, 1.0)]]
    probes.append(greedy_answer(full_logits, probes[0]))
    probes.append(greedy_answer(full_logits, probes[1]))
    results = lc.score_probes(scorer, probes, batch_size=2)
    for probe, result in zip(probes, results):
        exact, loglik = reference_answer_scores(full_logits, probe)
        assert result["exact"] == exact
        assert result["answer_loglik"] == pytest.approx(loglik, rel=1e-5, abs=1e-5)
        assert result["answer_tokens"] == probe.length - probe.answer_start
    assert [r["exact"] for r in results] == [0.0, 0.0, 0.0, 1.0, 1.0]
    # One row alone gives the same numbers as in a padded batch.
    alone = lc.score_probes(scorer, probes[1:2], batch_size=1)[0]
    assert alone["answer_loglik"] == pytest.approx(results[1]["answer_loglik"], rel=1e-6)


@pytest.mark.parametrize("num_tokens,window,stride", [
    (1, 4, 2), (2, 2, 1), (5, 16, 8), (100, 32, 31), (100, 32, 1), (100, 33, 10), (64, 64, 32),
    (65, 64, 63), (1000, 128, 64),
])
def test_sliding_windows_score_every_token_once(num_tokens, window, stride):
    counts = np.zeros(num_tokens, int)
    windows = lc.sliding_windows(num_tokens, window, stride)
    for w in windows:
        assert w.end - w.start == min(window, num_tokens)
        assert w.start < w.target_start <= w.end or num_tokens == 1
        weights = lc.window_weights(w)
        predicted = w.start + 1 + np.flatnonzero(weights)
        counts[predicted] += 1
        assert np.all(predicted >= w.target_start) and np.all(predicted < w.end)
    assert counts[0] == 0 and np.all(counts[1:] == 1)
    assert windows[-1].end == num_tokens


def test_sliding_windows_refuse_a_stride_without_context():
    with pytest.raises(ValueError, match="stride"):
        lc.sliding_windows(100, 32, 32)


@pytest.fixture(scope="module")
def documents(tokenizer_path, book_path):
    tok = load_tokenizer(tokenizer_path)
    return [lc.document_tokens(tok, lc.read_book(book_path), 150),
            lc.document_tokens(tok, "A very short document about the sea.", 150)]


def test_perplexity_with_a_window_over_the_whole_text_is_the_plain_perplexity(scorer, full_logits,
                                                                              documents):
    doc = documents[0]
    assert len(doc) == 150
    logp = log_softmax64(full_logits(doc))
    plain_nll = -logp[np.arange(len(doc) - 1), np.asarray(doc[1:])].sum()
    [total] = lc.sliding_window_nll(scorer, [doc], window=256, stride=128, batch_size=2)
    assert total["tokens"] == len(doc) - 1
    assert total["nll"] == pytest.approx(plain_nll, rel=1e-5)


def test_small_window_perplexity_matches_a_per_window_reference(scorer, full_logits, documents):
    window, stride = 48, 20
    totals = lc.sliding_window_nll(scorer, documents, window, stride, batch_size=3)
    for doc, total in zip(documents, totals):
        doc = np.asarray(doc)
        nll, tokens = 0.0, 0
        for w in lc.sliding_windows(len(doc), window, stride):
            logp = log_softmax64(full_logits(doc[w.start: w.end]))
            for t in range(w.target_start, w.end):  # predict token t from position t - 1
                nll -= logp[t - 1 - w.start, doc[t]]
                tokens += 1
        assert tokens == len(doc) - 1 == total["tokens"]
        assert total["nll"] == pytest.approx(nll, rel=1e-5)
    report = lc.run_perplexity(scorer, documents, [48, 256], stride=None, show_progress=False)
    assert [p["stride"] for p in report["points"]] == [24, 128]
    assert all(p["tokens"] == sum(len(d) - 1 for d in documents) for p in report["points"])


def test_bucket_lengths_pad_little():
    for n in range(1, 5000, 7):
        b = lc.bucket_length(n)
        assert n <= b < n + max(16, n / 4)
    assert len({lc.bucket_length(n) for n in range(1025, 2049)}) == 4


# ------------------------------------------------------------------- plots


def check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_heatmap_and_perplexity_plots(tmp_path):
    lengths, depths = [64, 128, 256], [0.0, 0.5, 1.0]
    grid = [[1.0, 0.5, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 1.0]]
    fig = lc.plot_grid(grid, lengths, depths, title="tiny: needle in a haystack",
                       colorbar_label="exact match")
    ax, colorbar = fig.axes
    assert ax.get_xlabel() == "context length (tokens)"
    assert ax.get_ylabel() == "needle depth (%)"
    assert "tiny" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "256"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "50", "100"]
    assert colorbar.get_ylabel() == "exact match"
    check_png(lc.save_figure(fig, tmp_path / "grid.png"))

    report = {"points": [{"length": 64, "perplexity": 90.0}, {"length": 256, "perplexity": 70.0}]}
    fig = lc.plot_perplexity(report, title="tiny: perplexity vs context length")
    [ax] = fig.axes
    assert ax.get_xscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("context length (tokens)", "perplexity")
    assert "tiny" in ax.get_title()
    check_png(lc.save_figure(fig, tmp_path / "ppl.png"))


# --------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    return hf.save_hf(*tiny, tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def test_cli_passkey_and_niah_end_to_end(checkpoint, tokenizer_path, book_path, tmp_path, capsys):
    common = ["--model", str(checkpoint), "--tokenizer", str(tokenizer_path), "--lengths", "80,128",
              "--depths", "0,0.5,1", "--batch-size", "4", "--no-progress"]
    report = lc.main(["passkey", *common, "--trials", "2", "--output", str(tmp_path / "pk")])
    assert "passkey: exact match" in capsys.readouterr().out
    saved = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert saved["exact_match"] == report["exact_match"]
    assert np.asarray(saved["exact_match"]).shape == (3, 2)
    assert len(saved["trials"]) == 2 * 3 * 2
    assert all(len(str(t["key"])) == 5 for t in saved["trials"])
    for name in ("passkey.png", "passkey_loglik.png"):
        check_png(tmp_path / "pk" / name)

    report = lc.main(["niah", *common, "--books", str(book_path), "--attention", "chunked",
                      "--output", str(tmp_path / "niah")])
    saved = json.loads((tmp_path / "niah" / "niah.json").read_text())
    assert np.asarray(saved["answer_loglik"]).shape == (3, 2)
    assert np.all(np.asarray(saved["answer_loglik"]) < 0)
    assert saved["settings"]["attention"] == "chunked"
    check_png(tmp_path / "niah" / "niah.png")


def test_cli_perplexity_end_to_end(checkpoint, tokenizer_path, book_path, tmp_path, capsys):
    report = lc.main(["perplexity", "--model", str(checkpoint), "--tokenizer", str(tokenizer_path),
                      "--lengths", "64,128", "--books", str(book_path), "--max-tokens", "300",
                      "--batch-size", "4", "--no-progress", "--output", str(tmp_path)])
    assert "perplexity" in capsys.readouterr().out
    saved = json.loads((tmp_path / "perplexity.json").read_text())
    assert [p["length"] for p in saved["points"]] == [64, 128]
    assert all(p["tokens"] == 299 and p["perplexity"] > 1 for p in saved["points"])
    assert saved == json.loads(json.dumps(report))
    check_png(tmp_path / "perplexity.png")


@pytest.mark.parametrize("command,flags,message", [
    ("passkey", ["--lengths", "64,abc"], "--lengths"),
    ("passkey", ["--lengths", "20"], "--lengths"),
    ("passkey", ["--depths", "0,1.5"], "--depths"),
    ("passkey", ["--trials", "0"], "--trials"),
    ("passkey", ["--attention", "flash9"], "--attention"),
    ("niah", ["--books", "/no/such/books"], "--books"),
    ("niah", ["--books", "SHORT_BOOK", "--lengths", "200"], "--books"),
    ("perplexity", ["--stride", "64"], "--stride"),
    ("perplexity", ["--batch-size", "0"], "--batch-size"),
    ("passkey", ["--model", "/no/such/model"], "--model"),
    ("passkey", ["--tokenizer", "/no/such/tokenizer"], "--tokenizer"),
])
def test_cli_bad_flags_fail_naming_the_flag_before_the_model_loads(
        checkpoint, tokenizer_path, book_path, tmp_path, monkeypatch, capsys, command, flags, message):
    monkeypatch.setattr(lc.cli, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    base = {"--model": str(checkpoint), "--tokenizer": str(tokenizer_path), "--lengths": "64"}
    if command != "passkey":
        base["--books"] = str(book_path)
    short_book = tmp_path / "short.txt"
    short_book.write_text("Too short a book. It has two sentences.")
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = str(short_book) if value == "SHORT_BOOK" else value
    with pytest.raises(SystemExit) as exit_info:
        lc.main([command, *[x for kv in base.items() for x in kv]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err, err
