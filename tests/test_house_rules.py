"""The rules of the house that a machine can check: imports point down the layers,
TensorFlow / seqio stay inside t5x_like/data/, and configs/base.py's defaults are the
dataclasses' defaults. (ruff, configured in pyproject.toml, is run by .ci/run.)"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "t5x_like"

# Each module (or package prefix) and its layer; a module may import its own layer and
# the ones below. The longest matching prefix decides. A new module must be placed here.
LAYERS = {
    # 0: foundations (no model code)
    "t5x_like": 0, "t5x_like.host_platform": 0, "t5x_like.host_malloc": 0, "t5x_like.paths": 0,
    "t5x_like.run_dirs": 0, "t5x_like.partitioning": 0, "t5x_like.kernels": 0,
    "t5x_like.targets": 0, "t5x_like.metrics": 0, "t5x_like.checkpoints": 0,
    "t5x_like.distributed": 0, "t5x_like.config_cli": 0, "t5x_like.peak_flops": 0,
    "t5x_like.cli": 0,
    # 1: models
    "t5x_like.models": 1,
    # 2: objectives, and the formats and sources models are read from
    "t5x_like.objectives": 2, "t5x_like.convert": 2, "t5x_like.data": 2,
    "t5x_like.model_sources": 2, "t5x_like.model_shapes": 2,
    # 3: tasks, the trainer, inference and evaluation
    "t5x_like.train_tasks": 3, "t5x_like.optimizers": 3, "t5x_like.callbacks": 3,
    "t5x_like.trainer": 3, "t5x_like.generate": 3, "t5x_like.embedder": 3,
    "t5x_like.evaluation": 3, "t5x_like.synthesis": 3,
    # 4: the run layer: a config turned into a run
    "t5x_like.run_config": 4, "t5x_like.eval_hooks": 4, "t5x_like.export": 4,
    "t5x_like.stages": 4, "t5x_like.compile_report": 4, "t5x_like.fit": 4,
    "t5x_like.resume_check": 4,
    # 5: the command lines built on all of it
    "t5x_like.train": 5, "t5x_like.compile": 5, "t5x_like.embed": 5, "t5x_like.main": 5,
    "t5x_like.synthesis.__main__": 5,
}
TENSORFLOW = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        # The package root places only its own __init__, so a new module must be placed.
        if module == prefix or (prefix != "t5x_like" and module.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, function-level (lazy) ones included;
    ``from t5x_like import x`` counts as importing ``t5x_like.x``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "t5x_like" or node.module.startswith("t5x_like."):
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _known_module(name: str) -> str:
    """``t5x_like.a.b.name`` -> the longest prefix that is a module or package of ours."""
    parts = name.split(".")
    while parts:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    raise AssertionError(f"{name} is not a module of ours")


def test_every_module_has_a_layer():
    unplaced = [_module_name(p) for p in PACKAGE.rglob("*.py") if _layer(_module_name(p)) is None]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for line, name in _imports(path):
            if not name.startswith("t5x_like"):
                continue
            target = _known_module(name)
            if _layer(target) > _layer(module):
                upward.append(f"{path.relative_to(REPO)}:{line}: {module} (layer {_layer(module)}) "
                              f"imports {target} (layer {_layer(target)})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_tensorflow_and_seqio_stay_in_data():
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "data"):
            continue
        outside += [f"{path.relative_to(REPO)}:{line}: {name}" for line, name in _imports(path)
                    if name.split(".")[0] in TENSORFLOW]
    assert not outside, "TensorFlow / seqio imported outside t5x_like/data/:\n" + "\n".join(outside)


def test_layer_check_catches_an_upward_import(tmp_path):
    """The check itself: a kernel that imports the trainer is reported."""
    bad = PACKAGE / "kernels" / "_house_rules_probe.py"
    bad.write_text("def f():\n    from t5x_like.trainer import Trainer\n    return Trainer\n")
    try:
        with pytest.raises(AssertionError, match="kernels._house_rules_probe .layer 0. imports "
                                                 "t5x_like.trainer .layer 3."):
            test_imports_point_down_the_layers()
    finally:
        bad.unlink()


def test_models_and_kernels_import_nothing_above_them():
    above = ("t5x_like.convert", "t5x_like.data", "t5x_like.evaluation", "t5x_like.train")
    code = ("import sys, t5x_like.models, t5x_like.kernels.attention; "
            f"print(sorted(m for m in sys.modules if m.startswith({above!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def _defaults(cls, drop=()) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def test_base_config_defaults_are_the_dataclasses_defaults():
    from configs.base import get_config
    from t5x_like.distributed import DistributedConfig
    from t5x_like.models.lora import LoraConfig
    from t5x_like.objectives.contrastive import ContrastiveConfig
    from t5x_like.optimizers import OptimizerConfig
    from t5x_like.partitioning import MeshShape
    from t5x_like.train_tasks import LanguageModelTask

    cfg = get_config()
    mirrors = {
        "mesh": _defaults(MeshShape),
        "distributed": _defaults(DistributedConfig),
        "objective": _defaults(ContrastiveConfig),
        "optimizer": _defaults(OptimizerConfig),
        "lora": {"enabled": False, **_defaults(LoraConfig)},
        "lm": _defaults(LanguageModelTask, drop=("model", "lora")),
    }
    for section, want in mirrors.items():
        got = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg[section].to_dict().items()}
        assert got == want, f"configs/base.py c.{section} differs from its dataclass"
