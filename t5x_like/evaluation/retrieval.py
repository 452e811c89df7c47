"""Retrieval metrics, exact top-k search and TREC run files (numpy + JAX; no TensorFlow).

**Metrics** follow trec_eval as pytrec_eval runs it inside BEIR, checked against
pytrec_eval to 1e-6 in ``tests/test_evaluation_retrieval.py``:

* Ranking: score descending, ties by doc id descending (trec_eval sorts that way;
  the order in the run is ignored).
* Relevance: grade >= 1 is relevant; grade 0, negative grades and unjudged documents
  are not. nDCG's gain is the grade itself (trec_eval's default, not ``2^g - 1``),
  negative grades gain 0, the discount is ``log2(rank + 1)`` and the ideal ranking
  is built from all the query's judgements.
* ``ndcg@k`` = ndcg_cut_k, ``map@k`` = map_cut_k (precisions at relevant ranks <= k over
  all relevant judgements), ``recall@k`` = recall_k, ``precision@k`` = P_k (always
  divided by k, even when fewer documents were retrieved), ``mrr@k`` = BEIR's MRR@k
  (1 / rank of the first relevant document within the top k, else 0).
* Which queries count: pytrec_eval scores the queries that are keys of both qrels
  and the run (a key with an empty ranking counts, scoring 0; a query of the qrels with
  no relevant judgement counts, scoring 0) and BEIR averages over those. That is the
  default (``missing_queries="skip"``), so numbers compare with published BEIR tables.
  A judged query absent from the run therefore does not lower the average; pass
  ``missing_queries="zero"`` to score it 0 instead (trec_eval ``-c``). BEIR itself
  divides MRR by ``len(qrels)``; here every metric uses the same set of queries.
  BEIR's optional removal of documents whose id equals the query id is not applied.

**Search** is exact inner product. With a mesh the corpus is split over every device,
each device keeps its own top k and one more top-k merges them; queries go through in
fixed-size chunks so memory is ``chunk_size x shard_size`` scores per device.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t5x_like.data.sources import read_trec_run  # noqa: F401  (re-exported: runs in, runs out)
from t5x_like.paths import atomic_path

DEFAULT_K_VALUES = (1, 3, 5, 10, 100, 1000)
METRICS = ("ndcg", "map", "recall", "precision", "mrr")
MISSING_QUERIES = ("skip", "zero")

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

# ---------------------------------------------------------------------- metrics


def rank_documents(scores: dict[str, float]) -> list[str]:
    """Doc ids in trec_eval's order: score descending, then doc id descending."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def _query_metrics(judgements: dict[str, int], scores: dict[str, float],
                   k_values: Sequence[int]) -> dict[str, float]:
    max_k = max(k_values)
    ranked = rank_documents(scores)[:max_k]
    grades = np.array([judgements.get(doc, 0) for doc in ranked], np.float64)
    relevant = (grades >= 1).astype(np.float64)
    gains = np.maximum(grades, 0.0)
    num_relevant = sum(1 for g in judgements.values() if g >= 1)
    ideal = np.sort(np.maximum(np.array(list(judgements.values()), np.float64), 0.0))[::-1][:max_k]

    discount = 1.0 / np.log2(np.arange(2, max_k + 2, dtype=np.float64))
    hits = np.cumsum(relevant)
    dcg = np.cumsum(gains * discount[: len(gains)])
    idcg = np.cumsum(ideal * discount[: len(ideal)])
    precision_sum = np.cumsum(relevant * hits / np.arange(1, len(relevant) + 1))
    first = int(np.argmax(relevant)) if relevant.any() else None

    def upto(cumulative: np.ndarray, k: int) -> float:
        return float(cumulative[min(k, len(cumulative)) - 1]) if len(cumulative) else 0.0

    out = {}
    for k in k_values:
        top_hits = upto(hits, k)
        ideal_k = upto(idcg, k)
        out[f"ndcg@{k}"] = upto(dcg, k) / ideal_k if ideal_k > 0 else 0.0
        out[f"map@{k}"] = upto(precision_sum, k) / num_relevant if num_relevant else 0.0
        out[f"recall@{k}"] = top_hits / num_relevant if num_relevant else 0.0
        out[f"precision@{k}"] = top_hits / k
        out[f"mrr@{k}"] = 1.0 / (first + 1) if first is not None and first < k else 0.0
    return out


