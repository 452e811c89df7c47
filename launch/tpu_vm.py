#!/usr/bin/env python3
"""Train on a Cloud TPU VM (one host or a multi-host pod slice) with ``gcloud``.

Every step is a command on this machine (git/tar, or ``gcloud compute tpus tpu-vm``);
``--dry-run`` prints them, one a line, ready to paste, and runs nothing. Without it they run
in order and the first failure stops the launcher, naming the command.

On a pod slice every worker runs the same training command with
``--config.distributed.auto=True`` (jax finds the other workers itself), so ``--workdir`` must
be an absolute path on a filesystem all workers mount (Filestore / NFS / a gcsfuse mount).

``create`` (given ``--config``) and ``up`` first check that the config's training step fits
the slice: ``--accelerator-type`` maps to its topology and ``python -m t5x_like.compile``
compiles the step for it here (``launch/fit_check.py``). A config that cannot fit is refused
before any gcloud command, with the check's advice; ``--skip-fit-check`` launches anyway.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_command, however we start
from fit_check import check_fit, tpu_target  # noqa: E402
from train_command import (  # noqa: E402
    REPO_ROOT,
    LaunchError,
    check_config,
    check_env,
    check_overrides,
    check_remote_workdir,
    read_pinned,
    train_argv,
)

from t5x_like import cli  # noqa: E402

EXAMPLES = """\
examples:
  # everything in one go: create a v5e slice of 16 chips, copy, install, start training
  python launch/tpu_vm.py up --name e5-tpu --zone us-west4-a \\
      --accelerator-type v5litepod-16 --spot \\
      --config configs/e5_finetune.py:base --workdir /mnt/shared/runs/e5_base \\
      -- --config.train.batch_size=1024 --config.mesh.fsdp=16
  python launch/tpu_vm.py logs --name e5-tpu --zone us-west4-a --follow
  python launch/tpu_vm.py stop --name e5-tpu --zone us-west4-a      # SIGTERM: saves a checkpoint
  python launch/tpu_vm.py delete --name e5-tpu --zone us-west4-a

  # or step by step; add --dry-run to any of them to see the gcloud commands
  python launch/tpu_vm.py create --name e5-tpu --zone us-central2-b --accelerator-type v4-32
  python launch/tpu_vm.py copy --name e5-tpu --zone us-central2-b
  python launch/tpu_vm.py install --name e5-tpu --zone us-central2-b
  python launch/tpu_vm.py run --name e5-tpu --zone us-central2-b \\
      --config configs/e5_finetune.py:base --workdir /mnt/shared/runs/e5_base \\
      --env TF_CPP_MIN_LOG_LEVEL=2 -- --config.train.batch_size=1024
"""

# Runtime (software) version for each accelerator family: cloud.google.com/tpu/docs/runtimes.
RUNTIMES = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ACCELERATOR = re.compile(r"v\d+[a-z]*-\d+")
_WORKERS = re.compile(r"all|\d+(-\d+)?(,\d+(-\d+)?)*")
LOG = "logs/train.log"
PID = "logs/train.pid"
REMOTE_ARCHIVE = "t5x_like-src.tar.gz"


# ---------------------------------------------------------------- gcloud commands

def gcloud(verb: str, args, *positional: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def ssh(args, script: list[str], worker: str = "all") -> list[str]:
    """Runs the shell lines ``script`` (joined with ``; `` under ``set -e``) on workers."""
    return gcloud("ssh", args, args.name) + [f"--worker={worker}",
                                             "--command=" + "; ".join(["set -e", *script])]


def create_commands(args) -> list[list[str]]:
    cmd = gcloud("create", args, args.name) + [f"--accelerator-type={args.accelerator_type}",
                                               f"--version={runtime_version(args)}"]
    if args.spot:
        cmd.append("--spot")
    if args.preemptible:
        cmd.append("--preemptible")
    return [cmd]


def copy_commands(args) -> list[list[str]]:
    """Tracked files (as they are on disk) -> a tarball -> every worker's ``--remote-dir``."""
    archive = local_archive(args.name)
    pack = (f"set -o pipefail; git -C {shlex.quote(str(REPO_ROOT))} ls-files -z | "
            f"tar -C {shlex.quote(str(REPO_ROOT))} -czf {shlex.quote(str(archive))} --null -T -")
    remote = shlex.quote(args.remote_dir)
    unpack = [f"mkdir -p {remote}", f"tar -xzf {REMOTE_ARCHIVE} -C {remote}",
              f"rm -f {REMOTE_ARCHIVE}"]
    return [["bash", "-c", pack],
            gcloud("scp", args, str(archive), f"{args.name}:{REMOTE_ARCHIVE}") + ["--worker=all"],
            ssh(args, unpack),
            ["rm", "-f", str(archive)]]


