"""Hugging Face checkpoints <-> t5x_like configs and parameters, both directions.

``load_hf(dir)`` reads ``config.json`` and the weights (``model.safetensors``,
sharded safetensors with an index, or ``pytorch_model.bin``, read without
torch) and returns ``(config, params)`` with fp32 numpy parameters in this
library's tree. ``save_hf(config, params, dir)`` writes a directory that
``transformers.AutoModel.from_pretrained`` loads.

Supported: BERT (BertModel and task checkpoints with a ``bert.`` prefix),
XLM-RoBERTa / RoBERTa, Llama, Mistral, Qwen2 (``*ForCausalLM`` or the bare
models). Every tensor is checked by name and shape before anything is
returned; a foreign or damaged checkpoint gets an error naming the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from t5x_like import models
from t5x_like.convert.torch_pickle import load_torch_state_dict
from t5x_like.models import rope
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.encoder import EncoderConfig

log = logging.getLogger(__name__)

ENCODER_HF_TYPES = {"bert": "bert", "xlm-roberta": "xlm-roberta", "roberta": "xlm-roberta"}
DECODER_HF_TYPES = ("llama", "mistral", "qwen2")
# Buffers and heads a bare model does not use; dropped without a warning.
_IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


# ----------------------------------------------------------------------- configs


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
            "rope_parameters": config.rope_scaling.to_hf(config.rope_theta),
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


# ----------------------------------------------------------------- tensor names


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One of our parameters and the Hugging Face tensor it corresponds to."""

    path: tuple[str, ...]  # in our (unscanned) parameter tree
    hf_name: str  # without the checkpoint's module prefix
    n_in: int | None = None  # torch Linear weight [out, in]: our kernel has n_in input dims
    top_level: bool = False  # lives outside the base-model prefix (lm_head)


def _tensor_table(config: models.ModelConfig) -> list[_Tensor]:
    if isinstance(config, EncoderConfig):
        return _encoder_table(config)
    return _decoder_table(config)


def _encoder_table(cfg: EncoderConfig) -> list[_Tensor]:
    t = [
        _Tensor(("embed", "embedding"), "embeddings.word_embeddings.weight"),
        _Tensor(("position_embed", "embedding"), "embeddings.position_embeddings.weight"),
        _Tensor(("token_type_embed", "embedding"), "embeddings.token_type_embeddings.weight"),
        _Tensor(("embed_norm", "scale"), "embeddings.LayerNorm.weight"),
        _Tensor(("embed_norm", "bias"), "embeddings.LayerNorm.bias"),
    ]
    for i in range(cfg.num_layers):
        ours, hf = f"layer_{i}", f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t.append(_Tensor((ours, "attention", name, "kernel"), f"{hf}.attention.self.{name}.weight", 1))
            t.append(_Tensor((ours, "attention", name, "bias"), f"{hf}.attention.self.{name}.bias"))
        t += [
            _Tensor((ours, "attention", "out", "kernel"), f"{hf}.attention.output.dense.weight", 2),
            _Tensor((ours, "attention", "out", "bias"), f"{hf}.attention.output.dense.bias"),
            _Tensor((ours, "attention_norm", "scale"), f"{hf}.attention.output.LayerNorm.weight"),
            _Tensor((ours, "attention_norm", "bias"), f"{hf}.attention.output.LayerNorm.bias"),
            _Tensor((ours, "mlp", "up", "kernel"), f"{hf}.intermediate.dense.weight", 1),
            _Tensor((ours, "mlp", "up", "bias"), f"{hf}.intermediate.dense.bias"),
            _Tensor((ours, "mlp", "down", "kernel"), f"{hf}.output.dense.weight", 1),
            _Tensor((ours, "mlp", "down", "bias"), f"{hf}.output.dense.bias"),
            _Tensor((ours, "mlp_norm", "scale"), f"{hf}.output.LayerNorm.weight"),
            _Tensor((ours, "mlp_norm", "bias"), f"{hf}.output.LayerNorm.bias"),
        ]
    if cfg.pooler:
        t.append(_Tensor(("pooler", "kernel"), "pooler.dense.weight", 1))
        t.append(_Tensor(("pooler", "bias"), "pooler.dense.bias"))
    return t


