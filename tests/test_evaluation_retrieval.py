"""Retrieval evaluation: metrics against pytrec_eval, sharded top-k search against numpy,
TREC run files, the BEIR runner with real all-MiniLM-L6-v2 weights against
sentence-transformers, and the CLI."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_like import paths
from t5x_like.data.sources import read_beir
from t5x_like.evaluation import retrieval
from t5x_like.evaluation.retrieval import (evaluate, per_query, read_trec_run, run_from_topk,
                                           search, write_trec_run)

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
