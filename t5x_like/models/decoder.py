"""Llama / Mistral / Qwen2-shaped decoders: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Packed rows are first-class: ``segment_ids`` keep documents apart in attention
and ``positions`` restart at every document. The three families differ only in
config fields: Mistral adds ``sliding_window``, Qwen2 ``qkv_bias``; any of them
can drop the causal mask (``causal=False``) to serve as a bidirectional
embedder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from t5x_like.models import layers, rope
from t5x_like.partitioning import with_logical_constraint

DECODER_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str = "llama"  # llama | mistral | qwen2 (the HF architecture written on export)
    vocab_size: int = 32000
    embed_dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 688
    rope_theta: float = 10000.0
    rope_scaling: rope.RopeScaling = rope.RopeScaling()
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    lm_head: bool = True  # False: a bare decoder (embedders such as E5-mistral), hidden states only
    qkv_bias: bool = False
    sliding_window: int | None = None  # keys visible per query, including itself (Mistral)
    causal: bool = True  # False: bidirectional (decoder embedders that drop the mask)
    dtype: str = "float32"  # compute dtype; parameters are always fp32
    attention: str = "xla"  # an implementation of kernels.attention
    remat_policy: str = "none"  # see layers.REMAT_POLICIES
    scan_layers: bool = False  # one scanned layer stack (fast compiles) instead of a loop

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # configs written as plain data
            object.__setattr__(self, "rope_scaling", rope.RopeScaling.from_hf(self.rope_scaling))
        if self.model_type not in DECODER_TYPES:
            raise ValueError(f"decoder config: model_type={self.model_type!r} is not one of {DECODER_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"decoder config: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"decoder config: head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"decoder config: sliding_window={self.sliding_window} must be >= 1")
        layers.check_remat_policy(self.remat_policy, "decoder config: remat_policy")

    def rotary(self) -> rope.Rotary:
        return rope.Rotary(self.head_dim, self.rope_theta, self.rope_scaling,
                           self.max_position_embeddings)


class DecoderBlock(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache_index=None, kv_segment_ids=None,
                 layer_cache=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = layers.RMSNorm(cfg.norm_eps, dtype=dtype, name="attention_norm")(x)
        attention = layers.Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            causal=cfg.causal, use_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
            implementation=cfg.attention, dtype=dtype, name="attention",
        )
        new_cache = None
        if layer_cache is None:
            h = attention(h, segment_ids, positions, cfg.rotary())
        else:
            h, new_cache = attention(h, segment_ids, positions, cfg.rotary(), kv_cache=layer_cache,
                                     cache_index=cache_index, kv_segment_ids=kv_segment_ids)
        x = with_logical_constraint(x + h, ("batch", "length", "embed"))
        h = layers.RMSNorm(cfg.norm_eps, dtype=dtype, name="mlp_norm")(x)
        h = layers.GatedMLP(cfg.mlp_dim, dtype=dtype, name="mlp")(h)
        return with_logical_constraint(x + h, ("batch", "length", "embed")), new_cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for cached decoding (a pytree; see ``init_cache``).

    ``layers``: per layer ``(k, v)``, each ``[batch, length, kv_heads, head_dim]``
    in the compute dtype (only the kv heads: GQA caches ``num_kv_heads``); one pair
    stacked on a leading layer axis when ``scan_layers``, else a tuple of pairs.
    ``positions`` ``[batch, length]`` int32: the RoPE position of the token in each
    slot, -1 for an empty or padding slot (never attended). ``index``: the next
    slot to write (int32 scalar, the same for every row).
    """

    layers: Any
    positions: jax.Array
    index: jax.Array


def init_cache(config: "DecoderConfig", batch: int, length: int) -> KVCache:
    """An empty cache of ``length`` slots for ``batch`` rows."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    if config.scan_layers:
        stacked = (config.num_layers,) + shape
        kv = (jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
    else:
        kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
    return KVCache(kv, jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32))


class Decoder(nn.Module):
    """Token ids ``[batch, length]`` → logits ``[batch, length, vocab]`` (fp32).

    ``segment_ids`` ``[batch, length]`` separate packed documents (and padding,
    given its own id); ``positions`` default to ``0..length-1``.
    ``return_hidden=True`` returns the final-normed hidden states instead.

    Cached decoding (opt-in; the uncached call above is unchanged): with
    ``cache`` (a ``KVCache`` from ``init_cache``) the call writes the new tokens'
    keys / values at ``cache.index`` and returns ``(logits, new_cache)``. A call of
    several tokens is a *prefill* into an empty cache (``index`` 0): masked exactly
    as the uncached call (``segment_ids`` 0 marks padding, which is then never
    attended). A call of one token is a decoding *step*: it attends to every cached
    slot whose position is ``<=`` its own and, with ``sliding_window``, within the
    window counted in positions, so padding slots anywhere change nothing.
    ``positions`` default to ``index + 0..length-1`` (unpadded rows).
    ``logits_index`` ``[batch]`` keeps one position per row (``[batch, 1, ...]`` out).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, return_hidden=False, *,
                 cache: KVCache | None = None, logits_index=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name="embed")
        x = with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        if cache is None:
            x = layers.apply_stack(
                DecoderBlock, cfg.num_layers, remat_policy=cfg.remat_policy, scan=cfg.scan_layers,
                x=x, args=(segment_ids, positions), config=cfg,
            )
        else:
            x, cache = self._cached_stack(x, segment_ids, positions, cache)
        if logits_index is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_index)[:, None, None], axis=1)
        x = layers.RMSNorm(cfg.norm_eps, dtype=dtype, name="final_norm")(x)
        if return_hidden:
            return x if cache is None else (x, cache)
        if not cfg.lm_head:
            raise ValueError("this decoder has no LM head (lm_head=False); call it with return_hidden=True")
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = layers.Dense(
                features=(cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
                dtype=dtype, name="lm_head",
            )(x)
        logits = with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits if cache is None else (logits, cache)

    def _cached_stack(self, x, segment_ids, positions, cache: KVCache):
        cfg = self.config
        if not cfg.causal:
            raise ValueError("cached decoding needs a causal decoder (config.causal=False)")
        positions = jnp.asarray(positions, jnp.int32)
        batch, length = x.shape[:2]
        if length == 1:  # a step: attend to the cache, masked by positions
            new_positions = jax.lax.dynamic_update_slice_in_dim(
                cache.positions, positions, cache.index, axis=1)
            query = positions[:, :1]
            visible = (new_positions >= 0) & (new_positions <= query)
            if cfg.sliding_window is not None:
                visible &= query - new_positions < cfg.sliding_window
            kv_segment_ids = visible.astype(jnp.int32)
            segment_ids = jnp.ones((batch, 1), jnp.int32)
        else:  # a prefill: attend among the new tokens, as the uncached call
            real = positions if segment_ids is None else jnp.where(segment_ids > 0, positions, -1)
            new_positions = jax.lax.dynamic_update_slice_in_dim(
                cache.positions, real, cache.index, axis=1)
            kv_segment_ids = None
        new_positions = with_logical_constraint(new_positions, ("batch", "kv_length"))
        x, kv = layers.apply_stack(
            DecoderBlock, cfg.num_layers, remat_policy="none", scan=cfg.scan_layers, x=x,
            args=(segment_ids, positions, cache.index, kv_segment_ids), per_layer=cache.layers,
            config=cfg,
        )
        return x, KVCache(kv, new_positions, cache.index + length)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
