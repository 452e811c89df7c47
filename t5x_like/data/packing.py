"""Greedy packing of token sequences into fixed-length rows (numpy only).

Each row holds whole documents one after another; ``segment_ids`` number the
documents of a row from 1 (0 is padding) and ``positions`` restart at 0 at
every document, which is what document-masked attention and RoPE need.
Documents longer than a row are cut into row-sized chunks. Optional per-token
``weights`` (instruction data: 0 on the prompt, 1 on the answer) travel with
their tokens into ``loss_weights``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def pack(
    documents: Iterable[Iterable[int]], length: int, pad_id: int = 0,
    weights: Iterable[Iterable[float]] | None = None,
) -> dict[str, np.ndarray]:
    """Packs token-id documents into rows ``[n_rows, length]`` (first-fit in order).

    ``weights``: one per-token sequence per document (same lengths); the output
    then also has ``loss_weights`` ``[n_rows, length]`` float32 (0 on padding).
    """
    if length < 1:
        raise ValueError(f"pack: length must be >= 1, got {length}")
    rows: list[tuple[list[int], list[int], list[int], list[float]]] = []
    tokens: list[int] = []
    segments: list[int] = []
    positions: list[int] = []
    row_weights: list[float] = []

    def flush():
        nonlocal tokens, segments, positions, row_weights
        if tokens:
            rows.append((tokens, segments, positions, row_weights))
        tokens, segments, positions, row_weights = [], [], [], []

    weight_docs = iter(weights) if weights is not None else None
    for number, doc in enumerate(documents):
        doc = list(doc)
        doc_weights = _document_weights(weight_docs, number, len(doc))
        for start in range(0, len(doc), length):
            chunk = doc[start : start + length]
            if len(tokens) + len(chunk) > length:
                flush()
            seg = (segments[-1] + 1) if segments else 1
            tokens += chunk
            segments += [seg] * len(chunk)
            positions += list(range(len(chunk)))
            row_weights += doc_weights[start : start + length]
    flush()
    out = {
        "tokens": np.full((len(rows), length), pad_id, np.int32),
        "segment_ids": np.zeros((len(rows), length), np.int32),
        "positions": np.zeros((len(rows), length), np.int32),
    }
    if weights is not None:
        out["loss_weights"] = np.zeros((len(rows), length), np.float32)
    for i, (t, s, p, w) in enumerate(rows):
        out["tokens"][i, : len(t)] = t
        out["segment_ids"][i, : len(s)] = s
        out["positions"][i, : len(p)] = p
        if weights is not None:
            out["loss_weights"][i, : len(w)] = w
    return out


def _document_weights(weight_docs, number: int, size: int) -> list[float]:
    """The next document's weights (all ones without ``weights``), checked against its length."""
    if weight_docs is None:
        return [1.0] * size
    w = next(weight_docs, None)
    if w is None:
        raise ValueError(f"pack: weights end before document {number}")
    w = [float(x) for x in w]
    if len(w) != size:
        raise ValueError(f"pack: document {number} has {size} tokens but {len(w)} weights")
    return w