def _decoder_table(cfg: DecoderConfig) -> list[_Tensor]:
    t = [_Tensor(("embed", "embedding"), "embed_tokens.weight")]
    for i in range(cfg.num_layers):
        ours, hf = f"layer_{i}", f"layers.{i}"
        t.append(_Tensor((ours, "attention_norm", "scale"), f"{hf}.input_layernorm.weight"))
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            t.append(_Tensor((ours, "attention", name, "kernel"), f"{hf}.self_attn.{proj}.weight", 1))
            if cfg.qkv_bias:
                t.append(_Tensor((ours, "attention", name, "bias"), f"{hf}.self_attn.{proj}.bias"))
        t.append(_Tensor((ours, "attention", "out", "kernel"), f"{hf}.self_attn.o_proj.weight", 2))
        t.append(_Tensor((ours, "mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight"))
        for name in ("gate", "up", "down"):
            t.append(_Tensor((ours, "mlp", name, "kernel"), f"{hf}.mlp.{name}_proj.weight", 1))
    t.append(_Tensor(("final_norm", "scale"), "norm.weight"))
    if cfg.lm_head and not cfg.tie_embeddings:
        t.append(_Tensor(("lm_head", "kernel"), "lm_head.weight", 1, top_level=True))
    return t


def _to_ours(w: np.ndarray, spec: _Tensor, shape: tuple[int, ...]) -> np.ndarray:
    if spec.n_in is not None:
        w = w.T  # torch Linear stores [out, in]
    return np.ascontiguousarray(w.reshape(shape), dtype=np.float32)


def _to_hf(x: np.ndarray, spec: _Tensor) -> np.ndarray:
    if spec.n_in is not None:
        n_in = math.prod(x.shape[: spec.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)
    if spec.path[-1] == "bias":  # head-split biases are [heads, head_dim] here, flat in HF
        x = x.reshape(-1)
    return np.ascontiguousarray(x)


# ------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face model directory, by name (lazy formats read whole)."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    bin_file = path / "pytorch_model.bin"
    bin_index = path / "pytorch_model.bin.index.json"
    if single.exists():
        return dict(safetensors.numpy.load_file(single))
    if index.exists() or bin_index.exists():
        idx_path = index if index.exists() else bin_index
        weight_map = json.loads(idx_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{idx_path}: no 'weight_map' object")
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.exists():
                raise CheckpointError(f"{idx_path}: lists shard {shard!r}, which is missing")
            if shard.endswith(".safetensors"):
                out.update(safetensors.numpy.load_file(shard_path))
            else:
                out.update(load_torch_state_dict(shard_path))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{idx_path}: tensors listed but not in any shard: {missing[:5]}")
        return out
    if bin_file.exists():
        return load_torch_state_dict(bin_file)
    raise CheckpointError(
        f"{path}: no weights found (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin)"
    )


def read_hf_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: no config.json; is this a Hugging Face model directory?")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e


def _find_prefix(state: dict[str, np.ndarray], anchor: str, source: str) -> str:
    for name in state:
        if name.endswith(anchor) and (name == anchor or name[: -len(anchor)].endswith(".")):
            return name[: -len(anchor)]
    raise CheckpointError(
        f"{source}: no tensor named '{anchor}' (with or without a module prefix); "
        "the weights do not belong to the model that config.json describes"
    )


def _legacy_name(name: str) -> str | None:
    # Old BERT checkpoints name LayerNorm parameters gamma / beta.
    if "LayerNorm" in name and name.endswith(".weight"):
        return name[: -len("weight")] + "gamma"
    if "LayerNorm" in name and name.endswith(".bias"):
        return name[: -len("bias")] + "beta"
    return None


def params_from_state_dict(
    config: models.ModelConfig, state: dict[str, np.ndarray], source: str = "checkpoint"
) -> dict:
    """Our parameter tree (fp32 numpy) from Hugging Face tensors; checks every name and shape."""
    shapes = _param_shapes(config)
    table = _tensor_table(config)
    anchor = table[0].hf_name
    prefix = _find_prefix(state, anchor, source)
    params: dict = {}
    used: set[str] = set()
    problems: list[str] = []
    for spec in table:
        name = spec.hf_name if spec.top_level else prefix + spec.hf_name
        key = name if name in state else _legacy_name(name)
        if key not in state:
            problems.append(f"missing tensor '{name}'")
            continue
        used.add(key)
        shape = shapes[spec.path]
        w = np.asarray(state[key])
        expected = _to_hf(np.zeros(shape, np.float32), spec).shape
        if w.shape != expected:
            problems.append(f"tensor '{key}' has shape {tuple(w.shape)}, expected {expected}")
            continue
        _set(params, spec.path, _to_ours(w.astype(np.float32), spec, shape))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source}: does not fit the {_describe(config)}: {shown}")
    unused = sorted(n for n in state if n not in used and not _IGNORED.search(n))
    if unused:
        log.warning("%s: %d tensors not used by the %s (e.g. %s)", source, len(unused),
                    _describe(config), unused[:5])
    return _maybe_stack(config, params)


def load_hf(path: str | Path) -> tuple[models.ModelConfig, dict]:
    """``(config, params)`` from a local Hugging Face model directory."""
    path = Path(path)
    config = config_from_hf(read_hf_config(path), str(path / "config.json"))
    state = read_state_dict(path)
    if isinstance(config, EncoderConfig) and any(n.endswith("pooler.dense.weight") for n in state):
        config = dataclasses.replace(config, pooler=True)
    return config, params_from_state_dict(config, state, str(path))


# ------------------------------------------------------------------- writing


def state_dict_from_params(config: models.ModelConfig, params) -> dict[str, np.ndarray]:
    """Hugging Face tensors (the base model's own names, fp32) from our parameters."""
    params = _unstack(config, _to_numpy(params))
    shapes = _param_shapes(config)
    prefix = "model." if isinstance(config, DecoderConfig) and config.lm_head else ""
    out = {}
    for spec in _tensor_table(config):
        x = _get(params, spec.path, config)
        if x.shape != shapes[spec.path]:
            raise CheckpointError(
                f"save_hf: parameter {'/'.join(spec.path)} has shape {x.shape}, the config "
                f"implies {shapes[spec.path]}"
            )
        name = spec.hf_name if spec.top_level else prefix + spec.hf_name
        out[name] = _to_hf(x.astype(np.float32), spec)
    return out


def save_hf(
    config: models.ModelConfig,
    params,
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_config: dict | None = None,
) -> Path:
    """Writes config.json and safetensors weights (sharded above ``max_shard_bytes``).

    ``tokenizer_dir``: copy its tokenizer files alongside. ``extra_config``: more
    config.json keys (e.g. special-token ids). Files are written to a temporary
    directory first and moved in, so a failed save leaves ``path`` as it was.
    """
    path = Path(path)
    state = state_dict_from_params(config, params)
    hf_config = {**config_to_hf(config), **(extra_config or {})}
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        shards = _shards(state, max_shard_bytes)
        for name, shard in shards.items():
            safetensors.numpy.save_file(shard, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {k: n for n, shard in shards.items() for k in shard}
            total = sum(v.nbytes for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.name in TOKENIZER_FILES:
                    shutil.copy2(f, tmp / f.name)
        # Stale weights from an earlier save with another sharding would confuse loaders.
        for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
            old.unlink()
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
    return path


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "tokenizer.model", "sentencepiece.bpe.model", "added_tokens.json",
)


def _shards(state: dict[str, np.ndarray], max_bytes: int) -> dict[str, dict[str, np.ndarray]]:
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].nbytes
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = state[name]
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


# ------------------------------------------------------------------- trees


def _describe(config: models.ModelConfig) -> str:
    return f"{config.model_type} model of config.json ({config.num_layers} layers, d={config.embed_dim})"


def _param_shapes(config: models.ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of the unscanned parameter tree, from an abstract init (no compute)."""
    flat_config = dataclasses.replace(config, scan_layers=False)
    module = models.build(flat_config)
    tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
    # A decoder without an LM head can only be called for hidden states.
    kwargs = {"return_hidden": True} if getattr(config, "lm_head", True) is False else {}
    abstract = jax.eval_shape(lambda t: module.init(jax.random.key(0), t, **kwargs), tokens)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        abstract, is_leaf=lambda x: hasattr(x, "unbox")
    )
    out = {}
    for keypath, leaf in leaves:
        leaf = leaf.unbox() if hasattr(leaf, "unbox") else leaf
        out[tuple(k.key for k in keypath)] = tuple(leaf.shape)
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...], config) -> np.ndarray:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(
                f"save_hf: parameters have no {'/'.join(path)}, which the {_describe(config)} needs"
            )
        node = node[key]
    return np.asarray(node)


def _to_numpy(params) -> dict:
    import flax.linen as nn  # local: only trees from Flax carry boxes

    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def _maybe_stack(config, params: dict) -> dict:
    """Unscanned ``layer_{i}`` subtrees → one ``layers`` subtree with a leading axis."""
    if not config.scan_layers:
        return params
    per_layer = [params.pop(f"layer_{i}") for i in range(config.num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
    return params


def _unstack(config, params: dict) -> dict:
    if "layers" not in params:
        return params
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(config.num_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params