def _check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    k_values = tuple(k_values)
    if not k_values or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in k_values):
        raise ValueError(f"k_values={k_values!r} must be positive integers")
    return tuple(int(k) for k in k_values)


def per_query(qrels: Qrels, run: Run, k_values: Sequence[int] = DEFAULT_K_VALUES, *,
              missing_queries: str = "skip") -> dict[str, dict[str, float]]:
    """``{query id: {"ndcg@10": ..., ...}}`` for the queries that are scored (see module doc)."""
    k_values = _check_k_values(k_values)
    if missing_queries not in MISSING_QUERIES:
        raise ValueError(f"missing_queries={missing_queries!r} must be one of {MISSING_QUERIES}")
    out = {}
    for qid, judgements in qrels.items():
        if qid in run:
            out[qid] = _query_metrics(judgements, run[qid], k_values)
        elif missing_queries == "zero":
            out[qid] = _query_metrics(judgements, {}, k_values)
    return out


def evaluate(qrels: Qrels, run: Run, k_values: Sequence[int] = DEFAULT_K_VALUES, *,
             missing_queries: str = "skip") -> dict[str, float]:
    """Mean of ``per_query`` over the scored queries: ``ndcg@k``, ``map@k``, ``recall@k``,
    ``precision@k``, ``mrr@k`` for each k. No scored query is an error."""
    k_values = _check_k_values(k_values)
    scored = per_query(qrels, run, k_values, missing_queries=missing_queries)
    if not scored:
        raise ValueError(f"no query is both judged in qrels ({len(qrels)} queries) and in the run "
                         f"({len(run)} queries): are the ids from the same split?")
    keys = [f"{metric}@{k}" for metric in METRICS for k in k_values]
    return {key: float(np.mean([m[key] for m in scored.values()])) for key in keys}


def format_metrics(metrics: dict[str, float]) -> str:
    """A plain-text table: one row per metric, one column per k."""
    ks = sorted({int(key.split("@")[1]) for key in metrics}, key=int)
    rows = [["metric"] + [f"@{k}" for k in ks]]
    for metric in METRICS:
        if any(f"{metric}@{k}" in metrics for k in ks):
            rows.append([metric] + [f"{metrics[f'{metric}@{k}']:.4f}" if f"{metric}@{k}" in metrics
                                    else "" for k in ks])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


# ----------------------------------------------------------------------- search


def _local_top_k(queries, docs, doc_ids, *, k: int, precision):
    """Top k of one corpus shard; padding rows (id -1) never win."""
    scores = jnp.einsum("qd,nd->qn", queries.astype(docs.dtype), docs,
                        preferred_element_type=jnp.float32, precision=precision)
    scores = jnp.where(doc_ids[None, :] >= 0, scores, -jnp.inf)
    values, positions = jax.lax.top_k(scores, k)
    return values, doc_ids[positions]


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh | None, k_local: int, k: int, precision):
    local = functools.partial(_local_top_k, k=k_local, precision=precision)
    if mesh is None:
        return jax.jit(local)
    axes = tuple(mesh.axis_names)

    def gathered(queries, docs, doc_ids):
        values, ids = local(queries, docs, doc_ids)
        # Every device gets every shard's candidates [q, shards * k_local] (replicated out,
        # so the merge also works on meshes with Explicit axes).
        return (jax.lax.all_gather(values, axes, axis=1, tiled=True),
                jax.lax.all_gather(ids, axes, axis=1, tiled=True))

    per_shard = jax.shard_map(gathered, mesh=mesh, in_specs=(P(), P(axes, None), P(axes)),
                              out_specs=(P(), P()), check_vma=False)

    def merged(queries, docs, doc_ids):
        values, ids = per_shard(queries, docs, doc_ids)
        values, positions = jax.lax.top_k(values, k)
        return values, jnp.take_along_axis(ids, positions, axis=1)

    return jax.jit(merged)


