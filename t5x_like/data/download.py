"""Fetching public BEIR data sets for users with a network (never needed by the tests).

``beir_dataset("scifact")`` downloads the BEIR zip from its public mirror into
``~/.cache/t5x_like/beir/`` (or ``$T5X_LIKE_CACHE``) once, unpacking into a
temporary directory renamed into place so an interrupted download leaves nothing
that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


def cache_dir() -> Path:
    return Path(os.environ.get("T5X_LIKE_CACHE") or Path.home() / ".cache" / "t5x_like")


def beir_dataset(name: str, root: Path | None = None, timeout: float = 60.0) -> Path:
    """The directory of BEIR data set ``name`` (corpus.jsonl, queries.jsonl, qrels/)."""
    root = Path(root or cache_dir() / "beir")
    target = root / name
    if (target / "corpus.jsonl").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    url = BEIR_URL.format(name=name)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            raise FileNotFoundError(
                f"could not download {url} ({e}); put a BEIR directory (corpus.jsonl, "
                f"queries.jsonl, qrels/*.tsv) at {target} or under the shared data directory"
            ) from None
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        unpacked = Path(tmp) / name
        if not (unpacked / "corpus.jsonl").exists():
            raise FileNotFoundError(f"{url} did not hold {name}/corpus.jsonl")
        unpacked.rename(target)
    return target
