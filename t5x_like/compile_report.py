"""What a real compile for a target says: collectives, kernel calls, ptxas figures.

Helpers over ``jax.jit(...).lower(...).compile()`` for a ``t5x_like.targets`` target,
used by the compile tests and ``bench/compile_kernels.py``:

* :func:`collectives` counts the communication ops of the compiled HLO (an
  ``all-gather`` of q / k / v around a kernel means it was not sharded);
* :func:`kernel_calls` lists the attention kernels' custom calls (Mosaic TPU, Mosaic
  GPU, cuDNN) with the shapes each device's call produces;
* :func:`capture_output` and :func:`ptxas_figures` read ptxas's register and spill
  report for the Mosaic GPU kernels (``MOSAIC_GPU_DUMP_PTXAS=1``);
* :func:`attention_program` compiles one attention call (forward, or forward and
  backward) for a target and mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from t5x_like import partitioning, targets
from t5x_like.kernels.attention import dot_product_attention

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Custom-call targets of the attention kernels, by backend.
KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu_v2", "mosaic_gpu", "__cudnn$fmha")


def collectives(hlo: str) -> dict[str, int]:
    """How many of each collective the HLO text holds (async pairs count once)."""
    counts = {}
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
    return counts


def gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The result shape of every all-gather in the HLO text (FSDP gathers parameters;
    an activation-shaped one around attention means a kernel was not sharded)."""
    shapes = []
    for line in hlo.splitlines():
        found = re.search(r"= (.*?) all-gather(-start)?\(", line)
        if not found:
            continue
        dims = [tuple(int(n) for n in d.split(",") if n)
                for d in re.findall(r"[a-z]+\d*\[([\d,]*)\]", found.group(1))]
        # An async start's result is (operands, results): keep the second half.
        shapes.extend(dims[len(dims) // 2:] if found.group(2) else dims)
    return shapes


@dataclasses.dataclass(frozen=True)
class KernelCall:
    name: str  # t5x_like_flash_fwd / _dq / _dkv, or the cuDNN target
    target: str  # the custom-call target
    shapes: tuple[tuple[int, ...], ...]  # the call's outputs, per device


def kernel_calls(hlo: str) -> list[KernelCall]:
    """The attention kernels' custom calls in a compiled module's HLO text."""
    calls = []
    for line in hlo.splitlines():
        if " custom-call(" not in line:
            continue
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target is None or not target.group(1).startswith(KERNEL_TARGETS):
            continue
        named = re.search(r"t5x_like_flash_\w+?(?=_mosaic|\W)", line)
        result = line.split(" custom-call(", 1)[0].split("=", 1)[1]
        shapes = tuple(
            tuple(int(n) for n in dims.split(",") if n)
            for dims in re.findall(r"(?:bf16|f16|f32|s32|u8)\[([\d,]*)\]", result)
        )
        name = named.group(0) if named else target.group(1)
        calls.append(KernelCall(name, target.group(1), shapes))
    return calls


@contextlib.contextmanager
def capture_output() -> Iterator[list[str]]:
    """Collects what this process and its children (ptxas reports on stdout) write to
    file descriptors 1 and 2 meanwhile; the lines are there once the block exits."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            lines.extend(sink.read().splitlines())


@dataclasses.dataclass(frozen=True)
class PtxasFigures:
    registers: int
    spill_stores: int  # bytes
    spill_loads: int
    stack_frame: int


def ptxas_figures(lines: list[str]) -> dict[str, PtxasFigures]:
    """``{kernel entry: figures}`` from ptxas's ``-v`` report (last compile of each)."""
    figures, entry, frame = {}, None, (0, 0, 0)
    for line in lines:
        started = re.search(r"Compiling entry function '(\w+)'", line)
        if started:
            entry = started.group(1).removesuffix("_mosaic_gpu_kernel")
            continue
        props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if props:
            frame = tuple(int(x) for x in props.groups())
            continue
        used = re.search(r"Used (\d+) registers", line)
        if used and entry is not None:
            figures[entry] = PtxasFigures(int(used.group(1)), frame[1], frame[2], frame[0])
            entry = None
    return figures


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One attention call's shape; ``batch`` and heads are global (before sharding)."""

    batch: int
    length: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    segmented: bool = False
    dtype: Any = jnp.bfloat16
    kv_length: int | None = None  # None: self-attention
    sliding_window: int | None = None

    def label(self) -> str:
        kv = "" if self.kv_length is None else f"-kv{self.kv_length}"
        gqa = f"-gqa{self.heads}:{self.kv_heads}" if self.heads != self.kv_heads else ""
        window = "" if self.sliding_window is None else f"-window{self.sliding_window}"
        dtype = "" if self.dtype == jnp.bfloat16 else f"-{jnp.dtype(self.dtype).name}"
        return (f"T{self.length}{kv}-d{self.head_dim}{gqa}"
                f"{'-causal' if self.causal else '-bidir'}{'-packed' if self.segmented else ''}"
                f"{window}{dtype}")


def attention_program(
    target: targets.Target,
    mesh_shape: partitioning.MeshShape,
    case: AttentionCase,
    implementation: str = "pallas",
    backward: bool = True,
    block_sizes: tuple[int, int] | None = None,
    devices: int | None = None,
) -> tuple[Any, float]:
    """Compiles one attention call (and its gradient) for ``target``; returns the
    compiled program and the seconds the compile took. The operands are laid out
    by the default logical rules (batch over data / fsdp, heads over tensor).
    ``devices``: use only the target's first ``devices`` (one chip of a slice)."""
    if devices is not None:
        target = dataclasses.replace(target, devices=target.devices[:devices])
    mesh = target.mesh(mesh_shape)
    qkv = partitioning.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    ids = partitioning.logical_to_mesh_axes(("batch", "length"))
    kv_len = case.kv_length or case.length

    def struct(shape, spec, dtype=case.dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    q = struct((case.batch, case.length, case.heads, case.head_dim), qkv)
    kv = struct((case.batch, kv_len, case.kv_heads, case.head_dim), qkv)
    seg = kv_seg = None
    if case.segmented:
        seg = struct((case.batch, case.length), ids, jnp.int32)
        kv_seg = struct((case.batch, kv_len), ids, jnp.int32)

    def attend(q, k, v, seg, kv_seg):
        return dot_product_attention(
            q, k, v, causal=case.causal, segment_ids=seg, kv_segment_ids=kv_seg,
            implementation=implementation, block_sizes=block_sizes,
            sliding_window=case.sliding_window,
        )

    if backward:
        def program(q, k, v, seg, kv_seg):
            loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, kv_seg).astype(jnp.float32))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    else:
        program = attend
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = jax.jit(program).trace(q, kv, kv, seg, kv_seg).lower().compile()
    return compiled, time.perf_counter() - start


__all__ = [
    "AttentionCase",
    "KernelCall",
    "PtxasFigures",
    "attention_program",
    "capture_output",
    "collectives",
    "gathered_shapes",
    "kernel_calls",
    "ptxas_figures",
    "train_step_program",
]


def train_step_program(
    target: targets.Target,
    mesh_shape: partitioning.MeshShape,
    task: Any,
    batch: dict[str, tuple[tuple[int, ...], Any]],
) -> tuple[Any, float]:
    """Compiles the trainer's whole jitted step (forward, backward, optimizer update)
    for ``target`` without allocating anything: ``batch`` maps each input to its
    global ``(shape, dtype)``, laid out as the trainer's input batches (``batch``
    over data / fsdp). Returns the compiled step and the compile's seconds."""
    from t5x_like.optimizers import OptimizerConfig  # noqa: PLC0415  (the run layer)
    from t5x_like.trainer import Trainer  # noqa: PLC0415

    mesh = target.mesh(mesh_shape)
    trainer = Trainer(task, OptimizerConfig(), mesh, total_steps=10)
    structs = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.partitioner.batch_sharding(len(shape)))
        for name, (shape, dtype) in batch.items()
    }
    start = time.perf_counter()
    compiled = trainer.compile_step(structs)
    return compiled, time.perf_counter() - start
