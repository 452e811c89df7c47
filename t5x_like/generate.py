"""Batched autoregressive generation with a KV cache for the Llama / Mistral / Qwen2 decoders.

``generate(config, params, prompts, max_new_tokens=...)`` prefills every prompt in
one forward pass, then decodes one token a step inside one jitted
``jax.lax.while_loop`` that ends as soon as every row has emitted a stop token.
Greedy when ``temperature == 0``; otherwise seeded sampling with temperature,
top-k and top-p (nucleus) filtering, applied in that order (as transformers does).

Padding: a list of prompts is left-padded (as transformers pads for generation);
a padded array may be padded on either side (``padding_side``, or per-row
``prompt_lengths``). Positions count real tokens only and padding slots are never
attended, so a row's result does not depend on how much padding it carries.
Under ``mesh`` the batch is sharded over ``(data, fsdp)`` and the parameters and
cache (kv heads over ``tensor``) follow the logical-axis rules; rows are padded to
a multiple of the batch shards and dropped again.

``generate_text`` wraps it for strings: a Hugging Face directory (or
``(config, params, tokenizer)``) and a list of prompts in, decoded continuations out.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import models
from t5x_like import partitioning as part
from t5x_like.models.decoder import Decoder, DecoderConfig, init_cache


class GenerateOutput(NamedTuple):
    """``tokens`` ``[batch, max_new_tokens]`` int32: the generated ids, ``pad_id`` after a
    row's stop token (which is kept) or after the loop ended; ``lengths`` ``[batch]``:
    generated tokens per row, its stop token included; ``steps``: tokens the loop
    produced (``< max_new_tokens`` when every row stopped early); ``logits``
    ``[batch, max_new_tokens, vocab]`` fp32 (only with ``return_logits=True``; zeros
    where no token was generated) — the raw model logits each token was chosen from."""

    tokens: np.ndarray
    lengths: np.ndarray
    steps: int
    logits: np.ndarray | None = None


# --------------------------------------------------------------------------- sampling


def top_p_mask(probs: jax.Array, top_p: float) -> jax.Array:
    """Bool mask of the smallest set of tokens whose probability sums to ``>= top_p``.

    Tokens are taken by descending probability (ties: lower id first), so the set
    is the top ``m`` where ``m`` is the first count whose cumulative sum reaches
    ``top_p``; the most likely token is always kept.
    """
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ahead
    keep_sorted = before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def filter_logits(logits: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """``logits / temperature`` with tokens outside the top-k, then outside the top-p
    nucleus, set to ``-inf``. ``top_k=0`` and ``top_p=1`` disable each filter; the
    values may be traced (then a disabled filter is skipped with ``where``)."""
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if not (isinstance(top_k, int) and top_k == 0):
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 0, logits.shape[-1])
        descending = -jnp.sort(-logits, axis=-1)
        kth = jnp.take_along_axis(descending, jnp.broadcast_to(jnp.maximum(k - 1, 0),
                                                               logits.shape[:-1] + (1,)), axis=-1)
        logits = jnp.where((k == 0) | (logits >= kth), logits, -jnp.inf)
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        p = jnp.asarray(top_p, jnp.float32)
        keep = top_p_mask(jax.nn.softmax(logits, axis=-1), p)
        logits = jnp.where(keep | (p >= 1.0), logits, -jnp.inf)
    return logits


def next_token(logits: jax.Array, key: jax.Array, temperature, top_k=0, top_p=1.0,
               greedy: bool | None = None) -> jax.Array:
    """``[batch, vocab]`` logits -> ``[batch]`` ids: the argmax when greedy (by default
    when ``temperature == 0``), else a sample from ``filter_logits``."""
    if greedy is None:
        greedy = temperature == 0
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Settings:  # what changes the compiled program (sampling values are traced)
    max_new_tokens: int
    greedy: bool
    use_top_k: bool
    use_top_p: bool
    pad_id: int
    return_logits: bool


# -------------------------------------------------------------------------- the loop


def _generate(config: DecoderConfig, s: _Settings, params, tokens, mask, done, key, stops,
              sampling):
    """Traced body: ``tokens`` / ``mask`` ``[batch, prompt_len]`` (real tokens contiguous
    in each row), ``done`` ``[batch]`` rows to skip (batch padding), ``stops`` the stop
    ids (-1 fills: never matched), ``sampling`` ``(temperature, top_k, top_p)``."""
    model = Decoder(config)
    batch, prompt_len = tokens.shape
    n = s.max_new_tokens
    mask = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    lengths = jnp.sum(mask, axis=1)
    last = jnp.max(jnp.where(mask > 0, jnp.arange(prompt_len)[None], -1), axis=1)
    cache = init_cache(config, batch, prompt_len + n - 1)
    logits, cache = model.apply({"params": params}, tokens, segment_ids=mask,
                                positions=positions, cache=cache, logits_index=last)

    def emit(step, logits, state):
        out, out_logits, done, count = state
        temperature, top_k, top_p = sampling
        token = next_token(logits, jax.random.fold_in(key, step), temperature,
                           top_k if s.use_top_k else 0, top_p if s.use_top_p else 1.0,
                           greedy=s.greedy)
        token = jnp.where(done, s.pad_id, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        if s.return_logits:
            kept = jnp.where(done[:, None], 0.0, logits)
            out_logits = jax.lax.dynamic_update_slice_in_dim(out_logits, kept[:, None], step, axis=1)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == stops[None], axis=1)
        return token, (out, out_logits, done, count)

    out = jnp.full((batch, n), s.pad_id, jnp.int32)
    out_logits = jnp.zeros((batch, n, config.vocab_size) if s.return_logits else (0,), jnp.float32)
    token, state = emit(0, logits[:, 0], (out, out_logits, done, jnp.zeros((batch,), jnp.int32)))

    def cond(carry):
        step, _, _, state = carry
        return (step < n) & ~jnp.all(state[2])

    def body(carry):
        step, cache, token, state = carry
        # The token chosen at step - 1 goes in; its position counts the row's real tokens.
        pos = (lengths + step - 1)[:, None]
        logits, cache = model.apply({"params": params}, token[:, None], positions=pos, cache=cache)
        token, state = emit(step, logits[:, 0], state)
        return step + 1, cache, token, state

    step, _, _, (out, out_logits, _, count) = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, token, state))
    return out, count, step, out_logits


@functools.lru_cache(maxsize=32)
def _compiled(config: DecoderConfig, settings: _Settings):
    return jax.jit(functools.partial(_generate, config, settings))


def _as_batch(prompt_tokens, pad_id: int, prompt_lengths, padding_side: str):
    """``(tokens, mask)`` numpy ``[batch, prompt_len]`` from lists or a padded array."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"generate: padding_side={padding_side!r} must be 'left' or 'right'")
    if not hasattr(prompt_tokens, "shape"):  # a list of id lists
        rows = [list(map(int, r)) for r in prompt_tokens]
        if not rows:
            raise ValueError("generate: no prompts")
        lengths = np.array([len(r) for r in rows])
        width = int(lengths.max()) if lengths.size else 0
        tokens = np.full((len(rows), max(width, 1)), pad_id, np.int32)
        for i, r in enumerate(rows):
            if r:
                tokens[i, width - len(r):] = r
        padding_side = "left"
    else:
        tokens = np.asarray(prompt_tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"generate: prompt_tokens must be int [batch, length], got "
                             f"{tokens.dtype} {tokens.shape}")
        tokens = tokens.astype(np.int32)
        width = tokens.shape[1]
        if prompt_lengths is not None:
            lengths = np.asarray(prompt_lengths, np.int64).reshape(-1)
            if lengths.shape != (tokens.shape[0],) or (lengths > width).any():
                raise ValueError(f"generate: prompt_lengths {lengths.tolist()} do not fit "
                                 f"prompt_tokens {tokens.shape}")
        else:
            real = tokens != pad_id
            if padding_side == "right":
                lengths = np.where(real.any(1), width - np.argmax(real[:, ::-1], axis=1), 0)
            else:
                lengths = np.where(real.any(1), width - np.argmax(real, axis=1), 0)
    if (lengths < 1).any():
        raise ValueError(f"generate: prompts {np.flatnonzero(lengths < 1).tolist()} are empty "
                         "(every prompt needs at least one token, e.g. BOS)")
    cols = np.arange(tokens.shape[1])[None]
    if padding_side == "left":
        mask = cols >= tokens.shape[1] - lengths[:, None]
    else:
        mask = cols < lengths[:, None]
    return tokens, mask.astype(np.int32)


