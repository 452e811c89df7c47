#!/usr/bin/env python3
"""Submit multi-node multi-GPU training to SLURM: one task per node, each seeing all its GPUs.

Renders launch/slurm_template.sbatch, writes it (atomically) into WORKDIR/slurm/ and runs
``sbatch`` on it. ``--dry-run`` prints the script and the sbatch command and writes nothing.
Every node runs the same command with ``--config.distributed.auto=True``: jax reads SLURM_*
to find process 0 and the process count. WORKDIR must be on a filesystem every node mounts.

Before anything is written or submitted, the config's training step is compiled for the
allocation's GPUs (``--gpu-type`` x ``--gpus-per-node`` x ``--nodes``; ``launch/fit_check.py``)
with the repository's environment; a config that cannot fit is refused with the check's
advice. ``--skip-fit-check`` submits anyway; ``--dry-run`` prints the check's result.

On a single host no launcher is needed: one process sees all local GPUs, so the plain
``python -m t5x_like.train ...`` command uses them all (see launch/README.md).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_command, however we start
from fit_check import check_fit, gpu_target  # noqa: E402
from train_command import REPO_ROOT, LaunchError, check_config, check_env, check_overrides, train_argv  # noqa: E402

from t5x_like import cli  # noqa: E402

TEMPLATE = Path(__file__).resolve().parent / "slurm_template.sbatch"
EXAMPLES = """\
examples:
  # 4 nodes x 8 GPUs, 12 hours; see what would be submitted, then submit
  python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --account my-lab \\
      --time 12:00:00 --cpus-per-task 64 \\
      --config configs/llama_long_context.py --workdir /shared/runs/llama_32k --dry-run \\
      -- --config.mesh.fsdp=32
  python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --account my-lab \\
      --time 12:00:00 --cpus-per-task 64 \\
      --config configs/llama_long_context.py --workdir /shared/runs/llama_32k \\
      --env NCCL_SOCKET_IFNAME=ib0 -- --config.mesh.fsdp=32
  tail -f /shared/runs/llama_32k/slurm/t5x_like-<JOBID>-node0.log
