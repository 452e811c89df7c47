"""What an embedding is made of: hidden states of padded rows, pooled, cut and normalised.

Used alike by training (``train_tasks.DualEncoderTask``) and inference (``t5x_like.embedder``).
Pooling reads the padding mask, so left and right padding give the same vectors:
``mean`` averages real tokens, ``cls`` takes the first real token, ``last`` the last
real one (decoder embedders append EOS so that token has read the whole text).
``finish`` cuts a Matryoshka prefix and L2-normalises (after the cut).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_like.models.decoder import DecoderConfig

POOLINGS = ("mean", "cls", "last")


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """``[batch, length, dim]`` hidden states → ``[batch, dim]`` fp32 by the padding ``mask``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
    hidden = hidden.astype(jnp.float32)
    mask = mask.astype(jnp.int32)
    length = mask.shape[1]
    if pooling == "mean":
        m = mask[..., None].astype(jnp.float32)
        return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
    if pooling == "cls":
        index = jnp.argmax(mask, axis=1)  # first real token, whichever side the padding is on
    else:
        index = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last real token
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def finish(pooled: jax.Array, *, normalize: bool = True, dim: int | None = None) -> jax.Array:
    """Matryoshka truncation to ``dim`` (if given), then optional L2 normalisation."""
    if dim is not None:
        if not 0 < dim <= pooled.shape[-1]:
            raise ValueError(f"dim={dim} must be in [1, {pooled.shape[-1]}]")
        pooled = pooled[..., :dim]
    return l2_normalize(pooled) if normalize else pooled


def hidden_states(module, params, tokens, mask, *, dropout_rng=None):
    """Final hidden states of an encoder or decoder ``module`` for padded rows.

    Decoders see padding as its own segment and positions counting real tokens
    (so left padding works); ``dropout_rng`` turns on an encoder's dropout.
    """
    variables = {"params": params}
    if isinstance(module.config, DecoderConfig):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        return module.apply(variables, tokens, segment_ids=mask, positions=positions,
                            return_hidden=True)
    if dropout_rng is None:
        return module.apply(variables, tokens, mask)
    return module.apply(variables, tokens, mask, deterministic=False, rngs={"dropout": dropout_rng})