def search(query_embeddings, doc_embeddings, k: int, *, mesh: Mesh | None = None,
           dtype: str = "float32", chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: ``(scores [nq, k'] float32, indices [nq, k'] int32)``,
    best first, ``k' = min(k, n_docs)``; equal scores keep the lower doc index first.

    ``mesh``: the corpus rows are split over all of its devices (padded to a multiple of
    the device count; padding never scores). ``dtype``: ``float32`` (exact, highest
    matmul precision) or ``bfloat16`` inputs with float32 accumulation.
    """
    queries = np.asarray(query_embeddings, np.float32)
    docs = np.asarray(doc_embeddings, np.float32)
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(f"need [nq, dim] queries and [n_docs, dim] docs, got {queries.shape} and "
                         f"{docs.shape}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k={k} and chunk_size={chunk_size} must be >= 1")
    if docs.shape[0] == 0:
        raise ValueError("the corpus is empty")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} must be 'float32' or 'bfloat16'")
    n_docs = docs.shape[0]
    k = min(k, n_docs)
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

    shards = 1 if mesh is None else mesh.size
    padded = math.ceil(n_docs / shards) * shards
    doc_ids = np.full(padded, -1, np.int32)
    doc_ids[:n_docs] = np.arange(n_docs)
    # Cast and pad on the host, then place each shard straight on its device (the whole
    # corpus never sits on one device).
    docs = np.pad(docs, ((0, padded - n_docs), (0, 0))).astype(jnp.dtype(dtype))
    if mesh is not None:
        axes = tuple(mesh.axis_names)
        docs = jax.device_put(docs, NamedSharding(mesh, P(axes, None)))
        doc_ids = jax.device_put(doc_ids, NamedSharding(mesh, P(axes)))
    k_local = min(k, padded // shards)
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" else jax.lax.Precision.DEFAULT
    fn = _search_fn(mesh, k_local, k, precision)

    # Every chunk has the same shape (the last one padded), so one compilation serves all.
    chunk = min(chunk_size, queries.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        block = queries[start:start + chunk]
        rows = len(block)
        block = np.pad(block, ((0, chunk - rows), (0, 0)))
        values, ids = fn(block, docs, doc_ids)
        scores.append(np.asarray(values)[:rows])
        indices.append(np.asarray(ids)[:rows])
    return np.concatenate(scores), np.concatenate(indices).astype(np.int32)


def run_from_topk(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
                  indices: np.ndarray) -> Run:
    """``{query id: {doc id: score}}`` from ``search``'s output (negative indices skipped)."""
    scores, indices = np.asarray(scores), np.asarray(indices)
    if scores.shape != indices.shape or scores.shape[0] != len(query_ids):
        raise ValueError(f"scores {scores.shape} and indices {indices.shape} must both be "
                         f"[len(query_ids)={len(query_ids)}, k]")
    return {qid: {doc_ids[j]: float(s) for s, j in zip(row_s, row_i) if j >= 0}
            for qid, row_s, row_i in zip(query_ids, scores.tolist(), indices.tolist())}


# -------------------------------------------------------------------- run files


def write_trec_run(path: str | Path, run: Run, tag: str) -> None:
    """``qid Q0 docid rank score tag`` lines, each query in trec_eval's order; atomic."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag {tag!r} must be non-empty without whitespace")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for qid, scores in run.items():
            for rank, doc in enumerate(rank_documents(scores), start=1):
                if any(c.isspace() for c in qid + doc):
                    raise ValueError(f"query id {qid!r} / doc id {doc!r} contains whitespace")
                f.write(f"{qid} Q0 {doc} {rank} {scores[doc]!r} {tag}\n")

