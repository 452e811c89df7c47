"""Hard negatives for contrastive training: BM25 (``bm25s``) or a retrieval run file.

Mined lists drop every document judged relevant for the query (false-negative
filtering) and keep the retriever's order, so ``negatives[:n]`` are the
hardest ``n``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t5x_like.data.sources import BeirData, read_trec_run


def filter_false_negatives(candidates: dict[str, list[str]],
                           qrels: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Removes documents judged relevant (grade > 0) from each query's candidates."""
    out = {}
    for qid, docs in candidates.items():
        relevant = {d for d, grade in qrels.get(qid, {}).items() if grade > 0}
        out[qid] = [d for d in docs if d not in relevant]
    return out


class BM25Index:
    """BM25 (``bm25s``, Lucene scoring) over texts: words lower-cased, English stopwords
    dropped (no stemming); k1 = 0.9, b = 0.4 are Anserini's defaults for BEIR-style retrieval."""

    def __init__(self, texts: list[str], k1: float = 0.9, b: float = 0.4,
                 show_progress: bool = False):
        import bm25s

        self._bm25s, self._show = bm25s, show_progress
        self.size = len(texts)
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=show_progress),
                         show_progress=show_progress)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)`` ``[len(queries), min(k, size)]``, best first. A query of
        stopwords only scores 0 everywhere (its ids are then arbitrary)."""
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=self._show)
        hits, scores = self.index.retrieve(tokens, k=min(k, self.size), show_progress=self._show)
        return np.asarray(hits), np.asarray(scores)


def bm25_retrieve(data: BeirData, query_ids: list[str], k: int, k1: float = 0.9, b: float = 0.4,
                  show_progress: bool = False) -> dict[str, list[tuple[str, float]]]:
    """BM25 (``BM25Index``) over ``data.passage``: each query's top ``k`` ``(doc id, score)``,
    best first."""
    doc_ids = list(data.corpus)
    index = BM25Index([data.passage(d) for d in doc_ids], k1, b, show_progress)
    hits, scores = index.search([data.queries[q] for q in query_ids], k)
    return {q: [(doc_ids[i], float(s)) for i, s in zip(row, row_scores)]
            for q, row, row_scores in zip(query_ids, hits, scores)}


def bm25_negatives(data: BeirData, query_ids: list[str], depth: int = 30,
                   k1: float = 0.9, b: float = 0.4, show_progress: bool = False) -> dict[str, list[str]]:
    """Top ``depth`` BM25 documents per query (``bm25_retrieve``), judged-relevant ones removed."""
    # Relevant documents are removed afterwards, so fetch enough to still have `depth`.
    extra = max((len(data.qrels.get(q, {})) for q in query_ids), default=0)
    hits = bm25_retrieve(data, query_ids, depth + extra, k1=k1, b=b, show_progress=show_progress)
    candidates = {q: [doc for doc, _ in ranked] for q, ranked in hits.items()}
    return {q: docs[:depth] for q, docs in filter_false_negatives(candidates, data.qrels).items()}


def run_file_negatives(path: str | Path, qrels: dict[str, dict[str, int]],
                       depth: int = 30) -> dict[str, list[str]]:
    """Negatives from a TREC run file (``qid Q0 docid rank score tag``), best score first."""
    run = read_trec_run(path)
    ranked = {q: sorted(scores, key=lambda d: -scores[d]) for q, scores in run.items()}
    return {q: docs[:depth] for q, docs in filter_false_negatives(ranked, qrels).items()}
