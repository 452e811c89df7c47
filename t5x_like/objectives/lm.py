"""Next-token cross-entropy over packed rows, without ``[batch, length, vocab]`` logits.

The decoder is run with ``return_hidden=True``; the LM head is applied here, one
chunk of positions at a time inside a ``lax.scan`` whose body is wrapped in
``jax.checkpoint``. Only one chunk's logits ``[batch, chunk, vocab]`` (fp32)
exist at any time, in the forward pass and in the backward pass, which
recomputes them from the saved hidden states.

Chunks are *strided* along length (chunk ``j`` holds positions ``i * n + j``)
and every chunk spans the whole batch, so the batch axis keeps its ``data`` /
``fsdp`` sharding, a ``sequence``-sharded length stays sharded, and the vocab
axis of the logits keeps ``tensor``: the loss is the same sum in any order.

All reductions return *sums* (``loss_sum``, ``z_loss_sum``, ``weight_sum``,
``correct_sum``) so that gradient accumulation and multi-host batches can
normalise once over the global batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from t5x_like import partitioning

NORMALIZATIONS = ("tokens", "sum")
SUM_KEYS = ("loss_sum", "z_loss_sum", "weight_sum", "correct_sum")


class LMHead(NamedTuple):
    """The output projection as the decoder computes it.

    ``kernel`` is ``[embed, vocab]``; the matmul runs on operands cast to
    ``dtype`` with fp32 accumulation, and its result is rounded to
    ``logits_dtype`` before the fp32 softmax (the untied ``layers.Dense`` head
    returns logits in the compute dtype; the tied ``Embed.attend`` returns fp32).
    Under ``jax.jit`` XLA may skip such bf16 roundings inside fusions
    (``xla_allow_excess_precision``), in the model's program as in this one.
    """

    kernel: jax.Array
    dtype: Any = jnp.float32
    logits_dtype: Any = jnp.float32


def lm_head_weights(params: Any, config: Any) -> LMHead:
    """The decoder's LM head (tied or untied) from its parameters and ``DecoderConfig``."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    if not getattr(config, "lm_head", True):
        raise ValueError("DecoderConfig.lm_head=False: this decoder has no LM head to train with")
    dtype = jnp.dtype(config.dtype)
    if config.tie_embeddings:
        # Embed.attend: einsum('...e,ve->...v') with fp32 output.
        return LMHead(params["embed"]["embedding"].T, dtype, jnp.float32)
    # layers.Dense: fp32 accumulation, result cast to the compute dtype.
    return LMHead(params["lm_head"]["kernel"], dtype, dtype)


