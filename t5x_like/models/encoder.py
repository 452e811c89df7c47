"""BERT / XLM-RoBERTa-shaped encoders (E5, E5 v2, multilingual E5, MiniLM).

Learned absolute positions (XLM-R's count from ``pad_token_id + 1`` and skip
padding), token types, post-LayerNorm residual blocks, exact GELU. Padding
reaches attention as segment ids (real tokens 1, padding 0), so a real token
never attends to padding; outputs at padded positions are not meaningful.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_like.models import layers
from t5x_like.partitioning import with_logical_constraint

ENCODER_TYPES = ("bert", "xlm-roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    model_type: str = "bert"  # bert | xlm-roberta (positions offset past the padding id)
    vocab_size: int = 30522
    embed_dim: int = 384
    num_layers: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    norm_eps: float = 1e-12
    activation: str = "gelu"  # Hugging Face hidden_act; "gelu" is the exact erf form
    dropout_rate: float = 0.1  # hidden dropout (training only; attention-probability dropout is not applied)
    pooler: bool = False  # BERT's tanh pooler over [CLS] (BertModel's pooler_output)
    dtype: str = "float32"  # compute dtype; parameters are always fp32
    attention: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.model_type not in ENCODER_TYPES:
            raise ValueError(f"encoder config: model_type={self.model_type!r} is not one of {ENCODER_TYPES}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"encoder config: embed_dim={self.embed_dim} is not a multiple of "
                f"num_heads={self.num_heads}"
            )
        layers.activation(self.activation)
        layers.check_remat_policy(self.remat_policy, "encoder config: remat_policy")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def positions(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Position ids as Hugging Face derives them from the tokens."""
        if self.model_type == "xlm-roberta":
            # Real tokens count 1, 2, ... after the padding id; padding keeps the padding id.
            return jnp.cumsum(mask, axis=1) * mask + self.pad_token_id
        return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class EncoderBlock(nn.Module):
    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, segment_ids):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = layers.Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
            causal=False, use_bias=True, out_bias=True, implementation=cfg.attention,
            dtype=dtype, name="attention",
        )(x, segment_ids)
        x = layers.LayerNorm(cfg.norm_eps, dtype=dtype, name="attention_norm")(x + dropout(h))
        x = with_logical_constraint(x, ("batch", "length", "embed"))
        h = layers.MLP(cfg.mlp_dim, cfg.activation, dtype=dtype, name="mlp")(x)
        x = layers.LayerNorm(cfg.norm_eps, dtype=dtype, name="mlp_norm")(x + dropout(h))
        return with_logical_constraint(x, ("batch", "length", "embed")), None


class Encoder(nn.Module):
    """Token ids ``[batch, length]`` and a padding mask → hidden states ``[batch, length, embed]``.

    ``mask`` is 1 for real tokens and 0 for padding (default: ``tokens !=
    pad_token_id``). ``with_pooler_output=True`` returns ``(hidden, pooled)``
    with BERT's tanh pooler (needs ``config.pooler``).
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, tokens, mask=None, token_types=None, positions=None,
                 deterministic=True, with_pooler_output=False):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if mask is None:
            mask = (tokens != cfg.pad_token_id)
        mask = mask.astype(jnp.int32)
        if positions is None:
            positions = cfg.positions(tokens, mask)
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        x = layers.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name="embed")(tokens)
        x = x + layers.Embed(cfg.max_position_embeddings, cfg.embed_dim, dtype=dtype,
                             axes=(None, "embed"), name="position_embed")(positions)
        x = x + layers.Embed(cfg.type_vocab_size, cfg.embed_dim, dtype=dtype,
                             axes=(None, "embed"), name="token_type_embed")(token_types)
        x = layers.LayerNorm(cfg.norm_eps, dtype=dtype, name="embed_norm")(x)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x = with_logical_constraint(x, ("batch", "length", "embed"))
        x = layers.apply_stack(
            EncoderBlock, cfg.num_layers, remat_policy=cfg.remat_policy, scan=cfg.scan_layers,
            x=x, args=(mask,), config=cfg, deterministic=deterministic,
        )
        if with_pooler_output and not cfg.pooler:
            raise ValueError("with_pooler_output=True needs an encoder config with pooler=True")
        if not cfg.pooler:
            return x
        # Built whenever the config has it, so its parameters exist for conversion.
        pooled = jnp.tanh(layers.Dense(
            features=(cfg.embed_dim,), in_axes=("embed",), out_axes=("embed",), use_bias=True,
            dtype=dtype, name="pooler",
        )(x[:, 0]))
        return (x, pooled) if with_pooler_output else x
