"""Long-context data synthesis (t5x_like.synthesis): the workflow end to end with a tiny random
Llama-shaped decoder and the Llama-2 SentencePiece tokenizer over a SciFact subset (BM25),
resume and partial-line repair, the JSONL read back as packed training rows whose loss
covers only the answer, the HTTP client against a real local OpenAI-style server, and the
CLI's early errors. Random weights write gibberish: the tests check structure."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import paths
from t5x_like.convert import hf
from t5x_like.data import sources
from t5x_like.models.decoder import Decoder, DecoderConfig
from t5x_like.synthesis import __main__ as cli
from t5x_like.synthesis import chunks, io, prompts
from t5x_like.synthesis.lm import HTTPLM, LocalLM, tokenizer_counter
from t5x_like.synthesis.retrieval import BM25Retriever, load_documents
from t5x_like.synthesis.workflow import Settings, Workflow

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from configs import synthesis as synthesis_config  # noqa: E402

WINDOW = 384
NEW = 64  # instruction, summary and answer lengths alike: one compiled generate program


@pytest.fixture(scope="module")
def llama_tokenizer():
    return paths.shared_data("tokenizers/llama2.model")


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, llama_tokenizer):
    """A random tiny Llama-shaped decoder saved as a Hugging Face directory with its tokenizer."""
    config = DecoderConfig(vocab_size=32000, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=64, max_position_embeddings=512)
    # Decoder.init's shapes, numpy values (compiling the init's RNG is slow on 2 cores).
    shapes = nn.unbox(jax.eval_shape(Decoder(config).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))["params"]
    rng = np.random.default_rng(0)

    def leaf(path, x):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(x.shape, np.float32)
        return (0.5 * rng.standard_normal(x.shape)).astype(np.float32)

    tok = tmp_path_factory.mktemp("tok")
    shutil.copy(llama_tokenizer, tok / "tokenizer.model")
    return hf.save_hf(config, jax.tree_util.tree_map_with_path(leaf, shapes),
                      tmp_path_factory.mktemp("lm") / "tiny-llama", tokenizer_dir=tok)


def tiny_config(output: Path, model: Path, **synthesis):
    cfg = synthesis_config.get_config("tiny")
    cfg.output = str(output)
    cfg.progress = False
    cfg.data.max_documents = 60
    cfg.lm.model = str(model)
    cfg.lm.window = WINDOW
    cfg.lm.bucket = WINDOW  # every prompt padded to the window: one compile
    cfg.synthesis.update(dict(
        num_multi_doc=3, num_long_output=2, docs_per_example=3, max_docs_per_example=8,
        min_input_tokens=500, max_input_tokens=1200, max_summary_tokens=NEW,
        max_instruction_tokens=NEW, max_answer_tokens=NEW, seed_passage_tokens=64,
        long_output_min_tokens=150, long_output_max_tokens=400, batch_size=4))
    cfg.synthesis.update(synthesis)
    return cfg


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def first_run(tiny_lm_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("synth") / "out.jsonl"
    stats = cli.run(tiny_config(output, tiny_lm_dir))
    return output, stats


def test_examples_have_the_documents_the_answer_and_lengths_in_range(first_run, llama_tokenizer):
    output, stats = first_run
    records = read_lines(output)
    assert [r["id"] for r in records][:3] == [f"multi_doc-{i:06d}" for i in range(3)]
    assert sorted(r["kind"] for r in records) == ["long_output"] * 2 + ["multi_doc"] * 3
    count = tokenizer_counter(llama_tokenizer)
    corpus = load_documents(paths.shared_data("beir/scifact"), max_documents=60)
    for r in records:
        assert set(r) >= {"id", "kind", "instruction", "documents", "input", "target",
                          "input_tokens", "target_tokens"}
        assert r["instruction"].strip() and r["target"].strip()
        assert r["instruction"] in r["input"]
        assert r["input_tokens"] == count(r["input"]) and r["target_tokens"] == count(r["target"])
        if r["kind"] == "multi_doc":
            assert 1 <= len(r["documents"]) <= 8  # "adjust" adds or removes to fit the range
            for doc in r["documents"]:  # the raw retrieved documents make the long input
                assert doc["text"] == corpus[doc["id"]] and doc["text"] in r["input"]
            assert 500 <= r["input_tokens"] <= 1200
            # At least one summary per document at level 0 (more where a document was split).
            assert r["meta"]["summary_levels"][0] >= len(r["documents"])
        else:
            assert r["documents"] == [] and 150 <= r["target_tokens"] <= 400
            assert r["target"].split()[0] in corpus[r["meta"]["sources"][0]]
    # Chunks of documents over the window were summarised, and the summaries summarised again.
    assert stats["documents_split"] > 0 and stats["chunks"] > 9
    assert stats["max_summary_level"] >= 2
    assert any(len(r["meta"]["summary_levels"]) >= 2 for r in records if r["kind"] == "multi_doc")
    assert stats["multi_doc_written"] == 3 and stats["long_output_written"] == 2


def test_resume_skips_written_ids_and_repairs_a_partial_line(first_run, tiny_lm_dir, tmp_path):
    output = tmp_path / "out.jsonl"
    shutil.copy(first_run[0], output)
    before = output.read_text(encoding="utf-8")
    with open(output, "a", encoding="utf-8") as f:  # a crash in the middle of a line
        f.write('{"id": "multi_doc-000003", "kind": "multi_d')
    stats = cli.run(tiny_config(output, tiny_lm_dir, num_multi_doc=4))
    after = output.read_text(encoding="utf-8")
    assert after.startswith(before)  # nothing written is lost or rewritten
    records = read_lines(output)  # every line parses: the partial one is gone
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 6 and ids[-1] == "multi_doc-000003"
    assert stats["multi_doc_existing"] == 3 and stats["multi_doc_written"] == 1
    assert stats["long_output_existing"] == 2 and stats["long_output_written"] == 0
    # The same command again writes nothing.
    again = cli.run(tiny_config(output, tiny_lm_dir, num_multi_doc=4))
    assert output.read_text(encoding="utf-8") == after
    assert again["multi_doc_written"] == 0 and again["long_output_written"] == 0


def test_read_back_packs_with_loss_on_target_tokens_only(first_run, llama_tokenizer):
    from t5x_like.data import converters, pipeline, tasks
    from t5x_like.data.vocab import sentencepiece_vocabulary

    examples = sources.read_instruction_examples(first_run[0])
    vocab = sentencepiece_vocabulary(llama_tokenizer)
    tasks.add_instruction_task("synth_readback", examples, vocab, length=2048)
    batches = pipeline.global_batches("synth_readback", converters.LMConverter(pad_id=0),
                                      {"targets": 2048}, 1, shuffle=False, num_epochs=1)
    expected = []
    for e in examples:
        head, tail = [1] + vocab.encode(e["input"]), vocab.encode(e["target"]) + [2]
        expected.append((head + tail, [0.0] * len(head) + [1.0] * len(tail)))
    seen = []
    for batch in batches:
        tok, seg, w = batch["tokens"][0], batch["segment_ids"][0], batch["loss_weights"][0]
        assert not w[seg == 0].any()
        for s in range(1, seg.max() + 1):
            where = seg == s
            seen.append((tok[where].tolist(), w[where].tolist()))
    assert seen == expected


def test_instruction_reader_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": ""}\n')
    with pytest.raises(sources.BadRecord, match=r"bad.jsonl:2: field 'target'"):
        sources.read_instruction_examples(path)
    assert len(sources.read_instruction_examples(path, on_bad_record="skip")) == 1


# ------------------------------------------------------------------ pieces


def test_split_fit_and_group_respect_token_budgets(llama_tokenizer):
    count = tokenizer_counter(llama_tokenizer)
    text = load_documents(paths.shared_data("beir/scifact"), max_documents=3)
    text = "\n\n".join(text.values())
    pieces = chunks.split(text, 50, count)
    assert len(pieces) > 3 and all(count(p) <= 50 for p in pieces)
    assert "".join(pieces).split() == text.split()  # nothing lost, order kept
    assert count(chunks.fit(text, 40, count)) <= 40 < count(chunks.fit(text, 60, count))
    groups = chunks.group(pieces, 120, count)
    assert sum(groups, []) == pieces and all(len(g) >= 2 for g in groups)
    assert len(groups) <= (len(pieces) + 1) // 2


def test_partial_line_is_dropped_and_a_bad_complete_line_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    assert io.drop_partial_line(path) == len('{"id": "c", "te')
    assert io.read_ids(path) == {"a", "b"}
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(sources.BadRecord, match=r"x.jsonl:2"):
        io.open_output(path)


def test_local_lm_counts_and_completes(tiny_lm_dir):
    lm = LocalLM.from_directory(tiny_lm_dir, window=WINDOW, bucket=WINDOW, batch_size=8)
    assert lm.count_tokens("") == 0 and lm.count_tokens("Hello world") == 2
    outs = lm.complete(["a", "b c", "d", "e", "f"], NEW)  # one batch, three filler rows
    assert len(outs) == 5 and all(isinstance(o, str) for o in outs)
    assert outs == lm.complete(["a", "b c", "d", "e", "f"], NEW)  # greedy: reproducible


# ------------------------------------------------------------------ HTTP


class _Server(http.server.ThreadingHTTPServer):
    """A tiny OpenAI-compatible completion server: summaries of a fixed length, a 503 first."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict, str]] = []
        self.fail_next = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body, self.headers.get("Authorization", "")))
        if self.server.fail_next:
            self.server.fail_next -= 1
            return self._reply(503, {"error": "warming up"})
        if body.get("model") != "stub-model":
            return self._reply(400, {"error": f"unknown model {body.get('model')}"})
        prompt = body["messages"][0]["content"] if self.path.endswith("chat/completions") \
            else body["prompt"]
        text = self._answer(prompt, body["max_tokens"])
        if self.path == "/v1/chat/completions":
            return self._reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
        if self.path == "/v1/completions":
            return self._reply(200, {"choices": [{"text": text}]})
        return self._reply(404, {"error": "no route"})

    @staticmethod
    def _answer(prompt: str, max_tokens: int) -> str:
        if prompt.rstrip().endswith("Summary:"):
            return " ".join(["note"] * max_tokens)
        if prompt.rstrip().endswith("Instruction:"):
            return "Compare what these studies report about cell growth."
        return "A long answer " * 4

    def _reply(self, code: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    s = _Server()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


def test_http_client_speaks_both_apis_retries_and_reports_errors(server, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "secret")
    chat = HTTPLM(server.url + "/v1", "stub-model", window=2048, api_key_env="STUB_KEY", retries=2)
    assert chat.complete(["Say hi.\nInstruction:"], 16) == [
        "Compare what these studies report about cell growth."]
    assert [r[0] for r in server.requests] == ["/v1/chat/completions"] * 2  # 503, then retried
    path, body, auth = server.requests[-1]
    assert body["messages"] == [{"role": "user", "content": "Say hi.\nInstruction:"}]
    assert body["max_tokens"] == 16 and auth == "Bearer secret"
    plain = HTTPLM(server.url, "stub-model", window=2048, api="completions", temperature=0.0)
    assert plain.complete(["x\nSummary:"], 4) == ["note note note note"]
    assert server.requests[-1][1]["prompt"] == "x\nSummary:"
    wrong = HTTPLM(server.url, "other", window=2048, retries=0)
    with pytest.raises(RuntimeError, match="HTTP 400.*unknown model other"):
        wrong.complete(["x"], 4)


def test_workflow_over_http_recurses_until_the_notes_fit(server, llama_tokenizer, tmp_path):
    server.fail_next = 0
    # Window 400: chunks of ~260 tokens hold 4 summaries of 60; the notes (~165 tokens) hold 2.
    lm = HTTPLM(server.url, "stub-model", window=400, count_tokens=tokenizer_counter(llama_tokenizer))
    documents = load_documents(paths.shared_data("beir/scifact"), max_documents=40)
    settings = Settings(num_multi_doc=2, num_long_output=0, docs_per_example=6, min_input_tokens=0,
                        max_input_tokens=100_000, max_summary_tokens=60, max_instruction_tokens=30,
                        max_answer_tokens=160, seed_passage_tokens=50, length_policy="drop")
    flow = Workflow(lm, BM25Retriever(documents), documents, settings)
    stats = flow.run(tmp_path / "http.jsonl", progress=False)
    records = read_lines(tmp_path / "http.jsonl")
    assert len(records) == 2 and stats["max_summary_level"] >= 3
    for r in records:
        levels = r["meta"]["summary_levels"]
        assert levels == sorted(levels, reverse=True) and levels[-1] < levels[0]
        assert len(r["documents"]) == 6
    # The answer prompt (instruction + notes) fitted the window with room for the answer.
    answer_prompts = [b["messages"][0]["content"] for p, b, _ in server.requests
                      if b["messages"][0]["content"].rstrip().endswith("Response:")]
    assert len(answer_prompts) == 2
    assert all(lm.count_tokens(p) + 160 <= 400 for p in answer_prompts)
    assert all(p.startswith(prompts.ANSWER.split("{")[0]) for p in answer_prompts)


def test_input_length_policy_drop_counts_what_it_drops(server, llama_tokenizer, tmp_path):
    server.fail_next = 0
    lm = HTTPLM(server.url, "stub-model", window=600, count_tokens=tokenizer_counter(llama_tokenizer))
    documents = load_documents(paths.shared_data("beir/scifact"), max_documents=40)
    settings = Settings(num_multi_doc=2, num_long_output=0, docs_per_example=2, min_input_tokens=5000,
                        max_input_tokens=9000, max_summary_tokens=60, max_instruction_tokens=30,
                        max_answer_tokens=200, seed_passage_tokens=50, length_policy="drop",
                        max_attempts=2)
    stats = Workflow(lm, BM25Retriever(documents), documents, settings).run(
        tmp_path / "none.jsonl", progress=False)
    assert stats["dropped_input_length"] == 4 and stats["multi_doc_written"] == 0
    assert (tmp_path / "none.jsonl").read_text() == ""


# ------------------------------------------------------------------ CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t5x_like.synthesis",
                           "--config=configs/synthesis.py:tiny", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_rejects_misspelt_fields_and_bad_paths_before_loading_a_model(tmp_path):
    out = f"--config.output={tmp_path / 'o.jsonl'}"
    typo = _cli(out, "--config.synthesis.num_multidoc=3")
    assert typo.returncode != 0
    assert "has no field 'num_multidoc'" in typo.stderr and "num_multi_doc" in typo.stderr
    missing = _cli(out, "--config.data.path=/no/such/corpus", "--config.lm.model=/no/model")
    assert missing.returncode != 0 and "config.data.path='/no/such/corpus'" in missing.stderr
    no_model = _cli(out, "--config.lm.model=/no/model")
    assert no_model.returncode != 0 and "config.lm.model='/no/model'" in no_model.stderr
    bad = _cli(out, "--config.lm.model=.", "--config.synthesis.length_policy=maybe")
    assert bad.returncode != 0 and "length_policy='maybe'" in bad.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_training_config_reads_instruction_jsonl(tmp_path, llama_tokenizer):
    """``data.format = "instructions"``: the trainer's LM batches from a synthesis file."""
    import ml_collections

    from t5x_like.data import builders
    from t5x_like.data.vocab import sentencepiece_vocabulary

    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "input": f"Question {i}?",
                                        "target": f"Answer {i}."}) + "\n" for i in range(6)))
    section = ml_collections.ConfigDict(dict(format="instructions", path=str(path), length=64,
                                             on_bad_record="error"))
    batch = next(builders.lm_batches(section, sentencepiece_vocabulary(llama_tokenizer), 2))
    vocab = sentencepiece_vocabulary(llama_tokenizer)
    for row in range(2):
        tok, w = batch["tokens"][row], batch["loss_weights"][row]
        trained = vocab.decode([t for t, x in zip(tok, w) if x and t != 2])
        assert trained.startswith("Answer") and "Question" not in trained


