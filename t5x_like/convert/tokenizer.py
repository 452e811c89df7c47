"""Tokenizers of model directories: HF ``tokenizer.json`` or a SentencePiece model.

Both give the same small interface: ``encode(texts, max_length, add_eos)``
returns id lists with the model's special tokens (``[CLS] ... [SEP]``,
``<s> ...``) and truncation as transformers applies them, plus ``pad_id`` and
``eos_id``; ``decode(ids)`` gives text back (special tokens dropped). ``add_eos``
appends EOS after truncating to ``max_length - 1`` (last-token pooling of decoder
embedders, as E5-mistral does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence


class TextTokenizer(Protocol):
    pad_id: int
    eos_id: int | None

    def encode(self, texts: Sequence[str], max_length: int, add_eos: bool = False) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def special_token_settings(directory: Path) -> dict[str, Any]:
    """``special_tokens_map.json`` overlaid with ``tokenizer_config.json`` (either may be absent)."""
    return {**_read_json(directory / "special_tokens_map.json"),
            **_read_json(directory / "tokenizer_config.json")}


def special_token(config: dict[str, Any], key: str) -> str | None:
    """The token string of ``key`` (``"eos_token"``...), plain or ``{"content": ...}``."""
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library (the file transformers' fast
    tokenizers read)."""

    def __init__(self, path: str | Path, model_config: dict | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_padding()
        settings = special_token_settings(self.path.parent)
        model_config = model_config or {}
        self.pad_id = self._token_id(special_token(settings, "pad_token"),
                                     model_config.get("pad_token_id"), 0)
        eos_id = model_config.get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0]
        self.eos_id = self._token_id(special_token(settings, "eos_token"), eos_id, None)

    def _token_id(self, token: str | None, fallback: int | None, default: int | None) -> int | None:
        if token is not None and self._tok.token_to_id(token) is not None:
            return self._tok.token_to_id(token)
        return fallback if fallback is not None else default

    def encode(self, texts: Sequence[str], max_length: int, add_eos: bool = False) -> list[list[int]]:
        limit = max_length - 1 if add_eos else max_length
        # Truncation in `tokenizers` leaves room for the post-processor's special tokens.
        self._tok.enable_truncation(limit)
        ids = [e.ids for e in self._tok.encode_batch(list(texts))]
        return _append_eos(ids, self.eos_id) if add_eos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer:
    """A SentencePiece model (Llama-2 style): BOS prepended, EOS on request."""

    def __init__(self, path: str | Path, add_bos: bool = True):
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.add_bos = add_bos and self._sp.bos_id() >= 0
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, texts: Sequence[str], max_length: int, add_eos: bool = False) -> list[list[int]]:
        limit = max_length - (1 if add_eos else 0) - (1 if self.add_bos else 0)
        ids = [([self._sp.bos_id()] if self.add_bos else []) + p[:limit]
               for p in self._sp.encode(list(texts))]
        return _append_eos(ids, self.eos_id) if add_eos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        del skip_special_tokens  # SentencePiece drops control tokens (BOS / EOS) anyway
        return self._sp.decode(list(ids))


def _append_eos(ids: list[list[int]], eos_id: int | None) -> list[list[int]]:
    if eos_id is None:
        raise ValueError("add_eos=True, but the tokenizer defines no EOS token")
    return [x if x and x[-1] == eos_id else x + [eos_id] for x in ids]


def load_tokenizer(path: str | Path, model_config: dict | None = None) -> TextTokenizer:
    """The tokenizer of a model directory (``tokenizer.json`` first, then ``*.model``)."""
    path = Path(path)
    if path.is_file():
        return SentencePieceTokenizer(path) if path.suffix == ".model" else HFTokenizer(path, model_config)
    if (path / "tokenizer.json").exists():
        return HFTokenizer(path, model_config)
    for name in ("tokenizer.model", "sentencepiece.bpe.model", "spiece.model"):
        if (path / name).exists():
            return SentencePieceTokenizer(path / name)
    raise FileNotFoundError(
        f"{path}: no tokenizer found (looked for tokenizer.json, tokenizer.model, "
        "sentencepiece.bpe.model, spiece.model)"
    )
