"""Scoring rows with a decoder: per-row LM sums (``objectives.lm.decoder_sums``), probes
and sliding-window negative log-likelihood."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from t5x_like.evaluation.long_context.prompts import Probe
from t5x_like.evaluation.long_context.windows import (
    Batch,
    _chunks,
    answer_weights,
    bucket_length,
    make_batch,
    sliding_windows,
    window_weights,
)

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
            targets = jax.numpy.concatenate([tokens[:, 1:], jax.numpy.zeros_like(tokens[:, :1])], axis=1)
            batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
            sums = lm.decoder_sums(model, params, config, batch, targets, weights,
                                   chunk_size=chunk_size, per_row=True)
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
