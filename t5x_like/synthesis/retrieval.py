"""The document collection and the retrievers the workflow searches it with.

``load_documents`` reads a BEIR directory (its ``corpus.jsonl``), a corpus-style
JSONL file, or ``.txt`` files into ``{doc_id: text}`` (insertion order kept, so
runs are reproducible). A ``Retriever`` ranks those documents for a free-text
instruction: ``BM25Retriever`` (``bm25s``, no model, instant) or
``DenseRetriever`` (our ``Embedder`` + exact ``evaluation.retrieval.search``;
the corpus is embedded once, on first use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from t5x_like.data import sources


class Retriever(Protocol):
    def retrieve(self, queries: Sequence[str], k: int) -> list[list[str]]:
        """Each query's top ``k`` document ids, best first."""
        ...


def load_documents(path: str | Path, *, max_documents: int = 0,
                   on_bad_record: str = "error") -> dict[str, str]:
    """``{id: text}`` from a BEIR directory, a ``corpus.jsonl``-style file, or ``.txt`` files.

    BEIR documents are title + text (as BEIR's dense models read them); text files
    are named by file name. ``max_documents`` keeps the first ones (0: all).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "corpus.jsonl").exists():
        path = path / "corpus.jsonl"
    if path.suffix == ".jsonl":
        corpus = sources.read_corpus(path, on_bad_record)
        docs = {i: f"{d['title']} {d['text']}".strip() if d["title"] else d["text"]
                for i, d in corpus.items()}
    else:
        docs = dict(sources.read_text_documents(path))
    if max_documents:
        docs = dict(list(docs.items())[:max_documents])
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


class BM25Retriever:
    """Lucene-style BM25 over the documents (lower-cased words, English stopwords dropped)."""

    def __init__(self, documents: dict[str, str], k1: float = 0.9, b: float = 0.4):
        from t5x_like.data.mining import BM25Index

        self.ids = list(documents)
        self.index = BM25Index(list(documents.values()), k1, b)

    def retrieve(self, queries: Sequence[str], k: int) -> list[list[str]]:
        if not queries:
            return []
        # A query of stopwords only scores 0 everywhere; its ids are then arbitrary.
        hits, _ = self.index.search(list(queries), k)
        return [[self.ids[i] for i in row] for row in hits]


class DenseRetriever:
    """Exact inner-product search with an ``Embedder`` (E5 prefixes or an instruction)."""

    def __init__(self, embedder, documents: dict[str, str], *, query_prefix: str | None = None,
                 passage_prefix: str | None = None, instruction: str | None = None,
                 batch_size: int = 32, mesh=None):
        self.embedder, self.ids = embedder, list(documents)
        self._texts = list(documents.values())
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.instruction, self.batch_size, self.mesh = instruction, batch_size, mesh
        self._vectors: np.ndarray | None = None

    def retrieve(self, queries: Sequence[str], k: int) -> list[list[str]]:
        from t5x_like.evaluation.retrieval import search

        if not queries:
            return []
        if self._vectors is None:
            self._vectors = self.embedder.encode(self._texts, prefix=self.passage_prefix,
                                                 batch_size=self.batch_size)
        vectors = self.embedder.encode(list(queries), prefix=self.query_prefix,
                                       instruction=self.instruction, batch_size=self.batch_size)
        _, indices = search(vectors, self._vectors, k, mesh=self.mesh)
        return [[self.ids[i] for i in row] for row in indices]


__all__ = ["BM25Retriever", "DenseRetriever", "Retriever", "load_documents"]
