"""Resumable JSONL output: whole lines only, ids already written are skipped on a re-run.

A run appends each finished batch of examples with one ``write`` followed by
``flush`` and ``fsync``, so a crash can leave at most one partial line at the
end of the file. ``open_output`` cuts that partial line off, reads the ids of
the complete lines, and returns them with an appending writer: re-running the
same command continues where the last run stopped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

from t5x_like.data.sources import BadRecord

log = logging.getLogger(__name__)


def drop_partial_line(path: Path) -> int:
    """Truncates ``path`` after its last newline; returns the bytes removed (0 if none)."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    with open(path, "rb+") as f:
        keep, block = size, 1 << 16
        while keep > 0:  # scan back for the last newline, a block at a time
            start = max(0, keep - block)
            f.seek(start)
            chunk = f.read(keep - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    if keep < size:
        log.warning("%s: dropped a partial last line (%d bytes) left by an interrupted run",
                    path, size - keep)
    return size - keep


def read_ids(path: Path) -> set[str]:
    """Ids of the complete lines; a malformed complete line is an error naming file and line."""
    ids: set[str] = set()
    if not path.exists():
        return ids
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecord(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove the "
                                "line, then re-run") from None
            if not isinstance(record, dict) or "id" not in record:
                raise BadRecord(f"{path}:{number}: not an example with an 'id'")
            ids.add(str(record["id"]))
    return ids


class JsonlAppender:
    """Appends records as whole lines, durably (``fsync``) per ``write`` call."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[dict]) -> int:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if text:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        return text.count("\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_output(path: str | Path) -> tuple[set[str], JsonlAppender]:
    """``(ids already written, appender)`` for ``path`` (created, with its parent, if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_partial_line(path)
    return read_ids(path), JsonlAppender(path)


__all__ = ["JsonlAppender", "drop_partial_line", "open_output", "read_ids"]
