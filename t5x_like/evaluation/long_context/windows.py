"""Sliding windows over a document (each token scored once) and padded batches of rows."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from t5x_like.evaluation.long_context.prompts import Probe

# ------------------------------------------------------------- sliding windows


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` go in; the predictions of tokens ``[target_start, end)`` count."""

    start: int
    end: int
    target_start: int


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows of ``window`` tokens every ``stride`` tokens over ``num_tokens`` tokens.

    As in the Hugging Face "perplexity of fixed-length models" guide, each window
    scores only the tokens the previous one did not, so every token 1..n-1 is scored
    exactly once (token 0 has no context) with at least ``window - stride`` tokens of
    context after the first window. Unlike the guide, the last window is full-length
    (it starts earlier, not later), so every window has one shape.
    """
    if window < 2:
        raise ValueError(f"window={window} must be >= 2")
    if not 1 <= stride < window:
        raise ValueError(f"stride={stride} must be in [1, window={window}): the first token a "
                         "window scores needs the token before it in the window")
    windows = []
    end, scored_to = min(window, num_tokens), 1
    while True:
        windows.append(Window(max(0, end - window), end, scored_to))
        if end >= num_tokens:
            return windows
        scored_to, end = end, min(end + stride, num_tokens)


# -------------------------------------------------------------------- batches


def bucket_length(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to one of four steps per power of two (at most 25% padding)."""
    step = max(minimum, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


@dataclasses.dataclass
class Batch:
    """Rows padded to one length: ``weights[b, t]`` gates the prediction of ``tokens[b, t + 1]``."""

    tokens: np.ndarray  # [rows, length] int32
    segment_ids: np.ndarray  # 1 on real tokens, 0 on padding
    positions: np.ndarray  # 0.. on real tokens, 0 on padding (dynamic RoPE sees real lengths only)
    weights: np.ndarray  # [rows, length] float32


def make_batch(rows: Sequence[np.ndarray], weights: Sequence[np.ndarray], length: int,
               num_rows: int) -> Batch:
    """Pads rows to ``length`` and the batch to ``num_rows`` rows (all padding)."""
    tokens = np.zeros((num_rows, length), np.int32)
    segment_ids = np.zeros((num_rows, length), np.int32)
    positions = np.zeros((num_rows, length), np.int32)
    w = np.zeros((num_rows, length), np.float32)
    for i, (row, row_w) in enumerate(zip(rows, weights)):
        n = len(row)
        tokens[i, :n], segment_ids[i, :n], positions[i, :n] = row, 1, np.arange(n)
        w[i, :n] = row_w
    return Batch(tokens, segment_ids, positions, w)


def answer_weights(probe: Probe) -> np.ndarray:
    """1 at the positions that predict an answer token (the one before each)."""
    w = np.zeros(probe.length, np.float32)
    w[probe.answer_start - 1: probe.length - 1] = 1.0
    return w


def window_weights(window: Window) -> np.ndarray:
    """1 at the window positions that predict a token of ``[target_start, end)``."""
    w = np.zeros(window.end - window.start, np.float32)
    w[window.target_start - 1 - window.start: window.end - 1 - window.start] = 1.0
    return w


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]
