"""Will a run fit its slice? The training step compiled ahead of time for a target.

``check(cfg, target)`` builds the step a training run with ``cfg`` would jit, with the
same code (``run_config.model_config`` / ``build_task`` / ``make_trainer``), over an
abstract state and batch laid on the target's devices, and compiles it with the
chip's own compiler (``targets``): XLA:TPU for a TPU topology, XLA:GPU for H100s,
the host for ``cpu``. Nothing is allocated: no weights are loaded (shapes come from
the config, a model directory's ``config.json`` or a GGUF header; ``model_shapes``)
and no data is read. The :class:`FitReport` holds per-chip bytes (parameters,
optimizer state and batch from their shardings; arguments, outputs, temporaries and
aliases from ``memory_analysis()``), the peak against the chip's HBM, model FLOPs a
step from the shapes (``cost_analysis`` counts a scanned layer once), the compile
seconds, and when it does not fit, what would help.

``find_batch`` bisects the largest global batch that fits at the config's mesh;
``check_recipe`` checks a staged recipe stage by stage. ``python -m t5x_like.compile``
is the command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from t5x_like import partitioning as part
from t5x_like import targets as targets_lib
from t5x_like.run_config import TASKS, build_task, default_pooling, make_trainer, model_config

GIB = 2**30


@dataclasses.dataclass
class FitReport:
    """One compile of a run's step for a target; bytes are per chip (device)."""

    target: str
    mesh: dict[str, int]
    devices: int
    batch_size: int
    row: str  # the rows' shape in words: "512 tokens", "q 128 / p 128 tokens x 8"
    parameters_gib: float
    optimizer_gib: float
    batch_gib: float
    arguments_gib: float
    outputs_gib: float
    aliased_gib: float
    temporaries_gib: float
    peak_gib: float
    hbm_gib: float | None
    model_tflops: float  # a step, the whole batch
    compile_seconds: float
    stage: str = ""
    advice: list[str] = dataclasses.field(default_factory=list)
    refused: str = ""  # the compiler's own out-of-memory error (XLA:TPU stops at its HBM)

    @property
    def fits(self) -> bool:
        return self.hbm_gib is None or self.peak_gib <= self.hbm_gib

    @property
    def headroom_gib(self) -> float | None:
        return None if self.hbm_gib is None else self.hbm_gib - self.peak_gib

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fits": self.fits, "headroom_gib": self.headroom_gib}

    def describe(self) -> str:
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "one device"
        lines = [
            f"{self.stage + ': ' if self.stage else ''}{self.target} ({self.devices} devices; mesh "
            f"{mesh}), global batch {self.batch_size} of {self.row}",
            "  per chip        GiB",
            f"  parameters  {self.parameters_gib:9.2f}",
            f"  optimizer   {self.optimizer_gib:9.2f}",
            f"  batch       {self.batch_gib:9.2f}",
            f"  arguments   {self.arguments_gib:9.2f}   (parameters + optimizer + batch + step)",
            f"  outputs     {self.outputs_gib:9.2f}",
            f"  aliased     {self.aliased_gib:9.2f}   (donated state written in place)",
            f"  temporaries {self.temporaries_gib:9.2f}",
        ]
        if self.hbm_gib is None:
            lines.append(f"  peak        {self.peak_gib:9.2f}   (host memory; no HBM limit)")
        else:
            lines.append(f"  peak        {self.peak_gib:9.2f}   of {self.hbm_gib:.2f} HBM, headroom "
                         f"{self.headroom_gib:.2f} ({'fits' if self.fits else 'DOES NOT FIT'})")
        if self.refused:
            lines.append(f"  the compiler refused it: {self.refused}")
        lines.append(f"  model TFLOPs a step {self.model_tflops:.1f}; compiled in "
                     f"{self.compile_seconds:.1f} s")
        lines += [f"  try: {tip}" for tip in self.advice]
        return "\n".join(lines)


# ------------------------------------------------------------------------- batch