def test_text_and_instructions_mix_in_one_stream(tmp_path, llama_tokenizer):
    """The long-context mix: Gutenberg text (every token trains) with synthesis examples
    (targets only) at ``instructions_rate``, long documents at ``long_fraction``."""
    import ml_collections
    import numpy as np

    from t5x_like.data import builders
    from t5x_like.data.vocab import sentencepiece_vocabulary

    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "input": f"Question {i}?",
                                        "target": f"Answer {i}."}) + "\n" for i in range(40)))
    section = ml_collections.ConfigDict(dict(
        format="text", path=str(paths.shared_data("text/gutenberg")), split_paragraphs=True,
        length=128, on_bad_record="error", long_fraction=0.5, long_threshold=64,
        instructions_path=str(path), instructions_rate=0.5))
    vocab = sentencepiece_vocabulary(llama_tokenizer)
    batches = builders.lm_batches(section, vocab, 8, seed=1)
    kinds = {"text": 0, "instruction": 0}
    for _ in range(4):
        batch = next(batches)
        for tok, seg, w in zip(batch["tokens"], batch["segment_ids"], batch["loss_weights"]):
            for s in set(seg[seg > 0].tolist()):
                weights, tokens = w[seg == s], tok[seg == s]
                if weights.all():  # text: every token trains
                    kinds["text"] += 1
                else:  # an instruction: BOS + input untrained, then the trained answer
                    kinds["instruction"] += 1
                    first = int(np.argmax(weights > 0))
                    assert weights[first:].all() and not weights[:first].any()
                    assert vocab.decode(tokens[first:].tolist()).startswith("Answer")
                    assert vocab.decode(tokens[:first].tolist()).startswith("Question")
    assert kinds["text"] > 0 and kinds["instruction"] > 0
    with pytest.raises(ValueError, match="data.instructions_rate"):
        section.instructions_rate = 1.0
        builders.lm_batches(section, vocab, 8)


def test_packing_carries_weights_with_their_tokens():
    from t5x_like.data import packing

    rows = packing.pack([[5, 6, 7], [8, 9], list(range(10, 17))], 4,
                        weights=[[0, 1, 1], [0, 1], [0, 0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["loss_weights"],
                                  [[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["tokens"][2:], [[10, 11, 12, 13], [14, 15, 16, 0]])
    assert "loss_weights" not in packing.pack([[1, 2]], 4)
    with pytest.raises(ValueError, match="document 1 has 2 tokens but 1 weights"):
        packing.pack([[1], [2, 3]], 4, weights=[[1], [1]])
