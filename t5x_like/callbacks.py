"""The training loop's policies, each a callback: what happens around a step, not the step.

``Trainer.fit`` runs the step and then, in order, every callback's ``on_step(loop)``:

- ``NonFiniteCheck``: a non-finite loss or gradient norm is an error, or a warning with
  ``on_nonfinite="skip"`` (the step itself already left the state as it was); checked
  one step late so the host does not wait on the device, at once on logging steps;
- ``MetricsWindow``: mean metrics, tokens/s and MFU over the steps since the last log
  line, to the progress bar and the metrics writer;
- ``Evaluations``: each ``EvalHook`` every ``every`` steps and after the last;
- ``ProgressBar``;
- ``Preemption``: asks the watcher (SIGTERM / a preemption notice) whether to stop;
- ``Checkpointing``: the checkpointer's cadence, forced on the last step and on a stop.

``Loop`` is what they see and share: the step, the state, the step's metrics and batch,
and ``stop``, which ends the loop after this step's callbacks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

log = logging.getLogger(__name__)
ON_NONFINITE = ("error", "skip")


@dataclasses.dataclass
class Loop:
    """The loop as callbacks see it after a step."""

    trainer: Any
    data: Iterable[dict]
    num_steps: int
    step: int = 0
    state: Any = None
    metrics: dict | None = None
    batch: dict | None = None
    stop: bool = False  # set by a callback: end the loop after this step

    @property
    def last(self) -> bool:
        return self.step == self.num_steps


class Callback:
    """A loop policy: ``on_step`` after every step, ``on_end`` when the loop ends normally
    (not on an exception), ``close`` always."""

    def on_step(self, loop: Loop) -> None:
        pass

    def on_end(self, loop: Loop) -> None:
        pass

    def close(self) -> None:
        pass


@dataclasses.dataclass
class EvalHook:
    """``fn(state) -> {metric: value}`` run every ``every`` steps and after the last."""

    name: str
    every: int
    fn: Callable[[Any], dict[str, float]]
    last: dict[str, float] = dataclasses.field(default_factory=dict)  # the latest results

    def __call__(self, state) -> dict[str, float]:
        self.last = {k: float(v) for k, v in self.fn(state).items()}
        return self.last


class NonFiniteCheck(Callback):
    def __init__(self, policy: str = "error", every: int = 10, workdir: str | Path | None = None):
        if policy not in ON_NONFINITE:
            raise ValueError(f"train.on_nonfinite={policy!r} is not one of {ON_NONFINITE}")
        self.policy, self.every, self.workdir = policy, every, workdir
        self.pending: tuple[int, dict, dict] | None = None  # (step, metrics, batch) unchecked

    def on_step(self, loop: Loop) -> None:
        if self.pending is not None:
            self._check(*self.pending, loop.data)
        self.pending = (loop.step, loop.metrics, loop.batch)
        if loop.step % self.every == 0 or loop.last:  # before the metrics are logged
            self._check(*self.pending, loop.data)
            self.pending = None

    def on_end(self, loop: Loop) -> None:
        if self.pending is not None:
            self._check(*self.pending, loop.data)
            self.pending = None

    def _check(self, step: int, metrics: dict, batch: dict, data) -> None:
        if bool(jax.device_get(metrics["finite"])):
            return
        values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}
        where = save_batch(batch, step, self.workdir)
        position = getattr(data, "batches_read", None)
        message = (f"step {step}: non-finite loss {values['loss']} / gradient norm "
                   f"{values['grad_norm']}; the update was skipped. Batch: "
                   f"{ {k: tuple(v.shape) for k, v in batch.items()} }"
                   + (f", saved to {where}" if where else "")
                   + (f"; data iterator had read {position} batches after it" if position else ""))
        if self.policy == "error":
            raise FloatingPointError(message + ". Set train.on_nonfinite=skip to continue past such steps.")
        log.warning(message)


class MetricsWindow(Callback):
    """Metrics of the steps since the last log line (fetched from the device only then)."""

    def __init__(self, every: int = 10, writer=None, bar=None):
        self.every, self.writer, self.bar = every, writer, bar
        self.pending: list[dict] = []
        self.since = time.perf_counter()

    def on_step(self, loop: Loop) -> None:
        self.pending.append(loop.metrics)
        if loop.step % self.every and not loop.last:
            return
        trainer = loop.trainer
        logged = self.summary(trainer.flops_per_step(loop.state, loop.batch), trainer.peak_flops,
                              jax.device_count())
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['learning_rate']:.2e}")
        if self.writer is not None:
            self.writer.write(loop.step, logged)

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


class Evaluations(Callback):
    def __init__(self, hooks: tuple[EvalHook, ...] = (), writer=None):
        self.hooks, self.writer = hooks, writer

    def on_step(self, loop: Loop) -> None:
        for hook in self.hooks:
            if loop.step % hook.every == 0 or loop.last:
                results = {f"{hook.name}/{k}": v for k, v in hook(loop.state).items()}
                log.info("step %d %s", loop.step, results)
                if self.writer is not None:
                    self.writer.write(loop.step, results)


class ProgressBar(Callback):
    def __init__(self, bar):
        self.bar = bar

    def on_step(self, loop: Loop) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Preemption(Callback):
    def __init__(self, watcher):
        self.watcher = watcher

    def on_step(self, loop: Loop) -> None:
        if self.watcher.should_stop(loop.step):
            loop.stop = True


class Checkpointing(Callback):
    """Saves on the checkpointer's cadence; always on the last step and on a stop."""

    def __init__(self, checkpointer, config: dict | None = None):
        self.checkpointer, self.config = checkpointer, config

    def on_step(self, loop: Loop) -> None:
        self.checkpointer.save(loop.step, loop.state, data=loop.data, config=self.config,
                               force=loop.stop or loop.last)

    def close(self) -> None:
        self.checkpointer.wait()


def save_batch(batch: dict, step: int, workdir) -> Path | None:
    """This process's rows of a batch, to ``WORKDIR/nonfinite_batch_step{step}.process{i}.npz``."""
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
