"""Checkpoints with orbax: train state, data-iterator position and the resolved config.

Each step directory holds three items:

* ``state``: params, optimizer state, step and RNG (``StandardSave``; restored
  onto the shardings of an abstract state, so a run saved on one mesh layout
  resumes on another);
* ``data``: each process's data-iterator position (anything with
  ``save(dir)`` / ``restore(dir)``, e.g. ``data.pipeline.GlobalBatches``);
* ``config``: the resolved experiment config as JSON.

Saves are asynchronous (the next steps run while arrays are written) and
atomic (orbax writes a temporary directory and renames it), so a crash
mid-save never leaves a step that looks complete. A step damaged afterwards
(a truncated or deleted file) is passed over on resume by
``restore_latest_readable``, which moves it aside, never deleting it. ``PreemptionWatcher`` turns
SIGTERM into a request to save and stop at the next step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


# ------------------------------------------------------------ data iterator item


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves / restores an iterator exposing ``save(directory)`` / ``restore(directory)``.

    Every process writes its own file into the shared step directory.
    """

    def save(self, directory, args: "DataIteratorSave"):
        args.iterator.save(Path(directory))

    def restore(self, directory, args: "DataIteratorRestore | None" = None):
        if args is None or args.iterator is None:  # restoring other items only
            return None
        args.iterator.restore(Path(directory))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any = None


def _resumable(data) -> bool:
    return data is not None and hasattr(data, "save") and hasattr(data, "restore")


# ------------------------------------------------------------------ checkpointer


class CheckpointUnreadable(RuntimeError):
    """No checkpoint of a run can be restored; the message says which, why and what to do."""


@contextlib.contextmanager
def _unraisable_to_debug_log():
    """A failed orbax read leaves sibling read coroutines whose errors nobody awaits;
    Python prints each as "Exception ignored in ..." with a traceback when they are
    collected. The failure is already reported once, so they go to the debug log."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: log.debug("after a failed read: %s", info.exc_value)
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _first_line(error: BaseException) -> str:
    """The root cause's first line: orbax wraps TensorStore's own (``OUT_OF_RANGE: ...``)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
    """Keeps the newest ``max_to_keep`` checkpoints of a run under ``directory``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3,
                 save_every: int = 1000, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"checkpoint save_every={save_every} must be >= 1")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, *, data=None, config: dict | None = None,
             force: bool = False) -> bool:
        """Saves at multiples of ``save_every`` (or always with ``force``); returns
        whether a save started. The data iterator must sit right after ``step``'s batch."""
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if _resumable(data):
            items["data"] = DataIteratorSave(data)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, *, data=None, step: int | None = None):
        """The state at ``step`` (default: the latest) placed on ``abstract_state``'s
        shardings; moves ``data`` to where that step left it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; "
                                    f"have {self.all_steps()}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        saved_items = self._item_names(step)
        if _resumable(data):
            if "data" not in saved_items:
                raise FileNotFoundError(
                    f"{self.directory}/{step}: this checkpoint has no data-iterator state; "
                    "the run that wrote it read data that cannot resume")
            items["data"] = DataIteratorRestore(data)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_readable(self, abstract_state, *, data=None):
        """``(state, step)`` from the newest step that restores.

        Newer steps that fail to read (a truncated or missing file) are logged and moved
        to ``<directory>.unreadable/`` once an older one has restored, so the next save
        does not stack on them; nothing is deleted. When no step restores, nothing is
        moved (the cause may be the run, not the files) and ``CheckpointUnreadable``
        names every step and its error."""
        failures: list[tuple[int, BaseException]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                with _unraisable_to_debug_log():
                    state = self.restore(abstract_state, data=data, step=step)
            except Exception as e:  # tensorstore, orbax and OS errors alike
                log.warning("%s/%d cannot be read (%s); trying the previous checkpoint",
                            self.directory, step, _first_line(e))
                failures.append((step, e))
                continue
            for bad, error in failures:
                moved = self._move_aside(bad)
                log.warning("resuming from step %d: step %d could not be read (%s); moved it to %s",
                            step, bad, _first_line(error), moved)
            return state, step
        steps = "; ".join(f"step {step}: {_first_line(e)}" for step, e in failures)
        raise CheckpointUnreadable(
            f"no checkpoint in {self.directory} can be restored ({steps}). Nothing was moved or "
            "deleted. If the files are damaged, move those step directories out of "
            f"{self.directory} (the run then starts afresh) or use a new --workdir; if the model "
            "changed since they were written, resume with the config stored beside them "
            f"({self.directory.parent / 'config.json'}).")

    def _move_aside(self, step: int) -> Path:
        """``directory/step`` into ``directory.unreadable/`` (a new name if taken)."""
        target_dir = self.directory.with_name(self.directory.name + ".unreadable")
        target = target_dir / str(step)
        if jax.process_index() == 0:
            target_dir.mkdir(exist_ok=True)
            suffix = 1
            while target.exists():
                target, suffix = target_dir / f"{step}.{suffix}", suffix + 1
            shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
        return target

    def stored_config(self) -> tuple[int, dict] | None:
        """``(step, config)`` of the newest step whose config item reads, or None."""
        for step in sorted(self.all_steps(), reverse=True):
            if "config" not in self._item_names(step):
                continue
            try:
                with _unraisable_to_debug_log():
                    return step, self.restore_config(step)
            except Exception as e:  # a damaged step: restore_latest_readable reports it
                log.debug("%s/%d: config unreadable (%s)", self.directory, step, _first_line(e))
        return None

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def _item_names(self, step: int) -> set[str]:
        step_dir = self.directory / str(step)
        return {p.name for p in step_dir.iterdir() if p.is_dir()} if step_dir.exists() else set()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# -------------------------------------------------------------------- preemption


class PreemptionWatcher:
    """Notes SIGTERM (a Cloud TPU / Kubernetes preemption notice) so the loop can
    save at the next step boundary and exit cleanly.

    With several processes every one must stop at the same step: jax's
    preemption sync point (enabled by ``jax.distributed.initialize``) decides.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                log.warning("PreemptionWatcher: cannot install a handler for %s outside the main "
                            "thread; preemption saves are off", sig)

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint at the next step boundary", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service: each process trusts its own signal
                return self.requested
        return self.requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
