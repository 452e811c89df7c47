"""The training engine: train state, one jitted step, and the loop around it.

``Trainer(task, optimizer, mesh, ...)`` builds the optimizer (AdamW, warmup
then linear / cosine decay, global-norm clipping, frozen parameters masked
out), the state's shardings from the logical-axis rules, and one jitted step
(``in_shardings`` / ``out_shardings`` set, state donated) that accumulates
gradients over micro-batches. ``fit`` runs the loop: metrics (loss, accuracy,
learning rate, gradient norm, tokens/s, MFU) to a JSONL file, TensorBoard and
a progress bar; eval hooks; checkpoints (periodic, final, on SIGTERM); and
non-finite steps, which are skipped in the step itself and reported with the
step and the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_like import partitioning as part
from t5x_like.objectives.contrastive import split_chunks
from t5x_like.train_tasks import FROZEN, TRAIN, batch_shapes

log = logging.getLogger(__name__)
DECAYS = ("linear", "cosine", "constant")
ON_NONFINITE = ("error", "skip")

# Dense bf16 peak FLOP/s per device, for MFU; override with peak_flops_per_device.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data (raw, so orbax stores it as an array)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    decay: str = "linear"  # linear | cosine | constant, after warmup, to end_factor * lr
    end_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # on matrices only (not norms, biases, the temperature)
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"optimizer.decay={self.decay!r} is not one of {DECAYS}")
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_factor
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_factor)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if not cfg.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig, total_steps: int, labels) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the leaves labelled ``train``; ``frozen`` leaves get zero updates and no state."""
    schedule = make_schedule(cfg, total_steps)

    def decayed(params):  # matrices, not norms / biases / the temperature
        return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)

    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decayed)
    train = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
    return optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels), schedule


