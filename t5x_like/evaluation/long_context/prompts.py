"""The probes' prompts: passkey (Landmark Attention's format) and needle-in-a-haystack
trials, tokenized piece by piece so the needle and answer land where they are meant to."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator, Sequence

import numpy as np

# ------------------------------------------------------------------ templates

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
               "on a sunny day.")
NIAH_QUESTION = ("Question: What is the best thing to do in San Francisco? "
                 "Answer: The best thing to do in San Francisco is")
NIAH_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."

_NO_TRUNCATION = 1 << 30  # "max_length" that never truncates


# ----------------------------------------------------------------- tokenizing


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PieceTokenizer:
    """Token ids of text pieces joined by single spaces, as the whole text would tokenize.

    Wraps a ``convert.tokenizer`` tokenizer (SentencePiece or ``tokenizer.json``): the
    special tokens it adds (``<s>``...) are learnt from encoding ``""`` and stripped from
    pieces; ``special_prefix`` starts every sequence. A continuation piece is tokenized
    after an anchor ``"."`` and the anchor's ids are removed, so each piece carries its
    leading space (``▁The``, ``ĠThe``) exactly as in running text.
    """

    _ANCHOR = "."

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        empty = self._encode([""])[0]
        probe = self._encode(["x"])[0]
        n = _common_prefix_length(empty, probe)
        self.special_prefix = list(empty[:n])
        self._suffix_length = len(empty) - n
        self._anchor = self._strip(self._encode([self._ANCHOR])[0])

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode(list(texts), _NO_TRUNCATION)

    def _strip(self, ids: list[int]) -> list[int]:
        return list(ids[len(self.special_prefix): len(ids) - self._suffix_length])

    def start(self, text: str) -> list[int]:
        """Ids of ``text`` at the start of a document, without special tokens."""
        return self._strip(self._encode([text])[0])

    def continuation(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each ``" " + text`` following other text."""
        out = []
        for text, ids in zip(texts, self._encode([f"{self._ANCHOR} {t}" for t in texts])):
            ids = self._strip(ids)
            if ids[: len(self._anchor)] != self._anchor:
                raise ValueError(f"tokenizer merges {text[:40]!r} into the text before it; "
                                 "pieces cannot be tokenized apart")
            out.append(ids[len(self._anchor):])
        return out


# ---------------------------------------------------------------- the probes


@dataclasses.dataclass(frozen=True)
class Probe:
    """One teacher-forced trial: ``tokens`` (prompt + answer) of exactly ``length`` ids."""

    tokens: np.ndarray  # [length] int32
    answer_start: int  # index of the first answer token
    needle_start: int  # index of the first needle token
    needle_length: int
    # the haystack spans [haystack_start, haystack_start + haystack_length + needle_length)
    haystack_start: int
    haystack_length: int  # haystack tokens, needle excluded
    depth: float  # the depth requested
    answer: str
    length: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "length", int(len(self.tokens)))

    @property
    def needle_depth(self) -> float:
        """Where the needle actually sits: its haystack offset over the haystack length."""
        return (self.needle_start - self.haystack_start) / max(self.haystack_length, 1)


def fill_haystack(sentences: Iterable[list[int]], num_tokens: int) -> tuple[list[int], list[int]]:
    """``num_tokens`` ids taken sentence by sentence (the last one cut) and the sentence starts.

    The starts (with ``num_tokens`` itself) are where a needle may go without splitting
    a sentence.
    """
    ids: list[int] = []
    boundaries = [0]
    for sentence in sentences:
        if len(ids) >= num_tokens:
            break
        ids.extend(sentence)
        boundaries.append(len(ids))
    if len(ids) < num_tokens:
        raise ValueError(f"the haystack text has only {len(ids)} tokens; {num_tokens} are needed")
    return ids[:num_tokens], sorted({min(b, num_tokens) for b in boundaries})


def needle_offset(boundaries: Sequence[int], haystack_length: int, depth: float) -> int:
    """The sentence boundary nearest to ``depth * haystack_length`` (ties: the earlier one)."""
    target = depth * haystack_length
    return min(boundaries, key=lambda b: (abs(b - target), b))


