"""Two real processes (jax.distributed on 127.0.0.1, gloo CPU collectives, 4 simulated
devices each) train the tiny contrastive config through the CLI, the global batch split
between them: the losses equal one process over 8 devices, the checkpoint is written
once, and a single process resumes from it to the same final parameters.

Every run is a fresh CLI process, as users launch them: the reference is not trained
inside pytest, whose earlier tests leave JAX, TensorFlow and seqio state behind."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_like import checkpoints
from t5x_like.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = "configs/e5_finetune.py:tiny"  # BM25 hard negatives, dropout, AdamW: 3 steps of 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(workdir: pathlib.Path, processes: int, process_id: int, port: int, *overrides: str):
    """One ``t5x_like.train`` process of ``processes``, the 8 CPU devices split between them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
               JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=str(ROOT))
    distributed = [] if processes == 1 else [
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={processes}",
        f"--config.distributed.process_id={process_id}"]
    return subprocess.Popen(
        [sys.executable, "-m", "t5x_like.train", f"--config={SPEC}", f"--workdir={workdir}",
         *distributed, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def run(workdir: pathlib.Path, processes: int, *overrides: str) -> list[str]:
    """Runs the CLI in ``processes`` processes to the end; their outputs."""
    port = free_port()
    procs = [cli(workdir, processes, i, port, *overrides) for i in range(processes)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=420)
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    return outputs


def losses(workdir: pathlib.Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def saved_params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    restored = checkpoints.Checkpointer(workdir / "checkpoints").manager.restore(step)
    return jax.tree.leaves(restored["state"]["params"])


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_single_process_resumes(tmp_path):
    single = tmp_path / "single"
    run(single, 1)

    two = tmp_path / "two"
    outputs = run(two, 2, "--config.train.stop_after=2")
    assert "Mesh(data=8, fsdp=1, tensor=1, sequence=1) over 8 x cpu" in outputs[0]
    np.testing.assert_allclose(losses(two), losses(single)[:2], rtol=1e-5)

    # Written once: one step directory holding each item once, both processes' data
    # positions in it, no leftover temporary directories.
    ckpt_dir = two / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2"]
    assert sorted(p.name for p in (ckpt_dir / "2").iterdir() if p.is_dir()) == ["config", "data",
                                                                                 "state"]
    iterators = sorted(p.name for p in (ckpt_dir / "2" / "data").glob("*.json"))
    assert iterators == ["data_iterator.process_0.json", "data_iterator.process_1.json"]
    assert len(read_jsonl(two / "metrics.jsonl")) == len(read_jsonl(single / "metrics.jsonl")) - 1

    # One process over 8 devices resumes the 2-process checkpoint (parameters, optimizer,
    # RNG and the data position) and lands where the single run did.
    run(two, 1)
    assert json.loads((two / "results.json").read_text())["completed"]
    np.testing.assert_allclose(losses(two), losses(single), rtol=1e-5)
    for a, b in zip(saved_params(two, 3), saved_params(single, 3), strict=True):
        # Adam amplifies reduction-order noise in tiny second moments: 1e-5 is 1% of a step.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
