"""A sentence-transformers directory's settings: pooling, normalisation and max length.

Read from ``modules.json`` (a ``Pooling`` module's ``config.json``, a ``Normalize``
module) and ``sentence_bert_config.json``; a directory without them gives ``{}``.
"""

from __future__ import annotations

import json
from pathlib import Path


def settings(path: Path) -> dict:
    """Pooling, normalisation and max length from a sentence-transformers directory."""
    out: dict = {}
    modules_file = path / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        out["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                pooling_file = path / m.get("path", "1_Pooling") / "config.json"
                if pooling_file.exists():
                    out["pooling"] = _pooling_mode(json.loads(pooling_file.read_text()), pooling_file)
    bert_config = path / "sentence_bert_config.json"
    if bert_config.exists():
        out["max_length"] = json.loads(bert_config.read_text()).get("max_seq_length")
    return out


def _pooling_mode(cfg: dict, source: Path) -> str:
    modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
             "pooling_mode_lasttoken": "last"}
    chosen = [mode for key, mode in modes.items() if cfg.get(key)]
    if len(chosen) != 1:
        raise ValueError(
            f"{source}: exactly one of {sorted(modes)} must be true (other pooling modes are "
            "not supported); pass pooling= to override"
        )
    return chosen[0]