def batch_shapes(cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Each input of a training batch and its global ``(shape, dtype)``, as the data
    pipeline's converters (``data.converters``) lay it out for this config."""
    b = cfg.train.batch_size
    if cfg.task == "dual_encoder":
        q, p, group = cfg.data.query_length, cfg.data.passage_length, 1 + cfg.data.num_negatives
        out = {"query_tokens": ((b, q), jnp.int32), "query_mask": ((b, q), jnp.int32),
               "passage_tokens": ((b, group, p), jnp.int32),
               "passage_mask": ((b, group, p), jnp.int32)}
        if cfg.objective.kd_weight:
            out["teacher_scores"] = ((b, group), jnp.float32)
        return out
    if cfg.task == "lm":
        row = (b, cfg.data.length)
        return {"tokens": (row, jnp.int32), "segment_ids": (row, jnp.int32),
                "positions": (row, jnp.int32), "loss_weights": (row, jnp.float32)}
    raise ValueError(f"config.task={cfg.task!r} is not one of {TASKS}")


def _row(cfg) -> str:
    if cfg.task == "lm":
        return f"{cfg.data.length} tokens"
    group = 1 + cfg.data.num_negatives
    return f"q {cfg.data.query_length} / p {cfg.data.passage_length} tokens x {group}"


def _check_batch(cfg, partitioner: part.Partitioner) -> None:
    b, shards = cfg.train.batch_size, partitioner.batch_shards
    splits = max(cfg.train.accumulation, cfg.train.grad_cache_chunks)
    if b < 1 or b % splits:
        raise ValueError(f"config.train.batch_size={b} does not split into "
                         f"{splits} micro-batches / gradient-cache chunks")
    if (b // splits) % shards:
        raise ValueError(f"config.train.batch_size={b}: each of its {splits} micro-batches / chunks "
                         f"({b // splits} rows) must split over the {shards} batch shards of "
                         f"the mesh ({part.describe_mesh(partitioner.mesh)})")


def _per_device_gib(tree) -> float:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total / GIB


# ------------------------------------------------------------------------- check


def check(cfg: ml_collections.ConfigDict, target: targets_lib.Target | str, *,
          stage: str = "", hbm_gib: float | None = None) -> FitReport:
    """Compiles ``cfg``'s training step for ``target`` and reports its memory (module doc).
    ``hbm_gib``: the memory a chip may use instead of its HBM (to keep headroom, or to
    give the host a budget)."""
    if isinstance(target, str):
        target = targets_lib.get(target)
    mc = model_config(cfg)
    task = build_task(cfg, mc, default_pooling(cfg, mc, None))
    mesh = target.mesh(part.MeshShape.from_config(cfg.mesh))
    trainer = make_trainer(cfg, task, mesh, max(cfg.train.steps, 1))
    _check_batch(cfg, trainer.partitioner)
    shapes = batch_shapes(cfg)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype,
                                        sharding=trainer.partitioner.batch_sharding(len(shape)))
             for name, (shape, dtype) in shapes.items()}
    state = trainer.abstract_state
    start = time.perf_counter()
    try:
        memory = targets_lib.memory_report(trainer.compile_step(batch), target)
        refused = ""
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        refused = str(err).split("RESOURCE_EXHAUSTED: ", 1)[-1].strip().splitlines()[0]
        memory = _refused_memory(refused, state, batch, target)
    seconds = time.perf_counter() - start
    flops = task.flops(state.params, {k: shape for k, (shape, _) in shapes.items()})
    report = FitReport(
        target=target.name, mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
        devices=target.num_devices, batch_size=cfg.train.batch_size, row=_row(cfg),
        parameters_gib=_per_device_gib(state.params), optimizer_gib=_per_device_gib(state.opt_state),
        batch_gib=_per_device_gib(batch), arguments_gib=memory["arguments_gib"],
        outputs_gib=memory["outputs_gib"], aliased_gib=memory["aliased_gib"],
        temporaries_gib=memory["temporaries_gib"], peak_gib=memory["peak_gib"],
        hbm_gib=memory.get("hbm_gib") if hbm_gib is None else hbm_gib,
        model_tflops=flops / 1e12, compile_seconds=seconds, stage=stage, refused=refused)
    if not report.fits:
        report.advice = advice(cfg, report)
    return report


def _refused_memory(message: str, state, batch, target) -> dict[str, float]:
    """Per-chip figures when the compiler stopped at the chip's HBM: the state and batch
    from their shardings, the temporaries it names (``... temporaries (46.75G) ...``)."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    scale = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}
    temporaries = float(found.group(1)) * scale[found.group(2)] if found else float("nan")
    state_gib = _per_device_gib(state)
    arguments = state_gib + _per_device_gib(batch)
    return {"arguments_gib": arguments, "outputs_gib": state_gib, "aliased_gib": state_gib,
            "temporaries_gib": temporaries, "peak_gib": arguments + temporaries,
            "hbm_gib": target.hbm_bytes / GIB if target.hbm_bytes else None}


def advice(cfg, report: FitReport) -> list[str]:
    """What would bring a step that does not fit under the chip's HBM."""
    tips = []
    mesh, n = report.mesh, report.devices
    state = report.parameters_gib + report.optimizer_gib
    if mesh.get("fsdp", 1) * mesh.get("tensor", 1) < n and state > 0.2 * (report.hbm_gib or 0):
        tips.append(f"shard parameters and optimizer state ({state:.1f} GiB a chip now): "
                    f"--config.mesh.fsdp={n // mesh.get('tensor', 1)} --config.mesh.data=1")
    if cfg.model.remat_policy == "none":
        tips.append("recompute activations in the backward pass: --config.model.remat_policy=full")
    if cfg.task == "dual_encoder":
        tips.append("embed the batch in more gradient-cache chunks: "
                    f"--config.train.grad_cache_chunks={2 * max(cfg.train.grad_cache_chunks, 1)}")
    else:
        tips.append("split the batch into more micro-batches: "
                    f"--config.train.accumulation={2 * cfg.train.accumulation}")
    if cfg.train.batch_size > 1:
        tips.append(f"a smaller global batch: --config.train.batch_size={cfg.train.batch_size // 2} "
                    "(--find-batch gives the largest that fits)")
    if mesh.get("tensor", 1) == 1 and report.parameters_gib > 0.5 * (report.hbm_gib or 0):
        tips.append("split each layer's matmuls over chips: --config.mesh.tensor=2 (or 4, 8)")
    return tips


