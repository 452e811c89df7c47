"""Train from an ml-collections config: ``python -m t5x_like.train --config=FILE[:ARG] --workdir=DIR``.

Every field of the config (see ``configs/base.py``) can be overridden with
``--config.SECTION.FIELD=VALUE``; a misspelt field is an error that lists the
valid ones. A work directory that already holds checkpoints resumes from the
newest readable one (parameters, optimizer, step, RNG and the data iterator's
position; an unreadable newer step is moved aside), after comparing the config
with the stored one (``t5x_like.resume_check``).
The resolved config is written to ``WORKDIR/config.json`` and into every
checkpoint; metrics go to ``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from t5x_like import checkpoints, cli, config_cli, distributed, paths, stages
from t5x_like import partitioning as part
from t5x_like.eval_hooks import beir_hook, perplexity_hook
from t5x_like.export import export_model
from t5x_like.metrics import MetricsWriter, plot_curves
from t5x_like.model_sources import resolve_path
from t5x_like.resume_check import check_resume
from t5x_like.run_config import (
    build_task,
    check_config,
    default_pooling,
    load_model,
    make_trainer,
    tokenizer_path,
)

log = logging.getLogger(__name__)


def define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    config_flags.DEFINE_config_file("config", None, "ml-collections config file[:arg].")
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here.")


# -------------------------------------------------------------------------- run



def train(cfg, workdir: str | Path) -> dict:
    """Runs (or resumes) the experiment; returns the final metrics and evaluations.

    A staged config (``stages.num > 0``) runs every stage (``t5x_like.stages``) and
    returns ``{"stages": {stage name: its results}}``.
    """
    from t5x_like.data import builders

    # Before anything touches a device; every later stage finds the job joined.
    distributed.initialize(cfg.get("distributed"))
    if cfg.stages.num > 0:
        return {"stages": stages.run_stages(cfg, workdir, run=train)}
    check_config(cfg)
    cfg = cfg.copy_and_resolve_references()
    cfg.data.path = str(resolve_path(cfg.data.path, "data.path"))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(cfg.to_json_best_effort())
    ckpt = None
    if (workdir / "checkpoints").is_dir():  # before config.json is replaced: errors point to it
        ckpt = open_checkpointer(cfg, workdir)
        stored = ckpt.stored_config()
        try:
            if stored is not None:
                check_resume(stored[1], resolved, f"{ckpt.directory}/{stored[0]}")
        except ValueError:
            ckpt.close()
            raise
    if jax.process_index() == 0:
        paths.write_json_atomic(workdir / "config.json", resolved)

    model_config, host_params, model_dir = load_model(cfg)
    task = build_task(cfg, model_config, default_pooling(cfg, model_config, model_dir))
    mesh = part.make_mesh(part.MeshShape.from_config(cfg.mesh))
    print(f"{part.describe_mesh(mesh)}; task {cfg.task}; model "
          f"{cfg.model.pretrained or cfg.model.architecture}")
    tok_dir = tokenizer_path(cfg, model_dir)
    vocab = builders.vocabulary(tok_dir)
    if cfg.task == "dual_encoder":
        data = builders.contrastive_batches(cfg.data, vocab, cfg.train.batch_size, mesh, seed=cfg.seed)
    else:
        data = builders.lm_batches(cfg.data, vocab, cfg.train.batch_size, mesh, seed=cfg.seed)
    steps = cfg.train.steps
    if cfg.train.epochs > 0:
        examples = getattr(data, "num_examples", None)
        if examples is None:
            raise ValueError("config.train.epochs needs data of known size; set config.train.steps")
        steps = math.ceil(cfg.train.epochs * examples / cfg.train.batch_size)
    trainer = make_trainer(cfg, task, mesh, steps)

    ckpt = ckpt or open_checkpointer(cfg, workdir)
    if ckpt.latest_step() is not None:
        state, step = ckpt.restore_latest_readable(trainer.abstract_state, data=data)
        print(f"resuming from {ckpt.directory}/{step}")
    else:
        state = trainer.init_state(host_params)
    del host_params

    hooks, results = [], {"steps": steps}
    if cfg.task == "dual_encoder" and cfg.eval.beir_path:
        hook, baseline = beir_hook(cfg, task, model_config, tok_dir, workdir, trainer)
        hooks.append(hook)
        if baseline:
            results["bm25"] = {"ndcg@10": baseline["ndcg@10"], "recall@100": baseline["recall@100"]}
    elif cfg.task == "lm" and cfg.eval.lm_path:
        hooks.append(perplexity_hook(cfg, task, trainer, vocab))
    start = int(jax.device_get(state.step))
    if hooks and cfg.eval.before and start == 0:
        results["before"] = {k: v for h in hooks for k, v in h(state).items()}
        print(f"before training: {results['before']}")

    writer = MetricsWriter(workdir)
    watcher = checkpoints.PreemptionWatcher()
    try:
        until = min(steps, cfg.train.stop_after) if cfg.train.stop_after > 0 else steps
        state = trainer.fit(state, data, num_steps=until, checkpointer=ckpt, preemption=watcher,
                            config=resolved, writer=writer, hooks=tuple(hooks),
                            log_every=cfg.train.log_every, workdir=workdir)
    finally:
        watcher.close()
        writer.close()
        ckpt.close()
    # Preempted or stopped early (train.stop_after): no "after" and no export, which
    # would pass a half-trained model off as the result; running again resumes.
    results["completed"] = int(jax.device_get(state.step)) == steps
    if results["completed"] and hooks:
        results["after"] = {k: float(v) for h in hooks for k, v in h.last.items()}
    if jax.process_index() == 0 and (workdir / "metrics.jsonl").exists():
        plot_curves(workdir / "metrics.jsonl", workdir / "loss.png")
    if cfg.train.export and results["completed"]:
        export_model(task, state, model_config, tok_dir, workdir / "export")
    if jax.process_index() == 0:
        paths.write_json_atomic(workdir / "results.json", results)
    return results


def open_checkpointer(cfg, workdir: Path) -> checkpoints.Checkpointer:
    return checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints,
                                    save_every=cfg.train.checkpoint_every,
                                    async_save=cfg.train.async_checkpoints)


def print_results(results: dict) -> None:
    rows = [(name, results[name]) for name in ("bm25", "before", "after") if name in results]
    if not rows:
        return
    names = sorted({k for _, r in rows for k in r})
    print("\n" + " " * 10 + "".join(f"{n:>14s}" for n in names))
    for label, r in rows:
        print(f"{label:10s}" + "".join(f"{r.get(n, float('nan')):14.4f}" for n in names))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or not workdir:
        raise app.UsageError("--config=FILE[:ARG] and --workdir=DIR are required")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax / bm25s chatter
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("t5x_like").setLevel(logging.INFO)
    results = train(config, workdir)
    for name, stage_results in results.get("stages", {}).items():
        print(f"\n{name}:")
        print_results(stage_results)
    print_results(results)


if __name__ == "__main__":
    define_flags()
    cli.run_absl(main, config_cli.parse_flags)
