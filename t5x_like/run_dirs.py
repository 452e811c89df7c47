"""What a run directory holds, and when a run in it is finished (stdlib only).

``python -m t5x_like.train --workdir=DIR`` writes ``DIR/results.json`` at the end of
a run (``completed`` is false when it stopped early: preempted, or
``train.stop_after``), ``DIR/metrics.jsonl`` as it goes, and ``DIR/export/`` when it
exports. A staged recipe writes ``DIR/stages.json`` and one such directory a stage.
``stages`` (which stages to skip) and ``launch/sweep.py`` (which points to skip, and
the table of results) read them through this module, so both agree on "finished".
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = "results.json"
STAGES = "stages.json"
METRICS = "metrics.jsonl"
EXPORT = "export"


def read_json(path: Path) -> dict | None:
    """The JSON object at ``path``, or None if absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_results(workdir: Path) -> dict | None:
    """``results.json``; for a staged recipe ``{"stages": ...}`` from ``stages.json``."""
    workdir = Path(workdir)
    results = read_json(workdir / RESULTS)
    if results is None and (stages := read_json(workdir / STAGES)) is not None:
        results = {"stages": stages}
    return results


def final_results(results: dict) -> tuple[dict, str]:
    """The results of the run that ends a recipe (its last stage) and its subdirectory."""
    if results.get("stages"):
        name = list(results["stages"])[-1]
        return results["stages"][name], name
    return results, ""


def is_completed(results: dict | None, stages: int = 0) -> bool:
    """Whether ``results`` (of ``read_results``) say every step ran: of the run, or of
    all ``stages`` stages of a recipe."""
    if not results:
        return False
    if "stages" in results:
        runs = list(results["stages"].values())
        return len(runs) == stages and all(r.get("completed") for r in runs)
    return bool(results.get("completed"))


def finished(workdir: Path, stages: int = 0, *, exported: bool = False) -> bool:
    """Whether the run in ``workdir`` is finished; ``exported``: and wrote its export
    (what the next stage of a recipe starts from)."""
    workdir = Path(workdir)
    if not is_completed(read_results(workdir), stages):
        return False
    return not exported or (workdir / EXPORT / "config.json").is_file()


def last_logged(metrics_file: Path) -> dict:
    """The last ``metrics.jsonl`` record with a loss; a half-written last line is skipped."""
    last = {}
    try:
        lines = Path(metrics_file).read_text(encoding="utf-8").splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            last = record
    return last
