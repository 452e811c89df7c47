"""Token-budgeted text cutting with nothing but a ``count_tokens`` function.

The workflow must work with any LM, including a remote one whose tokenizer we can
only call, never slice; so texts are cut at word boundaries (whitespace kept) and
the pieces are checked with the real count. Counting words one at a time and
summing over-estimates a piece's count (each word pays its own leading-space
piece), which errs on the side of fitting.
"""

from __future__ import annotations

import re
from typing import Callable

Counter = Callable[[str], int]
_WORD = re.compile(r"\S+\s*|\s+")


def words(text: str) -> list[str]:
    """``text`` as words with their trailing whitespace (``"".join(words(t)) == t``)."""
    return _WORD.findall(text)


def fit(text: str, budget: int, count: Counter) -> str:
    """The longest word prefix of ``text`` with at most ``budget`` tokens (binary search)."""
    if count(text) <= budget:
        return text
    pieces = words(text)
    lo, hi = 0, len(pieces)  # invariant: prefix of lo words fits, of hi words does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count("".join(pieces[:mid])) <= budget:
            lo = mid
        else:
            hi = mid
    return "".join(pieces[:lo]).rstrip()


def split(text: str, budget: int, count: Counter) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``budget`` tokens each, cut between words.

    A single word longer than the budget (a URL, a run of digits) is cut by characters.
    """
    if budget < 1:
        raise ValueError(f"split: budget={budget} must be >= 1")
    out, current, used = [], [], 0
    for word in words(text):
        n = count(word)
        if current and used + n > budget:
            out.append("".join(current))
            current, used = [], 0
        current.append(word)
        used += n
    if current:
        out.append("".join(current))
    return [p for piece in out for p in _enforce(piece, budget, count) if p.strip()]


def _enforce(piece: str, budget: int, count: Counter) -> list[str]:
    """Halves a piece until every part really fits (the word sum is only an estimate)."""
    if count(piece) <= budget:
        return [piece]
    pieces = words(piece)
    if len(pieces) == 1:  # one over-long word: halve it by characters
        if len(piece) == 1:
            return [piece]
        cut = len(piece) // 2
        return _enforce(piece[:cut], budget, count) + _enforce(piece[cut:], budget, count)
    half = len(pieces) // 2
    return (_enforce("".join(pieces[:half]), budget, count)
            + _enforce("".join(pieces[half:]), budget, count))


def group(texts: list[str], budget: int, count: Counter, separator: str = "\n\n") -> list[list[str]]:
    """Consecutive texts grouped so each group's joined count stays within ``budget``.

    Every group but a lone last one holds at least two texts, even over the budget
    (the caller trims them): that halves the number of texts each round, so a
    recursive summary always ends.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    for text in texts:
        if len(current) >= 2 and count(separator.join(current + [text])) > budget:
            groups.append(current)
            current = []
        current.append(text)
    if current:
        if len(current) == 1 and groups:
            groups[-1].append(current[0])
        else:
            groups.append(current)
    return groups


__all__ = ["fit", "group", "split", "words"]
