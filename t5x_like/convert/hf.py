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
The ``config.json`` mapping lives in ``hf_config.py``.
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

import jax
import numpy as np
import safetensors.numpy

from t5x_like import models
from t5x_like.convert.hf_config import (  # noqa: F401  (re-exported: the published API)
    DECODER_HF_TYPES,
    ENCODER_HF_TYPES,
    CheckpointError,
    config_from_hf,
    config_to_hf,
    read_hf_config,
)
from t5x_like.convert.torch_pickle import load_torch_state_dict
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.encoder import EncoderConfig

log = logging.getLogger(__name__)

# Buffers and heads a bare model does not use; dropped without a warning.
_IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


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


def load_hf(path: str | Path, *, scan_layers: bool = False) -> tuple[models.ModelConfig, dict]:
    """``(config, params)`` from a local Hugging Face model directory; ``scan_layers``
    stacks the layers on a leading axis, the layout a scanned model runs with."""
    path = Path(path)
    config = config_from_hf(read_hf_config(path), str(path / "config.json"))
    config = dataclasses.replace(config, scan_layers=scan_layers)
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
