"""Model families: BERT / XLM-R encoders and Llama / Mistral / Qwen2 decoders."""

from __future__ import annotations

import flax.linen as nn

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


__all__ = ["Decoder", "DecoderConfig", "Encoder", "EncoderConfig", "ModelConfig", "build"]
