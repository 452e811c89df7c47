"""The training command every launcher starts on every host, checked before anything runs.

Shared by ``tpu_vm.py`` and ``slurm.py``. Standard library only: the launchers run on a
laptop or a login node that may have no JAX.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Each host discovers the cluster itself (Cloud TPU metadata, SLURM_*, Open MPI variables).
AUTO_DISTRIBUTED = "--config.distributed.auto=True"
_OVERRIDE = re.compile(r"--config\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=.*", re.DOTALL)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """A launcher input that cannot work; the message names the flag and what to do."""


def check_config(spec: str, repo_root: Path = REPO_ROOT, inside_repo: bool = True) -> str:
    """``FILE.py[:ARG]`` with FILE existing locally; repo-relative when inside the repo.

    The remote hosts run from a copy of the repository, so a config outside it would not
    exist there; ``inside_repo=False`` (a shared filesystem) allows any existing path.
    """
    if not spec:
        raise LaunchError("--config is required: e.g. --config=configs/e5_finetune.py:base")
    file_part, sep, arg = spec.partition(":")
    path = Path(file_part)
    full = path if path.is_absolute() else repo_root / path
    if not full.is_file():
        raise LaunchError(f"--config={spec}: no such file {full}; configs live under "
                          f"{repo_root / 'configs'}")
    try:
        rel = full.resolve().relative_to(repo_root.resolve())
    except ValueError:
        if inside_repo:
            raise LaunchError(f"--config={spec}: {full} is outside the repository "
                              f"{repo_root}, so the hosts would not have it; move it "
                              "under configs/") from None
        return f"{full.resolve()}{sep}{arg}"
    return f"{rel.as_posix()}{sep}{arg}"


def check_overrides(overrides: list[str]) -> list[str]:
    """Every extra argument is a ``--config.SECTION.FIELD=VALUE`` override."""
    for item in overrides:
        if not _OVERRIDE.fullmatch(item):
            raise LaunchError(f"unexpected argument {item!r}: training overrides take the "
                              "form --config.SECTION.FIELD=VALUE (with '=')")
        if item.startswith("--config.distributed."):
            raise LaunchError(f"{item}: the launcher sets {AUTO_DISTRIBUTED} on every host; "
                              "drop the --config.distributed.* override")
    return list(overrides)


def check_env(pairs: list[str]) -> list[tuple[str, str]]:
    """``--env KEY=VALUE`` items as (key, value)."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise LaunchError(f"--env {pair!r}: expected KEY=VALUE with KEY a shell "
                              "variable name, e.g. --env NCCL_DEBUG=INFO")
        out.append((key, value))
    return out


def check_remote_workdir(workdir: str) -> str:
    """A directory every host can reach under the same absolute path."""
    if not workdir:
        raise LaunchError("--workdir is required: an absolute path on a filesystem every "
                          "host mounts (NFS, Filestore, a gcsfuse mount)")
    if "://" in workdir:
        raise LaunchError(f"--workdir={workdir}: the trainer writes through the local "
                          "filesystem; mount the bucket (gcsfuse) and pass the mount path")
    if not workdir.startswith("/"):
        raise LaunchError(f"--workdir={workdir}: must be absolute, on a filesystem every "
                          "host mounts (process 0 writes the config and results, every "
                          "process writes its checkpoint shards)")
    return workdir


def train_argv(python: str, config: str, workdir: str, overrides: list[str]) -> list[str]:
    """The command each host runs; the user's overrides keep their order."""
    return [python, "-m", "t5x_like.train", f"--config={config}", f"--workdir={workdir}",
            *overrides, AUTO_DISTRIBUTED]


def read_pinned(package: str, lock: Path = REPO_ROOT / "requirements-lock.txt") -> str:
    """The version ``package`` is pinned to in the lock file."""
    pattern = re.compile(rf"{re.escape(package)}==([^\s;#]+)", re.IGNORECASE)
    for line in lock.read_text().splitlines():
        match = pattern.match(line.strip())
        if match:
            return match.group(1)
    raise LaunchError(f"{lock} pins no {package}; pass --jax-version")
