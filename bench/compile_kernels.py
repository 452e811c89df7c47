"""The attention kernels compiled for real chips on this host: TPU (libtpu) and H100 (ptxas).

    python bench/compile_kernels.py                    # the sweep, printed
    python bench/compile_kernels.py --record           # also the tables into bench/RESULTS.md
    python bench/compile_kernels.py --quick            # three lengths, d 128, no block sweep

For each chip (``--tpu v5e:2x2``, ``--gpu h100:1``, one device each), length (1K-128K)
and head_dim (64 / 128 / 256): the Pallas kernel's forward and backward (causal, packed
documents, GQA 8:2, bf16, default blocks) compiled by the chip's real compiler. Reported: compile seconds,
XLA's per-device temporaries, and for the GPU ptxas's registers, spill bytes and stack
frame of each kernel (forward, dq, dk/dv). Then the block sizes each chip refuses at each
head_dim (Mosaic's VMEM check on TPU; the kernel's SMEM budget or ptxas on GPU), and the
Llama-3.2-1B-shaped train step with ``attention="pallas"`` on ``v5p:2x2x1`` (fsdp 4) and
8 H100s (data 8): compile time, collectives and memory per chip (``--no-steps`` skips it).

What this proves and what not: see the README ("Compiling for the real targets").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # sibling bench modules

import jax.numpy as jnp  # noqa: E402

from t5x_like import compile_report as cr  # noqa: E402
from t5x_like import partitioning as part  # noqa: E402
from t5x_like import targets  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Kernels compiled for TPU and H100 (`bench/compile_kernels.py`)"
LENGTHS = (1024, 8192, 32768, 131072)
HEAD_DIMS = (64, 128, 256)
TPU_BLOCKS = ((256, 256), (512, 512), (1024, 1024), (2048, 2048), (4096, 4096))
GPU_BLOCKS = ((64, 64), (64, 128), (128, 128), (64, 256), (128, 256), (256, 256))


def _case(length: int, head_dim: int) -> cr.AttentionCase:
    return cr.AttentionCase(batch=1, length=length, heads=8, kv_heads=2, head_dim=head_dim,
                            segmented=True)


class Refused(Exception):
    """The compiler (or the kernel's own check) refused the configuration."""


def _compile(target, case, blocks=None) -> dict:
    """One single-device fwd+bwd compile: seconds, temporaries, ptxas figures (GPU).

    GPU compiles run in a fresh process each: Mosaic GPU caches a kernel it compiled
    before (the backward's 64-key kernels recur across forward blocks), and a cached
    kernel goes through no ptxas, so it would report no figures."""
    if target.platform == "gpu":
        return _compile_in_subprocess(target.name, case.length, case.head_dim, blocks)
    compiled, seconds = cr.attention_program(
        target, part.MeshShape(data=1), case, block_sizes=blocks, devices=1)
    return {"seconds": seconds, "temp": compiled.memory_analysis().temp_size_in_bytes,
            "ptxas": {}}


def _compile_in_subprocess(name, length, head_dim, blocks) -> dict:
    args = [sys.executable, __file__, "--one", name, str(length), str(head_dim)]
    args += [str(b) for b in blocks] if blocks else []
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"compile of {name} T={length} d={head_dim} {blocks}: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if "refused" in result:
        raise Refused(result["refused"])
    result["ptxas"] = {k: cr.PtxasFigures(**v) for k, v in result["ptxas"].items()}
    return result


def _one(argv: list[str]) -> None:
    """``--one TARGET LENGTH HEAD_DIM [BQ BK]``: one compile, one JSON line on stdout."""
    name, length, head_dim, *blocks = argv
    target = targets.get(name)
    case = _case(int(length), int(head_dim))
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    try:
        with cr.capture_output() as lines:
            compiled, seconds = cr.attention_program(
                target, part.MeshShape(data=1), case,
                block_sizes=tuple(int(b) for b in blocks) or None, devices=1)
    except Exception as err:  # a refusal is a result here
        print(json.dumps({"refused": _short(err)}))
        return
    figures = {k: vars(v) for k, v in cr.ptxas_figures(lines).items()}
    print(json.dumps({"seconds": seconds, "temp": compiled.memory_analysis().temp_size_in_bytes,
                      "ptxas": figures}))


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    for marker in ("needs", "Mosaic failed to compile TPU kernel:", "RESOURCE_EXHAUSTED", "ptxas"):
        if marker in text:
            text = text[text.index(marker):]
            break
    return text[:140].replace("|", "/")


def sweep(target, lengths, head_dims) -> str:
    gpu = target.platform == "gpu"
    head = "| length | head_dim | compile s | temporaries MiB |"
    head += " fwd regs / spill B | dq regs / spill B | dk/dv regs / spill B |" if gpu else ""
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for length in lengths:
        for d in head_dims:
            try:
                got = _compile(target, _case(length, d))
            except Exception as err:  # a refusal is a result here
                rows.append(f"| {length:,} | {d} | refused: {_short(err)} |")
                continue
            row = f"| {length:,} | {d} | {got['seconds']:.1f} | {got['temp'] / 2**20:.1f} |"
            if gpu:
                for kernel in KERNELS:
                    f = got["ptxas"].get(kernel)
                    row += " missing |" if f is None else f" {f.registers} / {f.spill_stores} |"
            rows.append(row)
            print(row, flush=True)
    return "\n".join(rows)


KERNELS = ("t5x_like_flash_fwd", "t5x_like_flash_dq", "t5x_like_flash_dkv")


def _spills(target, ptxas: dict) -> str:
    """``, spills fwd / dq / dk-dv B`` for a GPU compile that spilled (ptxas figures)."""
    if target.platform != "gpu":
        return ""
    if sorted(ptxas) != sorted(KERNELS):
        return f", ptxas reported only {sorted(ptxas)}"
    spills = [ptxas[k].spill_stores for k in KERNELS]
    return f", spill {' / '.join(map(str, spills))} B" if any(spills) else ""


def blocks(target, head_dims, length=8192) -> str:
    choices = GPU_BLOCKS if target.platform == "gpu" else TPU_BLOCKS
    rows = ["| head_dim | " + " | ".join(f"{q} x {k}" for q, k in choices) + " |",
            "|---|" + "---|" * len(choices)]
    refusals = []
    for d in head_dims:
        cells = []
        for q, k in choices:
            try:
                got = _compile(target, _case(length, d), (q, k))
                cells.append(f"ok {got['seconds']:.1f} s" + _spills(target, got["ptxas"]))
            except Exception as err:
                cells.append("refused")
                refusals.append(f"- d {d}, blocks {q} x {k}: {_short(err)}")
        rows.append(f"| {d} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return "\n".join(rows + [""] + refusals)


def one_billion_steps() -> str:
    from long_context_memory import PRESETS  # bench/long_context_memory.py: the 1B shape

    from t5x_like.train_tasks import LanguageModelTask

    model = dataclasses.replace(PRESETS["1b"], attention="pallas", dtype="bfloat16",
                                remat_policy="full", scan_layers=True,
                                max_position_embeddings=8192)
    rows = ["| target | mesh | rows x tokens | compile s | all-gathers (q/k/v-shaped) | "
            "arguments GiB | temporaries GiB | peak / HBM GiB |", "|---|---|---|---|---|---|---|---|"]
    for name, mesh, batch in (("v5p:2x2x1", {"data": 1, "fsdp": 4}, 4), ("h100:8", {"data": 8}, 8)):
        target, length = targets.get(name), 8192
        row = ((batch, length), jnp.int32)
        compiled, seconds = cr.train_step_program(
            target, part.MeshShape(**mesh), LanguageModelTask(model, loss_chunk_size=512),
            {"tokens": row, "segment_ids": row, "positions": row,
             "loss_weights": ((batch, length), jnp.float32)})
        hlo = compiled.as_text()
        gathered = cr.gathered_shapes(hlo)
        qkv = [s for s in gathered if len(s) == 4 and length in s]
        mem = targets.memory_report(compiled, target)
        layout = ",".join(f"{k}={v}" for k, v in mesh.items())
        rows.append(f"| {name} | {layout} | {batch} x {length:,} | {seconds:.0f} | "
                    f"{len(gathered)} ({len(qkv)}) | {mem['arguments_gib']:.2f} | "
                    f"{mem['temporaries_gib']:.2f} | {mem['peak_gib']:.2f} / {mem['hbm_gib']:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpu", default="v5e:2x2", help="a TPU topology (one chip is used)")
    parser.add_argument("--gpu", default="h100:1", help="h100:1 or h200:1")
    parser.add_argument("--quick", action="store_true", help="1K / 8K / 32K, d 128, no block sweep")
    parser.add_argument("--no-steps", action="store_true", help="skip the 1B train-step compiles")
    parser.add_argument("--record", action="store_true", help="write the tables to bench/RESULTS.md")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # one GPU compile (internal)
    args = parser.parse_args()
    if args.one:
        return _one(args.one)
    lengths = LENGTHS[:3] if args.quick else LENGTHS
    head_dims = (128,) if args.quick else HEAD_DIMS
    parts = []
    for name in (args.tpu, args.gpu):
        target = targets.get(name)
        print(f"== {name}: {target.device_kind}", flush=True)
        parts.append(f"### {name} ({target.device_kind}): fwd + bwd, causal, packed, GQA 8:2, bf16, "
                     f"default blocks\n\n{sweep(target, lengths, head_dims)}")
        if not args.quick:
            parts.append(f"### {name}: block sizes (q x k) at 8,192 tokens\n\n"
                         f"{blocks(target, head_dims)}")
    if not args.no_steps:
        parts.append("### Llama-3.2-1B-shaped train step, `attention=\"pallas\"`, 8,192 tokens "
                     f"a row\n\n{one_billion_steps()}")
    if args.record:
        _record("\n\n".join(parts))


def _record(body: str) -> None:
    from compiled_section import write_section  # bench/compiled_section.py

    write_section(SECTION, "bench/compile_kernels.py", body)


if __name__ == "__main__":
    main()