"""

# XLA GPU flags that pay off for sharded training (names checked against jaxlib 0.10.2's
# flag table; unknown names abort XLA). Latency hiding overlaps collectives with compute;
# the pipelined collectives prefetch the next scanned layer's FSDP weights / send the
# previous one's gradients while this one computes; larger combine thresholds mean fewer,
# bigger collectives.
DEFAULT_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


# ---------------------------------------------------------------- the script

def render(template: str, values: dict[str, str]) -> str:
    """Fills ``{{name}}`` placeholders; a missing or unused one is an error (a template bug)."""
    names = set(_PLACEHOLDER.findall(template))
    if names != set(values):
        raise ValueError(f"{TEMPLATE}: placeholders {sorted(names)} do not match the values "
                         f"{sorted(values)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def directives(args) -> list[str]:
    """The optional #SBATCH lines, in a stable order."""
    lines = []
    for flag, value in (("partition", args.partition), ("account", args.account),
                        ("time", args.time), ("cpus-per-task", args.cpus_per_task)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if args.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [f"#SBATCH {option}" for option in args.sbatch_option]
    return lines


def srun_options(args) -> list[str]:
    """The step options spelled out: srun does not inherit all of sbatch's in every version."""
    cpus = [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    return [f"--gpus-per-node={args.gpus_per_node}", *cpus]


def script_values(args) -> dict[str, str]:
    xla_flags = ([] if args.no_default_xla_flags else list(DEFAULT_XLA_FLAGS)) + args.xla_flag
    command = train_argv(args.python, args.config, args.workdir, args.overrides)
    return {
        "job_name": args.job_name,
        "nodes": str(args.nodes),
        "gpus_per_node": str(args.gpus_per_node),
        "log_dir": args.log_dir,
        "directives": "\n".join(directives(args)),
        "repo_dir": shlex.quote(args.repo_dir),
        "local_device_ids": ",".join(str(i) for i in range(args.gpus_per_node)),
        "mem_fraction": str(args.mem_fraction),
        "xla_flags": shlex.quote(" ".join(xla_flags)),
        "exports": "\n".join(f"export {key}={shlex.quote(value)}" for key, value in args.env),
        "srun_options": shlex.join(srun_options(args)),
        "train_command": shlex.join(command),
    }


def render_script(args) -> str:
    return render(TEMPLATE.read_text(), script_values(args))


def script_path(args) -> Path:
    return Path(args.log_dir) / f"{args.job_name}.sbatch"


def write_atomic(path: Path, text: str) -> None:
    """Readers (and a queued sbatch) never see half a script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- checks

def check_args(args, extra: list[str]) -> None:
    """Every input checked before anything is written or submitted; errors name the flag."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise LaunchError(f"{flag}={value}: must be at least 1")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task={args.cpus_per_task}: must be at least 1")
    if args.time and not _TIME.fullmatch(args.time):
        raise LaunchError(f"--time={args.time}: SLURM takes MINUTES, HH:MM:SS or D-HH:MM:SS")
    if not 0 < args.mem_fraction <= 1:
        raise LaunchError(f"--mem-fraction={args.mem_fraction}: must be in (0, 1]")
    for flag in args.xla_flag:
        if not re.fullmatch(r"--xla_\w+=\S*", flag):
            raise LaunchError(f"--xla-flag={flag}: expected --xla_NAME=VALUE")
    for option in args.sbatch_option:
        if not option.startswith("-"):
            raise LaunchError(f"--sbatch-option={option}: expected an sbatch option, "
                              "e.g. --sbatch-option=--qos=high")
    args.repo_dir = str(Path(args.repo_dir).expanduser().resolve())
    args.config = check_config(args.config, Path(args.repo_dir), inside_repo=False)
    if not args.workdir:
        raise LaunchError("--workdir is required: a directory every node mounts")
    # The path is read on the nodes, which share the filesystem with this login node.
    args.workdir = str(Path(args.workdir).expanduser().absolute())
    args.log_dir = str(Path(args.log_dir or Path(args.workdir) / "slurm").expanduser().absolute())
    for flag, value in (("--workdir", args.workdir), ("--log-dir", args.log_dir),
                        ("--job-name", args.job_name)):
        if not value or re.search(r"\s", value):
            raise LaunchError(f"{flag}={value!r}: no spaces allowed (#SBATCH lines cannot "
                              "quote them)")
    if "/" in args.python:
        python = Path(args.python)
        if not (python if python.is_absolute() else Path(args.repo_dir) / python).exists():
            raise LaunchError(f"--python={args.python}: not found under {args.repo_dir}; "
                              "create the environment with `bash scripts/env.sh` and install "
                              "the CUDA build of jax, or pass its path")
    args.env = check_env(args.env)
    args.overrides = check_overrides([item for item in extra if item != "--"])


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="slurm.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    alloc = parser.add_argument_group("allocation")
    alloc.add_argument("--nodes", type=int, required=True, help="hosts (one process each)")
    alloc.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each host")
    alloc.add_argument("--gpu-type", default="h100", choices=["h100", "h200"],
                       help="the GPUs, for the fit check (default: %(default)s)")
    alloc.add_argument("--partition", help="SLURM partition")
    alloc.add_argument("--account", help="SLURM account to charge")
    alloc.add_argument("--time", help="time limit: MINUTES, HH:MM:SS or D-HH:MM:SS")
    alloc.add_argument("--cpus-per-task", type=int,
                       help="CPU cores for each node's process (the input pipeline needs "
                            "them; many clusters give 1 by default)")
    alloc.add_argument("--exclusive", action="store_true", help="whole nodes only")
    alloc.add_argument("--job-name", default="t5x_like", help="default: %(default)s")
    alloc.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                       help="an extra #SBATCH line, e.g. --sbatch-option=--qos=high (repeatable)")

    run = parser.add_argument_group("training")
    run.add_argument("--config", required=True, help="FILE.py[:ARG], relative to --repo-dir")
    run.add_argument("--workdir", required=True,
                     help="run directory on a filesystem every node mounts")
    run.add_argument("--log-dir", help="script and logs (default: WORKDIR/slurm)")
    run.add_argument("--repo-dir", default=str(REPO_ROOT),
                     help="this repository as the nodes see it (default: %(default)s)")
    run.add_argument("--python", default=".venv/bin/python",
                     help="interpreter with a CUDA jax, relative to --repo-dir or absolute "
                          "(default: %(default)s)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="exported in the job, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)")

    xla = parser.add_argument_group("XLA")
    xla.add_argument("--xla-flag", action="append", default=[], metavar="--xla_NAME=VALUE",
                     help="an XLA flag added to the defaults (repeatable)")
    xla.add_argument("--no-default-xla-flags", action="store_true",
                     help="leave out: " + " ".join(DEFAULT_XLA_FLAGS))
    xla.add_argument("--mem-fraction", type=float, default=0.9,
                     help="XLA_PYTHON_CLIENT_MEM_FRACTION (default: %(default)s)")
    parser.add_argument("--skip-fit-check", action="store_true",
                        help="submit without compiling the step for the GPUs first")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script and the sbatch command; write and submit nothing")
    return parser


def fit_first(args) -> None:
    """The config's step must fit the allocation's GPUs (module doc)."""
    if args.skip_fit_check:
        print("[fit check] skipped (--skip-fit-check)", file=sys.stderr)
        return
    python = Path(args.python)
    if "/" in args.python and not python.is_absolute():
        python = Path(args.repo_dir) / python
    target = gpu_target(args.gpu_type, args.gpus_per_node, args.nodes)
    report = check_fit(args.config, target, args.overrides, python=str(python),
                       repo_dir=Path(args.repo_dir))
    print(report, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        check_args(args, extra)
        fit_first(args)
        script = render_script(args)
    except LaunchError as err:
        parser.error(str(err))
    path = script_path(args)
    submit = ["sbatch", str(path)]
    if args.dry_run:
        print(f"# would write {path}:")
        print(script, end="")
        print("# and run:")
        print(shlex.join(submit))
        return 0
    if args.cpus_per_task is None:
        print("note: no --cpus-per-task: many clusters then give each node's process one "
              "core, too few for the input pipeline", file=sys.stderr)
    write_atomic(path, script)
    print(f"wrote {path}", file=sys.stderr)
    try:
        code = subprocess.run(submit).returncode
    except FileNotFoundError:
        print("error: sbatch not found: run this on a SLURM login node (--dry-run shows the "
              "script without submitting)", file=sys.stderr)
        return 127
    if code != 0:
        print(f"error: {shlex.join(submit)} failed (exit code {code})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
