"""The training engine: train state, one jitted step, and the loop around it.

``Trainer(task, optimizer, mesh, ...)`` builds the optimizer (``optimizers``), the
state's shardings from the partitioner's rules, and one jitted step (``in_shardings``
/ ``out_shardings`` set, state donated) that accumulates gradients over micro-batches;
a non-finite step leaves the state as it was. ``fit`` runs the loop, whose policies
are callbacks (``callbacks``): the non-finite check, the metrics window (loss,
accuracy, learning rate, gradient norm, tokens/s, MFU) to a JSONL file, TensorBoard
and a progress bar; eval hooks; preemption; and checkpoints (periodic, final, on SIGTERM).
The task is anything that keeps the ``TrainingTask`` contract (``train_tasks``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_like import callbacks as cb
from t5x_like import partitioning as part
from t5x_like.objectives.contrastive import split_chunks
from t5x_like.optimizers import OptimizerConfig, make_optimizer
from t5x_like.peak_flops import peak_flops_per_device
from t5x_like.train_tasks import batch_shapes

log = logging.getLogger(__name__)


class TrainingTask(Protocol):
    """What the trainer needs of a task (``train_tasks.DualEncoderTask`` and
    ``LanguageModelTask`` keep it)."""

    def abstract_model_params(self, rng) -> tuple[Any, Any]:
        """``(shapes, logical specs)`` of the model's parameters, nothing allocated."""

    def init_model_params(self, rng) -> Any:
        """Fresh model parameters."""

    def init_params(self, model_params, rng) -> dict:
        """The trained tree around the model's parameters (LoRA, a temperature, ...)."""

    def param_specs(self, abstract_params, model_specs) -> dict:
        """Logical specs of the trained tree."""

    def trainable_labels(self, params) -> dict:
        """``train`` / ``frozen`` per leaf (what the optimizer updates)."""

    def sums_and_grads(self, params, batch: dict, rng) -> tuple[dict, Any]:
        """Metric sums (``loss``, ``weight``, ``tokens``, ...) and the gradient of ``loss``."""

    def flops(self, params, batch_shapes: dict) -> float:
        """Model FLOPs of one step on batches of these shapes (for MFU)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data (raw, so orbax stores it as an array)


# ------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, task: TrainingTask, optimizer: OptimizerConfig, mesh, *, total_steps: int,
                 accumulation: int = 1, seed: int = 0, rules=None, on_nonfinite: str = "error",
                 peak_flops: float | None = None):
        if accumulation < 1:
            raise ValueError(f"train.accumulation={accumulation} must be >= 1")
        if on_nonfinite not in cb.ON_NONFINITE:
            raise ValueError(f"train.on_nonfinite={on_nonfinite!r} is not one of {cb.ON_NONFINITE}")
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

    def compile_step(self, abstract_batch: dict):
        """The step compiled ahead of time for ``abstract_batch`` (``jax.ShapeDtypeStruct`` s
        laid out by ``partitioner.batch_sharding``) and the abstract state: exactly the
        program ``step`` runs, for this mesh's devices, which need not be this host's."""
        with self.partitioner.scope():
            return self._step.lower(self.abstract_state, abstract_batch).compile()

    def flops_per_step(self, state: TrainState, batch: dict) -> float:
        if self._flops_per_step is None:
            self._flops_per_step = self.task.flops(state.params, batch_shapes(batch))
        return self._flops_per_step

    # ------------------------------------------------------------------- loop

    def fit(self, state: TrainState, data: Iterable[dict], *, num_steps: int | None = None,
            checkpointer=None, preemption=None, config: dict | None = None, writer=None,
            hooks: tuple[cb.EvalHook, ...] = (), log_every: int = 10, workdir: str | Path | None = None,
            show_progress: bool = True, callbacks: tuple[cb.Callback, ...] = ()) -> TrainState:
        """Trains until ``num_steps`` (default ``total_steps``) updates have been applied.

        The loop's policies are callbacks built from these arguments (the non-finite
        check, metrics window, evaluations, progress bar, preemption, checkpointing),
        then ``callbacks``, run after them in order.
        """
        from tqdm.auto import tqdm

        num_steps = self.total_steps if num_steps is None else num_steps
        start = int(jax.device_get(state.step))
        bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
                   disable=not show_progress or jax.process_index() != 0)
        policies = [cb.NonFiniteCheck(self.on_nonfinite, log_every, workdir),
                    cb.MetricsWindow(log_every, writer, bar), cb.Evaluations(hooks, writer),
                    cb.ProgressBar(bar)]
        if preemption is not None:
            policies.append(cb.Preemption(preemption))
        if checkpointer is not None:
            policies.append(cb.Checkpointing(checkpointer, config))
        policies.extend(callbacks)
        loop = cb.Loop(self, data, num_steps, step=start, state=state)
        data_iter: Iterator[dict] = iter(data)
        try:
            while loop.step < num_steps:
                loop.batch = next(data_iter)
                loop.state, loop.metrics = self.step(loop.state, loop.batch)
                loop.step += 1
                for policy in policies:
                    policy.on_step(loop)
                if loop.stop:
                    log.warning("preempted: saved step %d and stopped", loop.step)
                    break
            for policy in policies:
                policy.on_end(loop)
        finally:
            for policy in policies:
                policy.close()
        return loop.state


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