def next_token_targets(
    tokens: jax.Array, segment_ids: jax.Array | None, loss_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Targets ``tokens[t + 1]`` and their fp32 weights for packed rows ``[batch, length]``.

    Position ``t`` is trained only when ``t`` and ``t + 1`` lie in the same
    document (segment id > 0); the last position of a row never is.
    ``loss_weights`` gate the *predicted* token (0 for prompt tokens, padding).
    """
    if tokens.ndim != 2:
        raise ValueError(f"next_token_targets: tokens must be [batch, length], got {tokens.shape}")
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if segment_ids.shape != tokens.shape:
        raise ValueError(
            f"next_token_targets: segment_ids {segment_ids.shape} != tokens {tokens.shape}"
        )
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same_doc = (segment_ids[:, :-1] > 0) & (segment_ids[:, :-1] == segment_ids[:, 1:])
    weights = same_doc.astype(jnp.float32)
    if loss_weights is not None:
        if loss_weights.shape != tokens.shape:
            raise ValueError(
                f"next_token_targets: loss_weights {loss_weights.shape} != tokens {tokens.shape}"
            )
        weights = weights * loss_weights[:, 1:].astype(jnp.float32)
    weights = jnp.concatenate([weights, jnp.zeros_like(weights[:, :1])], axis=1)
    return targets, weights


def chunked_cross_entropy(
    hidden: jax.Array,
    head_kernel: jax.Array | LMHead,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int = 1024,
    z_loss: float = 0.0,
    dtype: Any = None,
    logits_dtype: Any = None,
    per_row: bool = False,
) -> dict[str, jax.Array]:
    """Weighted sums of cross-entropy (+ z-loss), weights and correct predictions.

    ``hidden`` ``[batch, length, embed]`` (or ``[tokens, embed]``), ``head_kernel``
    ``[embed, vocab]`` or an ``LMHead``; ``targets`` / ``weights`` match
    ``hidden``'s leading dims. ``chunk_size`` is the number of positions per row
    whose logits exist at once (so ``batch * chunk_size`` tokens); a length that
    does not divide is padded with weight 0. ``dtype`` (default: the head's, else
    ``hidden.dtype``) is the matmul operand dtype; the log-softmax is always fp32.

    ``loss_sum`` = sum w * (ce + z_loss * logsumexp**2), ``z_loss_sum`` the z part
    of it, ``correct_sum`` counts (weighted) targets that have the largest logit.
    ``per_row``: one sum a row (``[batch]``, for ``[batch, length, embed]`` hidden states)
    instead of one for the batch.
    """
    kernel, dtype, logits_dtype = _resolve_head(head_kernel, dtype, logits_dtype, hidden.dtype)
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size={chunk_size} must be >= 1")
    # Logical names of a chunk's [rows, positions] dims: a flat token axis is one row
    # whose tokens are sharded as the batch was.
    chunk_axes = ("batch", "length")
    if hidden.ndim == 2:
        if per_row:
            raise ValueError("chunked_cross_entropy: per_row needs [batch, length, embed] hidden states")
        hidden, targets, weights = hidden[None], targets[None], weights[None]
        chunk_axes = (None, "batch")
    if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"chunked_cross_entropy: hidden {hidden.shape} must be [batch, length, embed] and "
            f"the head kernel {kernel.shape} [embed, vocab]"
        )
    if targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
        raise ValueError(
            f"chunked_cross_entropy: targets {targets.shape} and weights {weights.shape} must be "
            f"{hidden.shape[:2]} (hidden's leading dims)"
        )

    batch, length, embed = hidden.shape
    num_chunks = -(-length // chunk_size)
    per_chunk = -(-length // num_chunks)  # <= chunk_size; pads fewer than num_chunks positions
    pad = num_chunks * per_chunk - length
    weights = weights.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def strided(x):  # [batch, length, ...] -> [num_chunks, batch, per_chunk, ...]
        x = x.reshape((batch, per_chunk, num_chunks) + x.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    # Gathered over `embed` once, outside the loop (as Embed gathers its table).
    kernel = _constrain_where_divisible(kernel.astype(dtype), (None, "vocab"))

    @jax.checkpoint  # the backward pass recomputes this chunk's logits instead of storing them
    def chunk_sums(h, t, w):
        logits = jax.lax.dot_general(
            h.astype(dtype), kernel, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        logits = _constrain_where_divisible(logits.astype(logits_dtype).astype(jnp.float32),
                                            chunk_axes + ("vocab",))
        lse = jax.nn.logsumexp(logits, axis=-1)
        # A masked sum rather than a gather: partitions cleanly over a sharded vocab.
        is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
        target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
        correct = target_logit >= jnp.max(logits, axis=-1)
        z = z_loss * jnp.square(lse)
        total = (lambda x: jnp.sum(x, axis=-1)) if per_row else jnp.sum
        return {
            "loss_sum": total(w * (lse - target_logit + z)),
            "z_loss_sum": total(w * z),
            "weight_sum": total(w),
            "correct_sum": total(w * correct),
        }

    def step(totals, chunk):
        sums = chunk_sums(*chunk)
        return {k: totals[k] + sums[k] for k in SUM_KEYS}, None

    zeros = {k: jnp.zeros((batch,) if per_row else (), jnp.float32) for k in SUM_KEYS}
    totals, _ = jax.lax.scan(step, zeros, (strided(hidden), strided(targets), strided(weights)))
    return totals


def decoder_sums(module, params, config, batch: dict, targets: jax.Array, weights: jax.Array, *,
                 chunk_size: int = 1024, z_loss: float = 0.0, per_row: bool = False
                 ) -> dict[str, jax.Array]:
    """``chunked_cross_entropy`` sums of a decoder ``module`` on ``batch`` (``tokens``,
    ``segment_ids``, ``positions``): the one LM row-sum that training's evaluation
    (``LanguageModelTask.eval_sums``) and the long-context probes' scorer share."""
    hidden = module.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"], return_hidden=True)
    return chunked_cross_entropy(hidden, lm_head_weights(params, config), targets, weights,
                                 chunk_size=chunk_size, z_loss=z_loss, per_row=per_row)


def lm_loss(
    hidden: jax.Array,
    head_kernel: jax.Array | LMHead,
    tokens: jax.Array,
    segment_ids: jax.Array | None,
    loss_weights: jax.Array | None,
    *,
    chunk_size: int = 1024,
    z_loss: float = 0.0,
    normalize: str = "tokens",
    dtype: Any = None,
    logits_dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token loss of packed rows and the sums behind it: ``(loss, sums)``.

    ``normalize="tokens"``: the mean over every weighted token of the (global)
    batch, z-loss included; ``"sum"``: the weighted sum, for callers that
    normalise across micro-batches themselves. ``summarize(sums)`` gives metrics.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"lm_loss: normalize={normalize!r} is not one of {NORMALIZATIONS}")
    targets, weights = next_token_targets(tokens, segment_ids, loss_weights)
    sums = chunked_cross_entropy(
        hidden, head_kernel, targets, weights, chunk_size=chunk_size, z_loss=z_loss,
        dtype=dtype, logits_dtype=logits_dtype,
    )
    if normalize == "sum":
        return sums["loss_sum"], sums
    return _safe_divide(sums["loss_sum"], sums["weight_sum"]), sums


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from (possibly accumulated) sums: loss, cross_entropy, z_loss, accuracy, tokens."""
    n = sums["weight_sum"]
    return {
        "loss": _safe_divide(sums["loss_sum"], n),
        "cross_entropy": _safe_divide(sums["loss_sum"] - sums["z_loss_sum"], n),
        "z_loss": _safe_divide(sums["z_loss_sum"], n),
        "accuracy": _safe_divide(sums["correct_sum"], n),
        "tokens": n,
    }


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 for a batch without a single weighted token (not NaN)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _constrain_where_divisible(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """A logical sharding constraint that replicates the dims a chunk size does not divide.

    Chunk shapes follow ``chunk_size``, so unlike model activations a chunk that
    does not split evenly over its mesh axes is no error: it is just replicated there.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = partitioning.logical_to_mesh_axes(logical_axes)
    fitted = [
        axes if size % math.prod(mesh.shape[a] for a in _mesh_axes(axes)) == 0 else None
        for size, axes in zip(x.shape, spec)
    ]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fitted)))


def _mesh_axes(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _resolve_head(head, dtype, logits_dtype, hidden_dtype):
    if isinstance(head, LMHead):
        kernel = head.kernel
        dtype = head.dtype if dtype is None else dtype
        logits_dtype = head.logits_dtype if logits_dtype is None else logits_dtype
    else:
        kernel = head
    dtype = jnp.dtype(hidden_dtype if dtype is None else dtype)
    logits_dtype = jnp.dtype(jnp.float32 if logits_dtype is None else logits_dtype)
    return jnp.asarray(kernel), dtype, logits_dtype
