"""t5x_like: one JAX engine for E5-family text embedders and long-context decoders."""

from t5x_like import host_malloc as _host_malloc

# Before jax starts the XLA CPU client's threads (see host_malloc's docstring).
_host_malloc.configure()

__version__ = "0.1.0"