def build_probe(
    *,
    prefix: list[int],
    haystack: Iterable[list[int]],
    needle: list[int],
    question: list[int],
    answer: list[int],
    length: int,
    depth: float,
    answer_text: str,
) -> Probe:
    """``prefix + haystack[:i] + needle + haystack[i:] + question + answer``, ``length`` ids.

    The haystack is cut to fill the length exactly and the needle goes to the sentence
    boundary nearest the fraction ``depth`` of it.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    fixed = len(prefix) + len(needle) + len(question) + len(answer)
    haystack_length = length - fixed
    if haystack_length < 1:
        raise ValueError(f"length={length} is too short: the prompt without haystack takes {fixed} tokens")
    hay, boundaries = fill_haystack(haystack, haystack_length)
    offset = needle_offset(boundaries, haystack_length, depth)
    tokens = prefix + hay[:offset] + needle + hay[offset:] + question + answer
    assert len(tokens) == length, (len(tokens), length)
    return Probe(
        tokens=np.asarray(tokens, np.int32), answer_start=length - len(answer),
        needle_start=len(prefix) + offset, needle_length=len(needle),
        haystack_start=len(prefix), haystack_length=haystack_length, depth=float(depth),
        answer=answer_text,
    )


def _cycle(items: Sequence[list[int]]) -> Iterator[list[int]]:
    while True:
        yield from items


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """A 5-digit key that depends only on the seed and the trial's place in the grid."""
    rng = np.random.default_rng([seed, length, round(depth * 1_000_000), trial])
    return int(rng.integers(10_000, 100_000))


class PasskeyPrompts:
    """Passkey trials (the Landmark Attention format) at exact token lengths."""

    def __init__(self, pieces: PieceTokenizer):
        self.pieces = pieces
        self.intro = pieces.start(PASSKEY_INTRO)
        self.filler = pieces.continuation(PASSKEY_FILLER)
        self.question = pieces.continuation([PASSKEY_QUESTION])[0]

    def build(self, length: int, depth: float, key: int) -> Probe:
        needle, answer = self.pieces.continuation([PASSKEY_NEEDLE.format(key=key), str(key)])
        return build_probe(
            prefix=self.pieces.special_prefix + self.intro, haystack=_cycle(self.filler),
            needle=needle, question=self.question, answer=answer, length=length, depth=depth,
            answer_text=str(key),
        )

    def min_length(self) -> int:
        """The shortest length with one haystack token (the longest key tokenization)."""
        probe_key = 99_999
        needle, answer = self.pieces.continuation([PASSKEY_NEEDLE.format(key=probe_key), str(probe_key)])
        return len(self.pieces.special_prefix + self.intro + needle + self.question + answer) + 1


def split_sentences(text: str) -> list[str]:
    """Sentences of running text, whitespace collapsed (a period, ! or ? and a space end one)."""
    text = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


class NeedlePrompts:
    """Needle-in-a-haystack trials: a book's sentences around one needle sentence."""

    def __init__(self, pieces: PieceTokenizer, books: Sequence[str], *, needle: str = NIAH_NEEDLE,
                 question: str = NIAH_QUESTION, answer: str = NIAH_ANSWER):
        if not books:
            raise ValueError("no haystack books given")
        self.pieces = pieces
        self.books = [split_sentences(b) for b in books]
        self.needle, self.question, self.answer = pieces.continuation([needle, question, answer])
        self.answer_text = answer
        self._tokenized: dict[int, list[list[int]]] = {}

    def _book_sentences(self, book: int, num_tokens: int) -> list[list[int]]:
        """The book's first sentences as ids, enough for ``num_tokens`` (tokenized lazily)."""
        done = self._tokenized.setdefault(book, [])
        sentences = self.books[book]
        while sum(map(len, done)) < num_tokens and len(done) < len(sentences):
            batch = sentences[len(done): len(done) + 512]
            done.extend(self.pieces.continuation(batch))
        return done

    def build(self, length: int, depth: float, trial: int = 0) -> Probe:
        book = trial % len(self.books)
        return build_probe(
            prefix=self.pieces.special_prefix, haystack=self._book_sentences(book, length),
            needle=self.needle, question=self.question, answer=self.answer, length=length,
            depth=depth, answer_text=self.answer_text,
        )

    def min_length(self) -> int:
        return len(self.pieces.special_prefix + self.needle + self.question + self.answer) + 1