def install_commands(args) -> list[list[str]]:
    """scripts/env.sh (venv + pinned requirements), then the TPU build of the pinned jax."""
    jax_version = args.jax_version or read_pinned("jax")
    # jax 0.10 needs Python >= 3.11; the TPU runtime images (Ubuntu 22.04) ship 3.10.
    python311 = ("command -v python3.11 >/dev/null || (sudo apt-get update -qq && "
                 "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                 "python3.11 python3.11-venv)")
    tpu_jax = shlex.join([".venv/bin/python", "-m", "pip", "install", "-q",
                          "-c", "requirements-lock.txt", f"jax[tpu]=={jax_version}"])
    # Every worker must start its backend for a slice to come up, which --worker=all does.
    check = shlex.join([".venv/bin/python", "-c",
                        "import jax; print(jax.process_index(), jax.devices())"])
    script = [f"cd {shlex.quote(args.remote_dir)}", python311, "bash scripts/env.sh", tpu_jax,
              check]
    return [ssh(args, script)]


def run_commands(args) -> list[list[str]]:
    """Starts training in the background on every worker; output to a log per worker."""
    argv = train_argv(".venv/bin/python", args.config, args.workdir, args.overrides)
    env = [f"{key}={value}" for key, value in args.env]
    pid = f'"$(cat {PID})"'
    script = [
        f"cd {shlex.quote(args.remote_dir)}",
        "mkdir -p logs",
        # Two runs cannot share the TPU chips: refuse rather than fail mid-start.
        f"if [ -f {PID} ] && kill -0 {pid} 2>/dev/null; then echo \"$(hostname): a run "
        f"is going (pid $(cat {PID})); stop it first\" >&2; exit 1; fi",
        f'echo "=== $(date -u +%FT%TZ) start" >> {LOG}',
        # nohup + redirected stdio: the run outlives the ssh session; $! is python's pid.
        "{ " + shlex.join(["nohup", "env", *env, *argv]) + f" >> {LOG} 2>&1 < /dev/null & }}",
        f"echo $! > {PID}",
        f'echo "$(hostname): started pid $(cat {PID}), log {args.remote_dir}/{LOG}"',
    ]
    return [ssh(args, script)]


