"""Gutenberg stripping and greedy packing on the shared books."""

import numpy as np
import pytest

from t5x_like import paths
from t5x_like.data import packing, text


def test_gutenberg_header_and_licence_are_removed():
    book = text.read_gutenberg(paths.shared_data("text/gutenberg/frankenstein_pg84.txt"))
    assert "Project Gutenberg" not in book[:2000]
    assert "PROJECT GUTENBERG" not in book[-3000:]
    assert "Frankenstein" in book[:2000]


def test_text_without_markers_is_rejected():
    with pytest.raises(ValueError, match="notes.txt: no .*START OF"):
        text.strip_gutenberg("just some text", source="notes.txt")


def test_packing_keeps_documents_whole_and_restarts_positions():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], list(range(100, 111))]
    rows = packing.pack(docs, length=6, pad_id=0)
    toks, seg, pos = rows["tokens"], rows["segment_ids"], rows["positions"]
    # Row 0: doc0 + doc1 (4 tokens) then pad; doc2 does not fit.
    np.testing.assert_array_equal(toks[0], [5, 6, 7, 8, 0, 0])
    np.testing.assert_array_equal(seg[0], [1, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 0, 0, 0])
    # The 11-token document is cut into chunks of 6 and 5, positions restarting.
    flat = [t for r in toks for t in r if t]
    assert flat == [t for d in docs for t in d]
    for r in range(len(toks)):
        for s in set(seg[r][seg[r] > 0]):
            np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    with pytest.raises(ValueError, match="length must be >= 1"):
        packing.pack(docs, 0)