def find_batch(cfg: ml_collections.ConfigDict, target: targets_lib.Target | str, *,
               limit: int = 1 << 20, hbm_gib: float | None = None,
               on_report: Callable[[FitReport], None] | None = None) -> tuple[FitReport | None, int | None]:
    """The largest global batch that fits at ``cfg``'s mesh: ``(its report, the smallest
    batch found not to fit)``. Batches move in steps of one row per batch shard and
    micro-batch / chunk, so every batch tried is one a run could use. ``(None, that
    step)`` when even one step's worth does not fit; ``(report, None)`` at ``limit``."""
    if isinstance(target, str):
        target = targets_lib.get(target)
    mesh = target.mesh(part.MeshShape.from_config(cfg.mesh))
    shards = part.Partitioner(mesh, part.current_rules()).batch_shards
    unit = shards * max(cfg.train.accumulation, cfg.train.grad_cache_chunks)

    def set_batch(c, units):
        c.train.batch_size = units * unit

    return _largest(cfg, target, set_batch, unit, cfg.train.batch_size, limit, hbm_gib, on_report)


def find_length(cfg: ml_collections.ConfigDict, target: targets_lib.Target | str, *,
                unit: int = 1024, limit: int = 1 << 20, hbm_gib: float | None = None,
                on_report: Callable[[FitReport], None] | None = None
                ) -> tuple[FitReport | None, int | None]:
    """The longest LM row (tokens, in steps of ``unit``) that fits at ``cfg``'s batch and
    mesh, the position table growing with it; returns as ``find_batch``."""
    if cfg.task != "lm":
        raise ValueError("find_length: config.task must be 'lm' (rows of data.length tokens)")

    def set_length(c, units):
        c.data.length = c.model.max_position_embeddings = units * unit

    return _largest(cfg, target, set_length, unit, cfg.data.length, limit, hbm_gib, on_report)


def _largest(cfg, target, set_value: Callable, unit: int, start: int, limit: int,
             hbm_gib: float | None, on_report) -> tuple[FitReport | None, int | None]:
    """Doubling then bisection over ``units`` (the value is ``units * unit``)."""
    tried: dict[int, FitReport] = {}

    def fits(units: int) -> bool:
        c = cfg.copy_and_resolve_references()
        set_value(c, units)
        report = tried[units] = check(c, target, hbm_gib=hbm_gib)
        if on_report is not None:
            on_report(report)
        return report.fits

    lo, hi = None, max(1, start // unit)
    if fits(hi):
        lo, hi = hi, None
        while hi is None:
            if lo * 2 * unit > limit:
                return tried[lo], None
            if fits(lo * 2):
                lo *= 2
            else:
                hi = lo * 2
    else:
        while lo is None:
            if hi == 1:
                return None, unit
            if fits(hi // 2):
                lo = hi // 2
            else:
                hi //= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return tried[lo], hi * unit


def check_recipe(cfg: ml_collections.ConfigDict, target: targets_lib.Target | str, *,
                 hbm_gib: float | None = None) -> list[FitReport]:
    """One report for a plain run; one a stage for a staged recipe (``stages.num > 0``),
    each stage at its own row length, RoPE base and batch, with the base model's shapes."""
    if cfg.stages.num <= 0:
        return [check(cfg, target, hbm_gib=hbm_gib)]
    from t5x_like.stages import stage_configs

    reports = []
    for stage_dir, stage_cfg in stage_configs(cfg, "fit-check"):
        # Later stages start from the previous stage's export: the same shapes.
        stage_cfg.model.pretrained = cfg.model.pretrained
        reports.append(check(stage_cfg, target, stage=stage_dir.name, hbm_gib=hbm_gib))
    return reports
