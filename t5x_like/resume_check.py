"""Resuming with a changed config: refuse what breaks the checkpoint, warn on the rest.

A checkpoint stores the resolved config of the run that wrote it. On resume the
current config is compared with it, field by field:

* a change to what the saved arrays or the data stream's position depend on (the
  task, the model and its adapters, the data source and row shapes, the global batch)
  is refused, naming the fields;
* any other change (learning rate, schedule length, objective, evaluation, ...) is
  logged as a warning, field by field;
* ``train.allow_config_change=True`` lets both through, with the warning.

A field that one side lacks (a config written by an older version) is never refused.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Prefixes of the fields the saved state or data position depends on.
SHAPE_FIELDS = (
    "task", "model.pretrained", "model.architecture", "model.config.", "model.scan_layers",
    "lora.enabled", "lora.rank", "lora.targets", "data.format", "data.path", "data.split",
    "data.length", "data.query_length", "data.passage_length", "data.num_negatives",
    "data.instructions_path", "train.batch_size",
)
# Fields meant to differ between the run that stopped and the one that resumes.
RESUME_FIELDS = ("train.stop_after", "train.allow_config_change", "distributed.")


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _matches(field: str, prefixes) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in prefixes)


def config_changes(stored: dict, current: dict) -> tuple[dict, dict]:
    """``(refused, warned)``: ``{field: (stored, current)}`` for the fields that differ."""
    old, new = _flatten(stored), _flatten(current)
    refused, warned = {}, {}
    for field in sorted(old.keys() & new.keys()):
        if old[field] == new[field] or _matches(field, RESUME_FIELDS):
            continue
        (refused if _matches(field, SHAPE_FIELDS) else warned)[field] = (old[field], new[field])
    return refused, warned


def _describe(changes: dict) -> str:
    return ", ".join(f"{field} {a!r} -> {b!r}" for field, (a, b) in changes.items())


def check_resume(stored: dict, current: dict, where: str) -> None:
    """Raises ``ValueError`` for a refused change, logs the others (see the module doc)."""
    refused, warned = config_changes(stored, current)
    allowed = bool(_flatten(current).get("train.allow_config_change"))
    if refused and not allowed:
        raise ValueError(
            f"{where} was written with another model or data shape: {_describe(refused)}. "
            "Resume with the stored config (in that checkpoint and WORKDIR/config.json), use a "
            "new --workdir, or pass --config.train.allow_config_change=True to try anyway")
    changed = {**refused, **warned}
    if changed:
        log.warning("resuming %s with a changed config: %s%s", where, _describe(changed),
                    " (train.allow_config_change=True)" if allowed else "")
