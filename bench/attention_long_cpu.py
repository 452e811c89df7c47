"""Long-sequence check of the blockwise backend on CPU: time and peak memory at 8K and 32K.

    /usr/bin/time -v python bench/attention_long_cpu.py

Causal, batch 1, 8 query heads / 2 kv heads, head_dim 64, fp32. The dense
reference would need a [8, 32K, 32K] fp32 logits tensor (32 GiB) at 32K.
"""

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from t5x_like.kernels.attention import dot_product_attention  # noqa: E402


def main():
    for length in (8192, 32768):
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(1, length, 8, 64)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(1, length, 2, 64)), jnp.float32)

        def attn(q, k, v):
            return dot_product_attention(q, k, v, causal=True, implementation="chunked")

        fwd = jax.jit(attn)
        grad = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).sum(), argnums=(0, 1, 2)))
        jax.block_until_ready(fwd(q, k, k))
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(q, k, k))
        t_fwd = time.perf_counter() - t0
        jax.block_until_ready(grad(q, k, k))
        t0 = time.perf_counter()
        jax.block_until_ready(grad(q, k, k))
        t_grad = time.perf_counter() - t0
        flops = 4 * 8 * length * length * 64 / 2
        print(f"{length}: fwd {t_fwd:.2f} s ({flops / t_fwd / 1e9:.1f} GFLOP/s); "
              f"fwd+bwd {t_grad:.2f} s", flush=True)


if __name__ == "__main__":
    main()