def logs_commands(args) -> list[list[str]]:
    tail = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else [])
    return [ssh(args, [shlex.join(tail + [f"{args.remote_dir}/{LOG}"])], worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
    pid = f'"$(cat {PID})"'
    script = [f"cd {shlex.quote(args.remote_dir)}",
              f"if [ -f {PID} ] && kill -0 {pid} 2>/dev/null; then kill -{args.signal} {pid}; "
              f'echo "$(hostname): sent {args.signal} to pid $(cat {PID})"; '
              'else echo "$(hostname): no run going"; fi']
    return [ssh(args, script, worker=args.worker)]


def delete_commands(args) -> list[list[str]]:
    return [gcloud("delete", args, args.name) + (["--quiet"] if args.yes else [])]


def up_commands(args) -> list[list[str]]:
    return (create_commands(args) + copy_commands(args) + install_commands(args)
            + run_commands(args))


COMMANDS = {"create": create_commands, "copy": copy_commands, "install": install_commands,
            "run": run_commands, "logs": logs_commands, "stop": stop_commands,
            "delete": delete_commands, "up": up_commands}


# ---------------------------------------------------------------- checks

def runtime_version(args) -> str:
    if args.version:
        return args.version
    family = args.accelerator_type.rsplit("-", 1)[0]
    if family not in RUNTIMES:
        raise LaunchError(f"--accelerator-type={args.accelerator_type}: no default runtime "
                          "for this family; pass --version (cloud.google.com/tpu/docs/runtimes)")
    return RUNTIMES[family]


def local_archive(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"t5x_like-{name}.tar.gz"


def check_args(args, extra: list[str]) -> None:
    """Every input checked before any command runs; errors name the flag."""
    if not _TPU_NAME.fullmatch(args.name):
        raise LaunchError(f"--name={args.name}: TPU names are lowercase letters, digits and "
                          "'-', starting with a letter, at most 63 characters")
    if not args.zone:
        raise LaunchError("--zone is required, e.g. --zone=us-central2-b")
    if getattr(args, "accelerator_type", None) is not None:
        if not _ACCELERATOR.fullmatch(args.accelerator_type):
            raise LaunchError(f"--accelerator-type={args.accelerator_type}: expected e.g. "
                              "v5litepod-16, v4-32, v6e-8, v5p-8")
        runtime_version(args)
    if hasattr(args, "remote_dir") and (not args.remote_dir or args.remote_dir.startswith("~")):
        raise LaunchError(f"--remote-dir={args.remote_dir!r}: give it relative to the home "
                          "directory (e.g. t5x_like) or absolute")
    if hasattr(args, "worker") and not _WORKERS.fullmatch(args.worker):
        raise LaunchError(f"--worker={args.worker}: expected all, an index, a list (0,2) "
                          "or a range (1-3)")
    overrides = [item for item in extra if item != "--"]
    if hasattr(args, "workdir"):
        args.config = check_config(args.config, inside_repo=True)
        args.workdir = check_remote_workdir(args.workdir)
        args.env = check_env(args.env)
        args.overrides = check_overrides(overrides)
    elif getattr(args, "config", None):  # create: a config only for the fit check
        args.config = check_config(args.config, inside_repo=True)
        args.overrides = check_overrides(overrides)
    elif overrides:
        raise LaunchError(f"unrecognized arguments: {' '.join(overrides)}")


def fit_first(args) -> None:
    """``create`` / ``up``: the config's step must fit the slice (module doc)."""
    if args.command not in ("create", "up"):
        return
    if args.skip_fit_check:
        print("[fit check] skipped (--skip-fit-check)", file=sys.stderr)
        return
    if not args.config:
        print("[fit check] no --config given, so nothing to check; pass the run's --config "
              "(and its overrides after --) to check it fits first", file=sys.stderr)
        return
    report = check_fit(args.config, tpu_target(args.accelerator_type), args.overrides)
    print(report, file=sys.stderr)


# ---------------------------------------------------------------- running

def execute(commands: list[list[str]], dry_run: bool) -> int:
    """Prints (dry run) or runs the commands in order; stops at the first failure."""
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for i, cmd in enumerate(commands, 1):
        print(f"[tpu_vm {i}/{len(commands)}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        try:
            code = subprocess.run(cmd).returncode
        except FileNotFoundError:
            print(f"error: {cmd[0]} not found on PATH"
                  + (": install the Google Cloud SDK (cloud.google.com/sdk)"
                     if cmd[0] == "gcloud" else ""), file=sys.stderr)
            return 127
        if code != 0:
            print(f"error: step {i}/{len(commands)} failed (exit code {code}); the steps "
                  f"after it did not run:\n  {shlex.join(cmd)}", file=sys.stderr)
            return code
    return 0


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = cli.ArgumentParser(prog="tpu_vm.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    common.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    common.add_argument("--dry-run", action="store_true",
                        help="print the commands, one a line, and run nothing")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator-type", required=True,
                        help="e.g. v5litepod-16, v4-32, v6e-8, v5p-8")
    create.add_argument("--version", help="TPU runtime, e.g. v2-alpha-tpuv5-lite, "
                        "tpu-ubuntu2204-base (default: the one for the accelerator family)")
    market = create.add_mutually_exclusive_group()
    market.add_argument("--spot", action="store_true", help="a Spot TPU (cheaper, preemptible)")
    market.add_argument("--preemptible", action="store_true", help="a preemptible TPU")
    create.add_argument("--skip-fit-check", action="store_true",
                        help="launch without compiling the step for the slice first")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--remote-dir", default="t5x_like",
                        help="the repository's copy on each worker, relative to the home "
                             "directory or absolute (default: %(default)s)")

    install = argparse.ArgumentParser(add_help=False)
    install.add_argument("--jax-version",
                         help="jax[tpu] version (default: the jax pinned in requirements-lock.txt)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", required=True,
                     help="FILE.py[:ARG] inside this repository, e.g. configs/e5_finetune.py:base")
    run.add_argument("--workdir", required=True,
                     help="absolute path on a filesystem every worker mounts")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable for the training process (repeatable)")

    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--worker", default="all",
                         help="all, an index, a list (0,2) or a range (1-3) (default: %(default)s)")

    def add(name, parents, help_text):
        sub_parser = sub.add_parser(name, parents=[common, *parents], help=help_text,
                                    description=help_text, epilog=EXAMPLES, formatter_class=fmt)
        sub_parser.set_defaults(parser=sub_parser)  # errors print this command's usage
        return sub_parser

    create_only = argparse.ArgumentParser(add_help=False)
    create_only.add_argument("--config", help="the run's FILE.py[:ARG]: checked to fit the slice "
                             "before anything is created (its overrides go after --)")
    add("create", [create, create_only], "create the TPU VM (with --config: if the run fits)")
    add("copy", [remote], "copy the repository's tracked files to every worker")
    add("install", [remote, install], "run scripts/env.sh and install jax[tpu] on every worker")
    add("run", [remote, run], "start training on every worker; overrides go after --")
    logs = add("logs", [remote], "show the end of the training log of a worker")
    logs.add_argument("--worker", default="0", help="worker index, a list, a range or all "
                      "(default: %(default)s)")
    logs.add_argument("--lines", type=int, default=100, help="lines to show (default: 100)")
    logs.add_argument("--follow", action="store_true", help="keep following (tail -F)")
    stop = add("stop", [remote, workers], "stop the training run (SIGTERM saves a checkpoint)")
    stop.add_argument("--signal", default="TERM", choices=["TERM", "INT", "KILL"],
                      help="signal to send (default: TERM)")
    delete = add("delete", [], "delete the TPU VM")
    delete.add_argument("--yes", action="store_true", help="do not ask gcloud to confirm")
    add("up", [create, remote, install, run], "create + copy + install + run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        check_args(args, extra)
        fit_first(args)
        commands = COMMANDS[args.command](args)
    except LaunchError as err:
        args.parser.error(str(err))
    return execute(commands, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
