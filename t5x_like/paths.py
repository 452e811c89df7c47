"""Where the shared, read-only data lives (never copied into the repository), and
writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from pathlib import Path

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV_VAR = "T5X_LIKE_SHARED_DATA"


def shared_data_dir() -> pathlib.Path:
    """``$T5X_LIKE_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return pathlib.Path(os.environ.get(ENV_VAR) or REPO_ROOT.parent / "shared" / "data")


def shared_data(relative: str) -> pathlib.Path:
    """A path under the shared data directory; a clear error says what to do if absent."""
    path = shared_data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist. Put the shared data set beside the repository "
            f"(../shared/data) or point ${ENV_VAR} at a directory holding {relative!r}."
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path``; renamed onto it only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` at ``path`` (its directory made if need be), never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json_atomic(path: str | Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, which holds the old or the new file, never half."""
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
