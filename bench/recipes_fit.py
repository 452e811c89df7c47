"""Every shipped recipe, at full scale, compiled for the slices it names: the fit table.

    python bench/recipes_fit.py                    # print the tables
    python bench/recipes_fit.py --record           # and write them to bench/RESULTS.md
    python bench/recipes_fit.py --only e5_mistral  # recipes whose name contains this
    python bench/recipes_fit.py --no-largest       # skip the largest-batch / row-length table

Each row is ``t5x_like.fit.check`` (what ``python -m t5x_like.compile`` prints): the
training step the recipe's run would jit, compiled by the chip's compiler on this host,
with per-chip peak against HBM. The second table bisects the largest global batch (or,
for the long-context recipe, the longest row at one row a chip) on v5e-16 and 8 x H100.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from t5x_like import config_cli, fit, targets  # noqa: E402

SECTION = "## Will it fit? Every recipe on its slices (`bench/recipes_fit.py`)"
# name, config spec, the slices to check: the recipe's config.target first.
RECIPES = [
    ("e5_pretrain:small", "configs/e5_pretrain.py:small", ("v5p:2x2x2", "h100:8")),
    ("e5_pretrain:base", "configs/e5_pretrain.py:base", ("v5p:2x2x2", "h100:8")),
    ("e5_pretrain:large", "configs/e5_pretrain.py:large", ("v5p:2x2x2", "h100:8")),
    ("e5_finetune:small", "configs/e5_finetune.py:small", ("h100:8", "v5e:2x4")),
    ("e5_finetune:base", "configs/e5_finetune.py:base", ("h100:8", "v5e:2x4")),
    ("e5_finetune:large", "configs/e5_finetune.py:large", ("h100:8", "v5e:2x4")),
    ("e5_mistral_lora", "configs/e5_mistral_lora.py", ("h100:8", "v5p:2x2x2")),
    ("llama_long_context", "configs/llama_long_context.py", ("h100:8", "v5p:2x2x2")),
    ("long_context_demo:pretrain", "configs/long_context_demo.py:pretrain", ("cpu",)),
    ("long_context_demo:extend", "configs/long_context_demo.py:extend", ("cpu",)),
    ("minilm_scifact (main job)", "configs/minilm_scifact.py", ("cpu",)),
]
# The largest batch (or row) on common slices: v5e-16 and 8 x H100.
LARGEST = [
    ("e5_mistral_lora", "configs/e5_mistral_lora.py", "batch", ("v5e:4x4", "h100:8")),
    ("llama_long_context stage 0", "configs/llama_long_context.py", "length", ("h100:8",)),
]


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def fit_table(only: str) -> tuple[str, list[dict]]:
    rows, raw = [], []
    header = ("| recipe | target | mesh | global batch x rows | per-chip peak GiB / HBM | headroom GiB "
              "| params + opt GiB | model TFLOPs a step | compile s | fits |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    for name, spec, slices in RECIPES:
        if only not in name:
            continue
        for target in slices:
            cfg = config_cli.load_config_file(spec)
            try:
                reports = fit.check_recipe(cfg, target)
            except Exception as err:  # a row that cannot be checked is a row, not a crash
                print(f"{name} on {target}: {type(err).__name__}: {err}", flush=True)
                rows.append(f"| {name} | `{target}` | - | - | - | - | - | - | - | error: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:120]} |")
                raw.append({"recipe": name, "target": target, "error": str(err)})
                continue
            for report in reports:
                print(report.describe(), flush=True)
                label = name + (f" {report.stage}" if report.stage else "")
                mesh = ", ".join(f"{k}={v}" for k, v in report.mesh.items() if v > 1) or "1 device"
                rows.append(
                    f"| {label} | `{target}` | {mesh} | {report.batch_size} x {report.row} "
                    f"| {report.peak_gib:.1f} / {gib(report.hbm_gib)} | {gib(report.headroom_gib)} "
                    f"| {report.parameters_gib + report.optimizer_gib:.1f} | {report.model_tflops:,.0f} "
                    f"| {report.compile_seconds:.0f} | {'yes' if report.fits else '**no**'} |")
                raw.append({"recipe": name, **report.as_dict()})
    return header + "\n" + "\n".join(rows), raw


def _one_row_a_chip(cfg, target: str):
    """Stage 0 of a staged recipe as a plain run with one row a batch shard."""
    from t5x_like import partitioning as part

    c = cfg.copy_and_resolve_references()
    c.stages.num = 0
    mesh = targets.get(target).mesh(part.MeshShape.from_config(c.mesh))
    c.train.batch_size = part.Partitioner(mesh, part.current_rules()).batch_shards
    c.train.accumulation = 1
    return c


def largest_table(only: str) -> tuple[str, list[dict]]:
    header = ("| recipe | slice | mesh | searched | largest that fits | peak GiB / HBM | next size up |\n"
              "|---|---|---|---|---|---|---|")
    rows, raw = [], []
    for name, spec, what, slices in LARGEST:
        if only not in name:
            continue
        for target in slices:
            cfg = config_cli.load_config_file(spec)
            log = lambda r: print(f"  {name} {target}: {r.batch_size} x {r.row}: {r.peak_gib:.1f} GiB",  # noqa: E731
                                  flush=True)
            if what == "batch":
                best, over = fit.find_batch(cfg, target, on_report=log)
                searched = "global batch"
                value = lambda r: str(r.batch_size)  # noqa: E731
            else:
                cfg = _one_row_a_chip(cfg, target)
                best, over = fit.find_length(cfg, target, on_report=log)
                searched = f"row tokens at {cfg.train.batch_size} rows"
                value = lambda r: r.row  # noqa: E731
            mesh = "-" if best is None else (
                ", ".join(f"{k}={v}" for k, v in best.mesh.items() if v > 1) or "1 device")
            rows.append(f"| {name} | `{target}` | {mesh} | {searched} "
                        f"| {'none' if best is None else value(best)} "
                        f"| {'-' if best is None else f'{best.peak_gib:.1f} / {gib(best.hbm_gib)}'} "
                        f"| {over if over else 'beyond the search limit'} |")
            raw.append({"recipe": name, "slice": target, "searched": searched,
                        "best": None if best is None else best.as_dict(), "does_not_fit_from": over})
    return header + "\n" + "\n".join(rows), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the tables to bench/RESULTS.md")
    parser.add_argument("--only", default="", help="recipes whose name contains this")
    parser.add_argument("--no-largest", action="store_true", help="skip the largest-batch table")
    parser.add_argument("--json", default="", help="also write every report here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # config files import configs.base
    table, raw = fit_table(args.only)
    parts = ["### Each recipe at its published scale\n\n" + table]
    if not args.no_largest:
        largest, raw_largest = largest_table(args.only)
        parts.append("### The largest that fits on common slices\n\n" + largest)
        raw += raw_largest
    print("\n\n".join(parts))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    if args.record:
        from compiled_section import write_section

        write_section(SECTION, "bench/recipes_fit.py", "\n\n".join(parts) + "\n\n" + READING)


READING = """How to read it: *peak* is XLA's `memory_analysis()` of the compiled step per chip
(arguments + outputs - aliased + temporaries); *headroom* is HBM minus that. A GPU compile
leaves cuDNN's workspace and the allocator's fragmentation out, so keep a few GiB spare there.
*model TFLOPs* count the step's matmuls from the shapes (no remat recompute; a frozen LoRA
base has no weight gradients; gradient caching adds one forward). The recipes run with fsdp
over every chip (`mesh.fsdp=-1`), scanned layers and bf16 compute; the decoders also with full
remat. The E5-mistral base is frozen in bf16 with LoRA applied unmerged."""


if __name__ == "__main__":
    main()
