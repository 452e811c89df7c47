"""Host-sharded global batches from a seqio task or mixture, deterministic and resumable.

Each process reads only its shard of the data (``seqio.ShardInfo(process_index,
process_count)``), batches ``global_batch_size / process_count`` examples, and
``jax.make_array_from_process_local_data`` assembles the global ``jax.Array``
sharded over the ``batch`` rule (mesh axes ``data`` and ``fsdp``). With
``process_sharding="batch"`` every process reads the whole stream instead and
keeps its rows of each global batch: the batches, and so the losses, are the same
for any number of processes, at the price of every process tokenizing everything. The tf.data
iterator's position (shuffle buffers included) is saved with ``save(dir)`` and
restored with ``restore(dir)``, so a resumed run sees exactly the batches it
would have seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import tensorflow as tf

from t5x_like import partitioning
from t5x_like.data import tasks

_ITERATOR_FILE = "data_iterator.process_{index}"


class GlobalBatches:
    """Iterates ``{feature: jax.Array}`` global batches (or numpy with ``mesh=None``)."""

    def __init__(self, dataset: tf.data.Dataset, global_batch_size: int, mesh=None, *,
                 rules=None, prefetch: int = 2, whole_stream: bool = False):
        """``whole_stream``: ``dataset`` is every process's same full stream; keep this
        process's rows of each global batch (else ``dataset`` is this process's shard)."""
        processes = jax.process_count()
        if global_batch_size % processes:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                             f"{processes} processes")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // processes
        self.mesh = mesh
        self.rules = rules
        self.whole_stream = whole_stream
        options = tf.data.Options()
        options.deterministic = True
        # Tokenizer py_functions are pure; their (absent) state need not be checkpointed.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        # Whole stream: every process iterates the same global batches and keeps its rows
        # in numpy, outside the tf.data graph (which its checkpoint stores), so the saved
        # state is the same whatever the process count: a run saved by N processes resumes
        # in M.
        self._rows = slice(None)
        if whole_stream:
            start = jax.process_index() * self.local_batch_size
            self._rows = slice(start, start + self.local_batch_size)
        rows_read = global_batch_size if whole_stream else self.local_batch_size
        batched = dataset.batch(rows_read, drop_remainder=True).prefetch(prefetch)
        self._iterator = iter(batched.with_options(options))
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self.batches_read = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        local = {k: v.numpy()[self._rows] for k, v in next(self._iterator).items()}
        self.batches_read += 1
        if self.mesh is None:
            return local
        return {k: self._globalize(v) for k, v in local.items()}

    def _globalize(self, x: np.ndarray) -> jax.Array:
        sharding = partitioning.batch_sharding(self.mesh, x.ndim, self.rules)
        global_shape = (self.global_batch_size,) + x.shape[1:]
        partitioning.check_divisible(global_shape, sharding.spec, self.mesh.shape, ("batch",),
                                     what="batch")
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    # ------------------------------------------------------------------ resume

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes this process's iterator state into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        prefix = directory / _ITERATOR_FILE.format(index=jax.process_index())
        self._checkpoint.write(str(prefix))
        (directory / f"{prefix.name}.json").write_text(json.dumps({"batches_read": self.batches_read}))
        return prefix

    def restore(self, directory: str | os.PathLike) -> None:
        prefix = Path(directory) / _ITERATOR_FILE.format(index=jax.process_index())
        if self.whole_stream and not Path(f"{prefix}.json").exists():
            # saved by fewer processes: every whole-stream iterator holds the same state
            prefix = Path(directory) / _ITERATOR_FILE.format(index=0)
        meta = Path(f"{prefix}.json")
        if not meta.exists():
            raise FileNotFoundError(f"{directory}: no data iterator state for process "
                                    f"{jax.process_index()} ({meta.name} missing)")
        self._checkpoint.read(str(prefix)).assert_consumed()
        self.batches_read = json.loads(meta.read_text())["batches_read"]


PROCESS_SHARDING = ("source", "batch")


def global_batches(name: str, converter: Callable, feature_lengths: dict[str, int],
                   global_batch_size: int, mesh=None, *, split: str = "train", seed: int = 0,
                   shuffle: bool = True, num_epochs: int | None = None, rules=None,
                   process_sharding: str = "source") -> GlobalBatches:
    """Batches of a registered task or mixture, converted to model features.

    ``process_sharding``: "source" (each process reads its shard) or "batch" (each
    reads everything and keeps its rows; batches independent of the process count).
    """
    if process_sharding not in PROCESS_SHARDING:
        raise ValueError(f"process_sharding={process_sharding!r} is not one of {PROCESS_SHARDING}")
    whole = process_sharding == "batch"
    ds = tasks.get_dataset(name, split=split, shuffle=shuffle, seed=seed,
                           shard_index=0 if whole else jax.process_index(),
                           num_shards=1 if whole else jax.process_count(), num_epochs=num_epochs)
    return GlobalBatches(converter(ds, feature_lengths), global_batch_size, mesh, rules=rules,
                         whole_stream=whole)
