"""Hugging Face ``config.json`` <-> our model configs (BERT / XLM-R encoders; Llama,
Mistral, Qwen2 decoders). Kept apart from the tensor mapping in ``hf.py`` because the run
layer and the GGUF converter need configs without touching weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t5x_like import models
from t5x_like.models import rope
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.encoder import EncoderConfig

ENCODER_HF_TYPES = {"bert": "bert", "xlm-roberta": "xlm-roberta", "roberta": "xlm-roberta"}
DECODER_HF_TYPES = ("llama", "mistral", "qwen2")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> models.ModelConfig:
    """Our model config from a Hugging Face ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type in ENCODER_HF_TYPES:
        return _encoder_config(hf, source)
    if model_type in DECODER_HF_TYPES:
        return _decoder_config(hf, source)
    raise CheckpointError(
        f"{source}: model_type={model_type!r} is not supported; supported: "
        f"{sorted(ENCODER_HF_TYPES) + list(DECODER_HF_TYPES)}"
    )


def _require(hf: dict, key: str, source: str):
    if key not in hf:
        raise CheckpointError(f"{source}: missing field {key!r}")
    return hf[key]


def _encoder_config(hf: dict, source: str) -> EncoderConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{source}: position_embedding_type={hf['position_embedding_type']!r} is not "
            "supported (only 'absolute')"
        )
    return EncoderConfig(
        model_type=ENCODER_HF_TYPES[hf["model_type"]],
        vocab_size=_require(hf, "vocab_size", source),
        embed_dim=_require(hf, "hidden_size", source),
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=_require(hf, "num_attention_heads", source),
        mlp_dim=_require(hf, "intermediate_size", source),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=hf.get("hidden_act", "gelu"),
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
    )


def _decoder_config(hf: dict, source: str) -> DecoderConfig:
    model_type = hf["model_type"]
    embed_dim = _require(hf, "hidden_size", source)
    num_heads = _require(hf, "num_attention_heads", source)
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise CheckpointError(
            f"{source}: attention_bias=true (biases on q, k, v and o) is not supported; "
            "Qwen2-style q/k/v biases are"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    rope_params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    sliding_window = hf.get("sliding_window")
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            sliding_window = None
        elif hf.get("max_window_layers", 0) not in (0, None):
            raise CheckpointError(
                f"{source}: Qwen2 sliding window on only some layers (max_window_layers="
                f"{hf['max_window_layers']}) is not supported"
            )
    elif model_type == "llama":
        sliding_window = None
    architectures = hf.get("architectures") or []
    # A bare *Model checkpoint (E5-mistral ships as MistralModel) has no LM head.
    bare = bool(architectures) and not any(a.endswith("ForCausalLM") for a in architectures)
    return DecoderConfig(
        model_type=model_type,
        lm_head=not bare,
        vocab_size=_require(hf, "vocab_size", source),
        embed_dim=embed_dim,
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or embed_dim // num_heads,
        mlp_dim=_require(hf, "intermediate_size", source),
        rope_theta=float(theta),
        rope_scaling=rope.RopeScaling.from_hf(rope_params),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        sliding_window=sliding_window,
    )


def config_to_hf(config: models.ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers reads back into the same model."""
    if isinstance(config, EncoderConfig):
        xlmr = config.model_type == "xlm-roberta"
        return {
            "architectures": ["XLMRobertaModel" if xlmr else "BertModel"],
            "model_type": config.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.embed_dim,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "intermediate_size": config.mlp_dim,
            "hidden_act": config.activation,
            "max_position_embeddings": config.max_position_embeddings,
            "type_vocab_size": config.type_vocab_size,
            "pad_token_id": config.pad_token_id,
            "layer_norm_eps": config.norm_eps,
            "hidden_dropout_prob": config.dropout_rate,
            "attention_probs_dropout_prob": 0.0,
            "position_embedding_type": "absolute",
        }
    if isinstance(config, DecoderConfig):
        if config.qkv_bias and config.model_type != "qwen2":
            raise CheckpointError(
                f"save_hf: qkv_bias=True exists in Hugging Face only as Qwen2; set "
                f"model_type='qwen2' (got {config.model_type!r})"
            )
        if config.sliding_window is not None and config.model_type == "llama":
            raise CheckpointError("save_hf: Llama has no sliding window; use model_type='mistral'")
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[config.model_type]
        arch += "ForCausalLM" if config.lm_head else "Model"
        out = {
            "architectures": [arch],
            "model_type": config.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.embed_dim,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "intermediate_size": config.mlp_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.norm_eps,
            "rope_parameters": _hf_rope_parameters(config),
            "tie_word_embeddings": config.tie_embeddings,
            "attention_bias": False,
        }
        if config.model_type == "mistral":
            out["sliding_window"] = config.sliding_window
        if config.model_type == "qwen2":
            out.pop("attention_bias")
            out["use_sliding_window"] = config.sliding_window is not None
            out["sliding_window"] = config.sliding_window
            out["max_window_layers"] = 0
        return out
    raise TypeError(f"config_to_hf: unsupported config {type(config).__name__}")


def _hf_rope_parameters(config) -> dict:
    """``rope_parameters`` in a form transformers reads. Static NTK (``ntk``) is not a
    transformers rope_type; it is exactly a base change, so it is written as the default
    type with the changed base (same frequencies; it reloads as ``default``)."""
    scaling = config.rope_scaling
    if scaling.rope_type == "ntk":
        theta = rope.ntk_theta(config.rope_theta, scaling.factor, config.head_dim)
        return rope.RopeScaling().to_hf(theta)
    return scaling.to_hf(config.rope_theta)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json; is this a Hugging Face model directory?")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
