"""Progressive context extension: one command trains every stage, each from the last.

A config with ``stages.num = n > 0`` is a recipe of ``n`` LM stages. Stage ``i`` trains
rows of ``data.length * stages.length_factor ** i`` tokens with the RoPE base
``model.rope_theta * stages.rope_theta_factor ** i`` (adjusted base frequency: the
bootstrapping recipe multiplies it by 4 for every doubling) and a position table as long
as its rows. Stage 0 starts from ``model.pretrained`` (or a fresh model); stage ``i > 0``
from the Hugging Face export of stage ``i - 1``. With ``stages.constant_tokens`` the batch
shrinks as rows grow, so every stage sees the same tokens a step.

Each stage is an ordinary single run (``train.train``) in ``WORKDIR/stage{i}_{length}``: the
command run again skips finished stages (their ``results.json`` and export exist) and
resumes an interrupted one from its latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import ml_collections

from t5x_like import paths, run_dirs
from t5x_like.run_config import check_config


def stage_configs(cfg: ml_collections.ConfigDict, workdir: str | Path
                  ) -> list[tuple[Path, ml_collections.ConfigDict]]:
    """``[(stage workdir, stage config)]`` for a staged config (see the module doc)."""
    s = cfg.stages
    if cfg.task != "lm":
        raise ValueError(f"config.stages.num={s.num} needs config.task='lm', not {cfg.task!r}")
    if cfg.model.rope_theta <= 0:
        raise ValueError("config.stages: set config.model.rope_theta, the first stage's RoPE base "
                         "(later stages multiply it by stages.rope_theta_factor)")
    if s.length_factor < 1 or s.rope_theta_factor < 1:
        raise ValueError(f"config.stages: length_factor={s.length_factor} and rope_theta_factor="
                         f"{s.rope_theta_factor} must be >= 1")
    out = []
    for i in range(s.num):
        c = cfg.copy_and_resolve_references()
        c.stages.num = 0  # a stage is a plain run
        c.data.length = cfg.data.length * s.length_factor ** i
        c.model.max_position_embeddings = c.data.length
        c.model.rope_theta = cfg.model.rope_theta * s.rope_theta_factor ** i
        c.train.export = True
        if s.steps > 0:
            c.train.steps = s.steps
        if s.constant_tokens:
            shrink = s.length_factor ** i
            if cfg.train.batch_size % shrink:
                raise ValueError(
                    f"config.stages.constant_tokens: stage {i} needs train.batch_size="
                    f"{cfg.train.batch_size} divisible by {shrink} (length_factor ** {i})")
            c.train.batch_size = cfg.train.batch_size // shrink
            c.train.accumulation = max(1, min(c.train.accumulation, c.train.batch_size))
        stage_dir = Path(workdir) / f"stage{i}_{c.data.length}"
        if i > 0:
            c.model.pretrained = str(out[-1][0] / "export")
        out.append((stage_dir, c))
    return out


def finished(stage_dir: Path) -> bool:
    """Whether a stage ran all its steps and exported (a stopped one has results, no export)."""
    return run_dirs.finished(stage_dir, exported=True)


def run_stages(cfg: ml_collections.ConfigDict, workdir: str | Path,
               run: Callable[[ml_collections.ConfigDict, Path], dict]) -> dict:
    """Trains every stage in order (skipping finished ones); ``{stage name: results}``.

    ``run(config, workdir)`` is the single run (``train.train`` passes itself).
    """
    stages = stage_configs(cfg, workdir)
    check_config(stages[0][1])  # bad paths fail before the first model loads
    Path(workdir).mkdir(parents=True, exist_ok=True)
    results = {}
    for i, (stage_dir, c) in enumerate(stages):
        name = stage_dir.name
        if finished(stage_dir):
            print(f"stage {i} ({name}) finished earlier; skipping")
            results[name] = run_dirs.read_results(stage_dir)
            continue
        print(f"\n=== stage {i + 1}/{len(stages)}: {c.data.length} tokens a row, RoPE base "
              f"{c.model.rope_theta:g}, {c.train.steps} steps of {c.train.batch_size} rows ===")
        results[name] = run(c, stage_dir)
        if not results[name]["completed"]:
            print(f"stage {i} ({name}) stopped before its last step; run the same command "
                  "again to resume it and the stages after it")
            break
    if jax.process_index() == 0:
        paths.write_json_atomic(Path(workdir) / run_dirs.STAGES, results)
    return results
