"""t5x_like: one JAX engine for E5-family text embedders and long-context decoders."""

__version__ = "0.1.0"
