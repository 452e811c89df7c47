"""Hugging Face checkpoints and tokenizers <-> t5x_like."""
