"""ml-collections ``--config=FILE[:ARG]`` plus ``--config.a.b=VALUE`` overrides, checked first.

``config_flags`` reports a misspelt override as a bare ``AttributeError``;
``parse_flags`` (an ``absl.app.run`` flags parser) checks every override
against the loaded config before that and names the valid fields instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from absl import app, flags


def load_config_file(spec: str):
    """Runs ``get_config(arg)`` (or ``get_config()``) of ``FILE[:ARG]``."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.exists():
        raise app.UsageError(f"--config={spec}: {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_t5x_like_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def load_with_overrides(spec: str, **dotted):
    """``load_config_file(spec)`` with ``{"train.batch_size": 8, ...}`` set (tests, benches)."""
    config = load_config_file(spec)
    for path, value in dotted.items():
        node = config
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def check_overrides(argv: list[str], flag: str = "config") -> None:
    spec = None
    for arg in argv[1:]:
        if arg.startswith(f"--{flag}="):
            spec = arg.split("=", 1)[1]
    if spec is None:
        return
    config = load_config_file(spec)
    for arg in argv[1:]:
        if not arg.startswith(f"--{flag}."):
            continue
        dotted = arg[len(flag) + 3:].split("=", 1)[0]
        node, walked = config, []
        for key in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                where = ".".join([flag, *walked])
                raise app.UsageError(
                    f"--{flag}.{dotted}: {where} has no field {key!r}; valid fields of {where}: "
                    f"{', '.join(sorted(keys)) or '(none: it is a value, not a section)'}")
            node, walked = node[key], walked + [key]


def parse_flags(argv: list[str]) -> list[str]:
    """``absl.app.run(main, flags_parser=parse_flags)``."""
    sys.path.insert(0, str(Path.cwd()))  # config files import ``configs.base``
    check_overrides(argv)
    return flags.FLAGS(argv)
