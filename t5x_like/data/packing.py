"""Greedy packing of token sequences into fixed-length rows (numpy only).

Each row holds whole documents one after another; ``segment_ids`` number the
documents of a row from 1 (0 is padding) and ``positions`` restart at 0 at
every document, which is what document-masked attention and RoPE need.
Documents longer than a row are cut into row-sized chunks.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def pack(
    documents: Iterable[Iterable[int]], length: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Packs token-id documents into rows ``[n_rows, length]`` (first-fit in order)."""
    if length < 1:
        raise ValueError(f"pack: length must be >= 1, got {length}")
    rows: list[tuple[list[int], list[int], list[int]]] = []
    tokens: list[int] = []
    segments: list[int] = []
    positions: list[int] = []

    def flush():
        nonlocal tokens, segments, positions
        if tokens:
            rows.append((tokens, segments, positions))
        tokens, segments, positions = [], [], []

    for doc in documents:
        doc = list(doc)
        for start in range(0, len(doc), length):
            chunk = doc[start : start + length]
            if len(tokens) + len(chunk) > length:
                flush()
            seg = (segments[-1] + 1) if segments else 1
            tokens += chunk
            segments += [seg] * len(chunk)
            positions += list(range(len(chunk)))
    flush()
    out = {
        "tokens": np.full((len(rows), length), pad_id, np.int32),
        "segment_ids": np.zeros((len(rows), length), np.int32),
        "positions": np.zeros((len(rows), length), np.int32),
    }
    for i, (t, s, p) in enumerate(rows):
        out["tokens"][i, : len(t)] = t
        out["segment_ids"][i, : len(s)] = s
        out["positions"][i, : len(p)] = p
    return out
