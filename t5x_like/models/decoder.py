"""A Llama / Mistral-shaped decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Packed rows are first-class: ``segment_ids`` keep documents apart in attention
and ``positions`` restart at every document.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_like.models import layers, rope
from t5x_like.partitioning import with_logical_constraint


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 32000
    embed_dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 688
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    causal: bool = True  # False: bidirectional (decoder embedders that drop the mask)
    dtype: str = "float32"  # compute dtype; parameters are always fp32
    attention: str = "xla"  # an implementation of kernels.attention
    remat: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"decoder config: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )


class DecoderBlock(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        inv_freq = rope.inverse_frequencies(cfg.head_dim, cfg.rope_theta)
        rotary = functools.partial(rope.apply_rope, inv_freq=inv_freq)
        h = layers.RMSNorm(cfg.norm_eps, dtype=dtype, name="attention_norm")(x)
        h = layers.Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            causal=cfg.causal, use_bias=cfg.qkv_bias, implementation=cfg.attention,
            dtype=dtype, name="attention",
        )(h, segment_ids, positions, rotary)
        x = with_logical_constraint(x + h, ("batch", "length", "embed"))
        h = layers.RMSNorm(cfg.norm_eps, dtype=dtype, name="mlp_norm")(x)
        h = layers.GatedMLP(cfg.mlp_dim, dtype=dtype, name="mlp")(h)
        return with_logical_constraint(x + h, ("batch", "length", "embed"))


class Decoder(nn.Module):
    """Token ids ``[batch, length]`` → logits ``[batch, length, vocab]`` (fp32)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, return_hidden=False):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name="embed")
        x = with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock
        for i in range(cfg.num_layers):
            x = block(cfg, name=f"layer_{i}")(x, segment_ids, positions)
        x = layers.RMSNorm(cfg.norm_eps, dtype=dtype, name="final_norm")(x)
        if return_hidden:
            return x
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = layers.Dense(
                features=(cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
                dtype=dtype, name="lm_head",
            )(x).astype(jnp.float32)
        return with_logical_constraint(logits, ("batch", "length", "vocab"))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
