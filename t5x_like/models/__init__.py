"""Model families: BERT / XLM-R encoders and Llama / Mistral / Qwen2 decoders."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_like import partitioning
from t5x_like.kernels import attention
from t5x_like.models.decoder import Decoder, DecoderConfig
from t5x_like.models.encoder import Encoder, EncoderConfig

ModelConfig = EncoderConfig | DecoderConfig


def build(config: ModelConfig) -> nn.Module:
    """The Flax module for a model config."""
    if isinstance(config, EncoderConfig):
        return Encoder(config)
    if isinstance(config, DecoderConfig):
        return Decoder(config)
    raise TypeError(f"build: expected an EncoderConfig or DecoderConfig, got {type(config).__name__}")


def _init_module(config: ModelConfig) -> nn.Module:
    """The model as initialised: parameters do not depend on the attention backend, and
    the one-row example is traced outside any mesh, where a per-device kernel (Pallas)
    would meet the whole multi-chip program unsharded."""
    if getattr(config, "attention", "xla") in attention.PER_DEVICE:
        config = dataclasses.replace(config, attention="xla")
    return build(config)


def _init_kwargs(config: ModelConfig) -> dict:
    # A bare decoder (lm_head=False, as embedders ship) initialises through its hidden states.
    bare_decoder = isinstance(config, DecoderConfig) and not config.lm_head
    return {"return_hidden": True} if bare_decoder else {}


def init_params(config: ModelConfig, rng: jax.Array):
    """Fresh parameters (boxed with their logical axes) from a one-row example."""
    example = jnp.zeros((1, 8), jnp.int32)
    return _init_module(config).init(rng, example, **_init_kwargs(config))["params"]


def abstract_params(config: ModelConfig, rng: jax.Array | None = None):
    """``(shapes, logical specs)`` of a model's parameters; nothing is allocated."""
    rng = jax.random.key(0) if rng is None else rng
    return partitioning.abstract_params(_init_module(config), rng, jnp.zeros((1, 8), jnp.int32),
                                        **_init_kwargs(config))


__all__ = ["Decoder", "DecoderConfig", "Encoder", "EncoderConfig", "ModelConfig",
           "abstract_params", "build", "init_params"]
