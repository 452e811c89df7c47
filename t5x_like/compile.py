"""Will it fit? ``python -m t5x_like.compile --config=FILE[:ARG] [--target=T] [--config.a.b=V ...]``.

Compiles the training step a run with this config would jit for a target's chips
(``t5x_like.fit``) and prints per-chip memory against HBM, model TFLOPs a step and the
compile time. No weights are loaded, no data is read, no TPU or GPU is needed.

    python -m t5x_like.compile --config=configs/e5_mistral_lora.py            # its config.target
    python -m t5x_like.compile --config=configs/e5_pretrain.py:base --target=v5p:4x4x4
    python -m t5x_like.compile --config=configs/e5_finetune.py:base --target=h100:8 --hosts=2
    python -m t5x_like.compile --config=configs/e5_mistral_lora.py --find-batch --json fit.json

``--target``: a TPU topology (``v5e:4x4``, ``v5p:4x4x4``), ``h100:N`` / ``h200:N`` (N GPUs a
host; ``--hosts`` multiplies), or ``cpu``; default ``config.target``. Exit status 0 when
it fits (every stage of a staged recipe), 1 when it does not (with what would help),
2 on a usage or config error.
"""

from __future__ import annotations

import re
import sys

from absl import flags
from ml_collections import config_flags

from t5x_like import cli, config_cli, fit, paths

FLAGS = flags.FLAGS
DOES_NOT_FIT, USAGE = 1, cli.USAGE_EXIT


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "ml-collections config file[:arg].")
    flags.DEFINE_string("target", "", "v5p:4x4x4, v5e:4x4, h100:8, h200:8, cpu; default: config.target")
    flags.DEFINE_integer("hosts", 1, "GPU hosts (h100:N / h200:N name the GPUs of one host)")
    flags.DEFINE_boolean("find_batch", False, "bisect the largest global batch that fits "
                         "(--find-batch works too)")
    flags.DEFINE_string("json", "", "write the reports here as JSON")
    flags.DEFINE_float("hbm_gib", None, "the memory a chip may use (default: its HBM; cpu: "
                       "unlimited); e.g. 70 to keep 10 GiB of an H100 spare (--hbm-gib works too)")


def target_name(target: str, hosts: int) -> str:
    """``h100:8`` and ``hosts=2`` -> ``h100:16``; other targets take no hosts."""
    if hosts < 1:
        raise ValueError(f"--hosts={hosts} must be >= 1")
    if hosts == 1:
        return target
    gpus = re.fullmatch(r"(h100|h200):(\d+)", target)
    if gpus is None:
        raise ValueError(f"--hosts applies to GPU targets (h100:N, h200:N), not {target!r}; "
                         "a TPU topology names the whole slice")
    return f"{gpus.group(1)}:{int(gpus.group(2)) * hosts}"


def run(cfg, target: str, *, find_batch: bool = False, hbm_gib: float | None = None,
        out=print) -> tuple[bool, list[dict]]:
    """Checks ``cfg`` on ``target``; prints the reports; ``(fits, reports as dicts)``."""
    if find_batch:
        if cfg.stages.num > 0:
            raise ValueError("--find-batch checks one run; for a staged recipe override "
                             "config.stages.num=0 and the stage's data.length")
        out(f"bisecting the global batch on {target} (each try is a full compile)")
        best, smallest_over = fit.find_batch(
            cfg, target, hbm_gib=hbm_gib, on_report=lambda r: out(f"  batch {r.batch_size:7d}: peak "
                                                 f"{r.peak_gib:.2f} GiB ({'fits' if r.fits else 'no'})"))
        if best is None:
            out(f"not even a batch of {smallest_over} fits\n")
            return False, []
        out(best.describe())
        beyond = f"; {smallest_over} does not" if smallest_over else " (the search limit)"
        out(f"largest global batch that fits: {best.batch_size}{beyond}")
        return True, [{**best.as_dict(), "does_not_fit_from": smallest_over}]
    reports = fit.check_recipe(cfg, target, hbm_gib=hbm_gib)
    for report in reports:
        out(report.describe())
    fits = all(r.fits for r in reports)
    if not fits:
        out(f"does not fit {target}: see 'try' above (a mesh override is --config.mesh.AXIS=N)")
    return fits, [r.as_dict() for r in reports]


def main(argv) -> int:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
    cfg = FLAGS.config
    if cfg is None:
        raise ValueError("--config=FILE[:ARG] is required")
    target = FLAGS.target or cfg.get("target", "")
    if not target:
        raise ValueError("no target: pass --target=... or set config.target")
    if FLAGS.hbm_gib is not None and FLAGS.hbm_gib <= 0:
        raise ValueError(f"--hbm-gib={FLAGS.hbm_gib} must be > 0")
    fits, reports = run(cfg, target_name(target, FLAGS.hosts), find_batch=FLAGS.find_batch,
                        hbm_gib=FLAGS.hbm_gib)
    if FLAGS.json:
        paths.write_json_atomic(FLAGS.json, reports)
    return 0 if fits else DOES_NOT_FIT


def _parse(argv: list[str]) -> list[str]:
    return config_cli.parse_flags([_underscored(a) for a in argv])


def _underscored(arg: str) -> str:
    """``--find-batch`` / ``--hbm-gib=70`` as absl spells them (``--find_batch``, ...)."""
    for dashed in ("--find-batch", "--hbm-gib"):
        if arg == dashed or arg.startswith(dashed + "="):
            return "--" + dashed[2:].replace("-", "_") + arg[len(dashed):]
    return arg


def _main(argv) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    define_flags()
    cli.run_absl(_main, _parse)
