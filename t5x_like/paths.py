"""Where the shared, read-only data lives (never copied into the repository)."""

from __future__ import annotations

import os
import pathlib

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
