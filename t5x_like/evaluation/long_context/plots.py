"""Heatmaps of a length x depth grid, perplexity against length, and atomic writes of
the figures and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

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
