"""The three probes run over their grids: passkey and needle (length x depth), perplexity
against length."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from t5x_like.evaluation.long_context.prompts import NeedlePrompts, PasskeyPrompts, passkey_key
from t5x_like.evaluation.long_context.scoring import LMScorer, count_windows, score_probes, sliding_window_nll

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