def generate(
    config: DecoderConfig,
    params: Any,
    prompt_tokens: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    mesh: "jax.sharding.Mesh | part.Partitioner | None" = None,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    padding_side: str = "right",
    return_logits: bool = False,
) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` ids after each prompt (see the module doc).

    ``prompt_tokens``: a list of id lists (any lengths >= 1), or an int array
    ``[batch, length]`` padded with ``pad_id`` on ``padding_side`` (or with explicit
    ``prompt_lengths``; real tokens must be contiguous). ``stop_tokens``: ids that
    end a row (e.g. ``(eos_id,)``; the stop token is kept, ``pad_id`` follows).
    ``seed`` fixes the sampling stream (unused when greedy). ``mesh`` (a Mesh or a
    ``partitioning.Partitioner``): run sharded.
    """
    if not isinstance(config, DecoderConfig) or not config.lm_head:
        raise ValueError("generate: needs a DecoderConfig with an LM head (lm_head=True)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise ValueError(f"generate: top_k={top_k} must be >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    tokens, mask = _as_batch(prompt_tokens, pad_id, prompt_lengths, padding_side)
    if (tokens >= config.vocab_size).any() or (tokens < 0).any():
        raise ValueError(f"generate: prompt ids outside the vocabulary [0, {config.vocab_size})")
    rows = tokens.shape[0]
    done = np.zeros((rows,), bool)
    partitioner = part.Partitioner.of(mesh)
    if partitioner is not None:  # pad the batch to a multiple of its shards with finished rows
        extra = partitioner.padded_rows(rows) - rows
        if extra:
            tokens = np.concatenate([tokens, np.full((extra, tokens.shape[1]), pad_id, np.int32)])
            mask = np.concatenate([mask, np.ones((extra, mask.shape[1]), np.int32)])
            done = np.concatenate([done, np.ones((extra,), bool)])
    settings = _Settings(int(max_new_tokens), temperature == 0, top_k > 0, top_p < 1.0,
                         int(pad_id), bool(return_logits))
    sampling = (np.float32(max(temperature, 1e-6)), np.int32(top_k), np.float32(top_p))
    # Stop ids are traced (one compile for any set of up to 8, 16, ...): -1 pads them.
    stop_tokens = [int(t) for t in stop_tokens]
    if any(t < 0 for t in stop_tokens):
        raise ValueError(f"generate: stop_tokens {stop_tokens} must be ids >= 0")
    stops = np.full((-(-max(len(stop_tokens), 1) // 8) * 8,), -1, np.int32)
    stops[:len(stop_tokens)] = stop_tokens
    fn = _compiled(config, settings)
    key = jax.random.key(seed)
    if partitioner is None:
        out, count, steps, logits = fn(params, tokens, mask, done, key, stops, sampling)
    else:
        shapes, specs = models.abstract_params(config)
        params = partitioner.place(params, partitioner.param_shardings(specs, shapes))
        with partitioner.scope():
            inputs = partitioner.shard_batch((tokens, mask, done))
            out, count, steps, logits = fn(params, *inputs, key, stops, sampling)
    return GenerateOutput(
        np.asarray(out)[:rows], np.asarray(count)[:rows], int(steps),
        np.asarray(logits)[:rows] if return_logits else None,
    )


# ------------------------------------------------------------------------------ text


def generate_text(
    model: str | Path | tuple[DecoderConfig, Any, Any],
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_length: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    **kwargs,
) -> list[str]:
    """Continuations of ``prompts`` (the generated text only, special tokens dropped).

    ``model``: a Hugging Face decoder directory (weights via ``convert.hf.load_hf``,
    tokenizer via ``convert.tokenizer.load_tokenizer``) or ``(config, params,
    tokenizer)``. Prompts are encoded as the tokenizer does (BOS where it adds one)
    and truncated to ``max_prompt_length`` (default: what the position table leaves
    after ``max_new_tokens``). ``stop_tokens`` default to the tokenizer's EOS.
    Other keyword arguments go to ``generate`` (``temperature``, ``top_k``, ``top_p``,
    ``seed``, ``mesh``).
    """
    from t5x_like.convert import hf
    from t5x_like.convert.tokenizer import load_tokenizer

    if isinstance(model, (str, Path)):
        config, params = hf.load_hf(model)
        tokenizer = load_tokenizer(model, hf.read_hf_config(Path(model)))
    else:
        config, params, tokenizer = model
    if max_prompt_length is None:
        max_prompt_length = max(config.max_position_embeddings - max_new_tokens, 1)
    if stop_tokens is None:
        stop_tokens = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    ids = tokenizer.encode(list(prompts), max_prompt_length)
    out = generate(config, params, ids, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                   pad_id=tokenizer.pad_id, **kwargs)
    return [tokenizer.decode(row[:n].tolist()) for row, n in zip(out.tokens, out.lengths)]


__all__ = ["GenerateOutput", "filter_logits", "generate", "generate_text", "next_token",
           "top_p_mask"]