def peak_flops_per_device(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


# ------------------------------------------------------------------------ trainer


@dataclasses.dataclass
class EvalHook:
    """``fn(state) -> {metric: value}`` run every ``every`` steps and after the last."""

    name: str
    every: int
    fn: Callable[[TrainState], dict[str, float]]
    last: dict[str, float] = dataclasses.field(default_factory=dict)  # the latest results

    def __call__(self, state: TrainState) -> dict[str, float]:
        self.last = {k: float(v) for k, v in self.fn(state).items()}
        return self.last


class Trainer:
    def __init__(self, task, optimizer: OptimizerConfig, mesh, *, total_steps: int,
                 accumulation: int = 1, seed: int = 0, rules=None, on_nonfinite: str = "error",
                 peak_flops: float | None = None):
        if accumulation < 1:
            raise ValueError(f"train.accumulation={accumulation} must be >= 1")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"train.on_nonfinite={on_nonfinite!r} is not one of {ON_NONFINITE}")
        self.task = task
        if isinstance(mesh, part.Partitioner):
            rules = mesh.rules if rules is None else rules
            mesh = mesh.mesh
        # Parameters, batches and the step's scope all come from one partitioner.
        self.partitioner = part.Partitioner(mesh, part.current_rules() if rules is None else rules)
        self.mesh = mesh
        self.total_steps = total_steps
        self.accumulation = accumulation
        self.seed = seed
        self.rules = self.partitioner.rules
        self.on_nonfinite = on_nonfinite
        self.peak_flops = peak_flops if peak_flops is not None else peak_flops_per_device()
        rng = jax.random.key(seed)
        with part.axis_rules(self.rules):
            abstract_model, model_specs = task.abstract_model_params(rng)
            abstract_params = jax.eval_shape(lambda m, r: task.init_params(m, r), abstract_model, rng)
            specs = task.param_specs(abstract_params, model_specs)
            self.param_shardings = self.partitioner.param_shardings(specs, abstract_params)
        self.model_shardings = self.param_shardings["model"]
        labels = task.trainable_labels(abstract_params)
        self.optimizer, self.schedule = make_optimizer(optimizer, total_steps, labels)
        replicated = self.partitioner.replicated()
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        opt_shardings = _like_params(abstract_opt, abstract_params, self.param_shardings, replicated)
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                          opt_state=opt_shardings, rng=replicated)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                       opt_state=abstract_opt,
                       rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))),
            self.state_shardings)
        self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, None),
                             out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        self._flops_per_step: float | None = None

    # ------------------------------------------------------------------ state

    def init_state(self, model_params=None) -> TrainState:
        """A fresh state; ``model_params`` (e.g. from ``convert.hf.load_hf``) replace the
        random initialisation and are placed straight onto their shardings."""
        rng = jax.random.key(self.seed)
        init_rng, extra_rng, step_rng = jax.random.split(rng, 3)
        # Outside jax.set_mesh: the one-row init example must not meet batch constraints.
        with part.axis_rules(self.rules):
            if model_params is None:
                model_params = jax.jit(lambda r: flax.linen.unbox(self.task.init_model_params(r)),
                                       out_shardings=self.model_shardings)(init_rng)
            else:
                model_params = self.partitioner.place(model_params, self.model_shardings)

            def build(model_params, extra_rng, step_rng):
                params = self.task.init_params(model_params, extra_rng)
                return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=self.optimizer.init(params),
                                  rng=jax.random.key_data(step_rng))

            return jax.jit(build, out_shardings=self.state_shardings)(model_params, extra_rng, step_rng)

    # ------------------------------------------------------------------- step

    def _sums_and_grads(self, params, batch, rng):
        if self.accumulation == 1:
            return self.task.sums_and_grads(params, batch, rng)
        micro = jax.tree.map(lambda x: split_chunks(x, self.accumulation), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(self.task.sums_and_grads, params, first, rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(acc, xs):
            index, mb = xs
            out = self.task.sums_and_grads(params, mb, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, acc, out), None

        (sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(self.accumulation), micro))
        return sums, grads

    def _train_step(self, state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        sums, grads = self._sums_and_grads(state.params, batch, rng)
        weight = sums["weight"]
        grads = jax.tree.map(lambda g: g / weight, grads)
        grad_norm = optax.tree.norm(grads)
        loss = sums["loss"] / weight
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves parameters and optimizer state as they were.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {k: v / weight for k, v in sums.items() if k not in ("weight", "tokens")}
        metrics.update(tokens=sums["tokens"], grad_norm=grad_norm, finite=finite,
                       learning_rate=self.schedule(state.step))
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        return new_state, metrics

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update; host numpy batches are placed on the mesh first."""
        if any(isinstance(x, np.ndarray) for x in jax.tree.leaves(batch)):
            batch = self.partitioner.shard_batch(batch)
        with self.partitioner.scope():
            return self._step(state, batch)

    def flops_per_step(self, state: TrainState, batch: dict) -> float:
        if self._flops_per_step is None:
            self._flops_per_step = self.task.flops(state.params, batch_shapes(batch))
        return self._flops_per_step

    # ------------------------------------------------------------------- loop

    def fit(self, state: TrainState, data: Iterable[dict], *, num_steps: int | None = None,
            checkpointer=None, preemption=None, config: dict | None = None, writer=None,
            hooks: tuple[EvalHook, ...] = (), log_every: int = 10, workdir: str | Path | None = None,
            show_progress: bool = True) -> TrainState:
        """Trains until ``num_steps`` (default ``total_steps``) updates have been applied."""
        from tqdm.auto import tqdm

        num_steps = self.total_steps if num_steps is None else num_steps
        start = int(jax.device_get(state.step))
        data_iter: Iterator[dict] = iter(data)
        bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
                   disable=not show_progress or jax.process_index() != 0)
        window = _Window()
        previous = None  # (step, metrics, batch): checked one step late to keep the device busy
        step = start
        try:
            while step < num_steps:
                batch = next(data_iter)
                state, metrics = self.step(state, batch)
                step += 1
                if previous is not None:
                    self._check_finite(*previous, data, workdir)
                previous = (step, metrics, batch)
                window.add(metrics)
                if step % log_every == 0 or step == num_steps:
                    self._check_finite(*previous, data, workdir)
                    previous = None
                    logged = window.summary(self.flops_per_step(state, batch), self.peak_flops,
                                            jax.device_count())
                    bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['learning_rate']:.2e}")
                    if writer is not None:
                        writer.write(step, logged)
                for hook in hooks:
                    if step % hook.every == 0 or step == num_steps:
                        results = {f"{hook.name}/{k}": v for k, v in hook(state).items()}
                        log.info("step %d %s", step, results)
                        if writer is not None:
                            writer.write(step, results)
                bar.update(1)
                stop = preemption is not None and preemption.should_stop(step)
                if checkpointer is not None:
                    checkpointer.save(step, state, data=data, config=config,
                                      force=stop or step == num_steps)
                if stop:
                    log.warning("preempted: saved step %d and stopped", step)
                    break
            if previous is not None:
                self._check_finite(*previous, data, workdir)
        finally:
            bar.close()
            if checkpointer is not None:
                checkpointer.wait()
        return state

    def _check_finite(self, step: int, metrics: dict, batch: dict, data, workdir) -> None:
        if bool(jax.device_get(metrics["finite"])):
            return
        values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}
        where = _save_batch(batch, step, workdir)
        position = getattr(data, "batches_read", None)
        message = (f"step {step}: non-finite loss {values['loss']} / gradient norm "
                   f"{values['grad_norm']}; the update was skipped. Batch: "
                   f"{ {k: tuple(v.shape) for k, v in batch.items()} }"
                   + (f", saved to {where}" if where else "")
                   + (f"; data iterator had read {position} batches after it" if position else ""))
        if self.on_nonfinite == "error":
            raise FloatingPointError(message + ". Set train.on_nonfinite=skip to continue past such steps.")
        log.warning(message)


class _Window:
    """Metrics of the steps since the last log line (fetched only when logging)."""

    def __init__(self):
        self.pending: list[dict] = []
        self.since = time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def summary(self, flops_per_step: float, peak: float | None, devices: int) -> dict[str, float]:
        fetched = jax.device_get(self.pending)
        elapsed = time.perf_counter() - self.since
        steps = len(fetched)
        out = {k: float(np.mean([m[k] for m in fetched]))
               for k in fetched[-1] if k not in ("tokens", "finite", "learning_rate")}
        out["learning_rate"] = float(fetched[-1]["learning_rate"])
        out["skipped_steps"] = float(sum(not m["finite"] for m in fetched))
        out["tokens_per_second"] = float(sum(m["tokens"] for m in fetched)) / elapsed
        out["steps_per_second"] = steps / elapsed
        if peak:
            out["mfu"] = flops_per_step * steps / elapsed / (peak * devices)
        self.pending = []
        self.since = time.perf_counter()
        return out


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _like_params(opt_state, params, param_shardings, default):
    """Shardings for optimizer state: a leaf whose dict-key path ends with a parameter's
    path (Adam's moments) and has its shape shares its sharding; the rest (counts) get
    ``default``. (optax.tree_map_params trips over multi_transform's masked nodes.)"""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                      jax.tree.leaves(param_shardings)):
        by_path[_dict_keys(path)] = (leaf.shape, sharding)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _save_batch(batch: dict, step: int, workdir) -> Path | None:
    if workdir is None:
        return None
    path = Path(workdir) / f"nonfinite_batch_step{step}.process{jax.process_index()}.npz"
    def host_rows(x):  # this process's rows, each batch shard once
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        shards = {s.index[0].start: np.asarray(s.data) for s in x.addressable_shards}
        return np.concatenate([shards[k] for k in sorted(shards, key=lambda i: i or 0)])

    np.savez(path, **{k: host_rows(v) for k, v in batch.items()})
    return path
