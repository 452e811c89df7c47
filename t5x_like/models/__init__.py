"""Flax models: shared layers, RoPE, the Llama-shaped decoder."""
