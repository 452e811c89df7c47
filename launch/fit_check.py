"""Before a launcher spends money: does the config's training step fit the slice?

Standard library only (the launchers run on laptops and login nodes). The check itself
is ``python -m t5x_like.compile`` run with the repository's environment: it compiles the
step for the slice's chips on this machine, with no TPU or GPU, and exits 0 (fits),
1 (does not fit, with advice) or 2 (a config error). ``--skip-fit-check`` in the
launchers skips it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from train_command import REPO_ROOT, LaunchError

# Chips in a slice, by accelerator family: v4 and v5p count TensorCores (two a chip),
# v5e and v6e count chips. Each chip count maps to the slice's topology.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}
_FAMILY = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v6e": "v6e"}
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}


def tpu_target(accelerator_type: str) -> str:
    """``v5litepod-16`` -> ``v5e:4x4``, ``v5p-128`` -> ``v5p:4x4x4``, ``v4-32`` -> ``v4:2x2x4``."""
    family, _, count = accelerator_type.rpartition("-")
    if family not in _FAMILY or not count.isdigit():
        raise LaunchError(f"--accelerator-type={accelerator_type}: no topology known for it "
                          f"(families {sorted(_FAMILY)}); pass --skip-fit-check to launch unchecked")
    chips, rest = divmod(int(count), _CORES_PER_CHIP[family])
    shapes = _TORUS_3D if _CORES_PER_CHIP[family] == 2 else _GRID_2D
    if rest or chips not in shapes:
        raise LaunchError(f"--accelerator-type={accelerator_type}: not a slice size this check "
                          f"knows ({sorted(n * _CORES_PER_CHIP[family] for n in shapes)}); "
                          "pass --skip-fit-check to launch unchecked")
    return f"{_FAMILY[family]}:{shapes[chips]}"


def gpu_target(gpu_type: str, gpus_per_node: int, nodes: int) -> str:
    """``h100`` x 8 a node x 2 nodes -> ``h100:16`` (the compile target's naming)."""
    if gpu_type not in ("h100", "h200"):
        raise LaunchError(f"--gpu-type={gpu_type}: the fit check knows h100 and h200; pass "
                          "--skip-fit-check for other GPUs")
    total = gpus_per_node * nodes
    if total > 8 and total % 8:
        raise LaunchError(f"--nodes={nodes} x --gpus-per-node={gpus_per_node}: the fit check "
                          "compiles for 1-8 GPUs or whole 8-GPU hosts; pass --skip-fit-check")
    return f"{gpu_type}:{total}"


def default_python(repo_dir: Path = REPO_ROOT) -> str:
    venv = repo_dir / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def check_fit(config: str, target: str, overrides: list[str], *, python: str | None = None,
              repo_dir: Path = REPO_ROOT) -> str:
    """The compile check's report when ``config`` (with ``overrides``) fits ``target``;
    a LaunchError with the check's advice when it does not, or cannot run."""
    cmd = [python or default_python(repo_dir), "-m", "t5x_like.compile", f"--config={config}",
           f"--target={target}", *overrides]
    print(f"[fit check] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError(f"fit check: {cmd[0]} not found; run `bash scripts/env.sh` or pass "
                          "--skip-fit-check") from None
    report = proc.stdout.strip()
    if proc.returncode == 0:
        return report
    if proc.returncode == 1:
        raise LaunchError(f"the config does not fit {target}; nothing was launched.\n{report}\n"
                          "(--skip-fit-check launches anyway)")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    detail = errors[-1][len("error: "):] if errors else proc.stderr.strip()[-2000:]
    raise LaunchError(f"fit check failed (exit {proc.returncode}): {detail}")
