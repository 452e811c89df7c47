"""t5x_like: one JAX engine for E5-family text embedders and long-context decoders."""

from t5x_like import host_malloc as _host_malloc
from t5x_like import host_platform as _host_platform

# The CPU runtime unless a chip is here: the TPU / GPU compilers are installed
# everywhere, their clients must not start where the chip is absent.
_host_platform.configure()

# Before jax starts the XLA CPU client's threads (see host_malloc's docstring).
_host_malloc.configure()

__version__ = "0.1.0"
