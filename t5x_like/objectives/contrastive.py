"""Contrastive objectives for dual encoders (E5, E5-mistral).

Inputs are the encoders' pooled embeddings of the **global** batch: under
``jax.jit`` the batch axis is sharded over the data-parallel mesh axes, so
``queries @ passages.T`` already scores every query against every device's
passages (XLA inserts the all-gather, and gradients flow back through it).

Layout: ``queries`` ``[B, d]``, ``passages`` ``[B, G, d]`` with group
``G = 1 + hard negatives`` and the positive first. After flattening the
passages to ``[B * G, d]`` the positive of query ``i`` is column ``i * G``; the
other ``B * G - 1`` columns (other queries' positives and every hard negative)
are its negatives.

``gradient_cache`` computes the same loss and gradients for batches that do
not fit in memory at once (GradCache, Gao et al. 2021): embed in chunks with
no activations kept, take the loss's gradient w.r.t. the embeddings, then
re-run each chunk and pull that gradient back into the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    temperature: float = 0.01  # E5; E5-mistral uses 0.02
    learn_temperature: bool = False  # then ``temperature`` is the initial value
    max_logit_scale: float = 100.0  # clip for a learnt 1 / temperature (as CLIP)
    query_query: bool = False  # other queries join each query's negatives (GTE)
    passage_passage: bool = False  # positive-positive similarities join them too (GTE)
    contrastive_weight: float = 1.0
    kd_weight: float = 0.0  # KL(teacher || student) over each query's group of passages
    teacher_temperature: float = 1.0  # softmax temperature of the teacher's scores
    matryoshka_dims: tuple[int, ...] = ()  # () = the full dimension only
    matryoshka_weights: tuple[float, ...] = ()  # () = equal weights

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"objective.temperature={self.temperature} must be > 0")
        if self.teacher_temperature <= 0:
            raise ValueError(f"objective.teacher_temperature={self.teacher_temperature} must be > 0")
        if self.contrastive_weight < 0 or self.kd_weight < 0:
            raise ValueError("objective.contrastive_weight and objective.kd_weight must be >= 0")
        if self.contrastive_weight == 0 and self.kd_weight == 0:
            raise ValueError("objective: contrastive_weight and kd_weight are both 0; nothing to train")
        dims, weights = tuple(self.matryoshka_dims), tuple(self.matryoshka_weights)
        object.__setattr__(self, "matryoshka_dims", dims)
        object.__setattr__(self, "matryoshka_weights", weights)
        if any(d <= 0 for d in dims):
            raise ValueError(f"objective.matryoshka_dims={dims} must be positive")
        if weights and len(weights) != len(dims):
            raise ValueError(f"objective.matryoshka_weights={weights} needs one weight per dim in "
                             f"matryoshka_dims={dims}")

    def initial_log_scale(self) -> jax.Array:
        """The learnable parameter: log(1 / temperature)."""
        return jnp.log(jnp.float32(1.0 / self.temperature))


def logit_scale(config: ContrastiveConfig, log_scale: jax.Array | None = None) -> jax.Array:
    if config.learn_temperature:
        if log_scale is None:
            raise ValueError("objective.learn_temperature=True needs the log_scale parameter")
        return jnp.minimum(jnp.exp(log_scale), config.max_logit_scale)
    return jnp.float32(1.0 / config.temperature)


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` in fp32: at temperature 0.01 a bf16 score error is multiplied by 100."""
    return jnp.einsum("id,jd->ij", a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _off_diagonal(scores: jax.Array) -> jax.Array:
    return jnp.where(jnp.eye(scores.shape[0], dtype=bool), -jnp.inf, scores)


def infonce(queries: jax.Array, passages: jax.Array, scale: jax.Array, *,
            query_query: bool = False, passage_passage: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-query InfoNCE loss ``[B]`` and top-1 accuracy ``[B]`` (normalised inputs)."""
    batch, group, dim = passages.shape
    flat = passages.reshape(batch * group, dim)
    scores = scale * _matmul_t(queries, flat)  # [B, B * G]
    labels = jnp.arange(batch) * group
    positive = scores[jnp.arange(batch), labels]
    accuracy = (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32)
    terms = [scores]
    if query_query:
        terms.append(_off_diagonal(scale * _matmul_t(queries, queries)))
    if passage_passage:
        positives = passages[:, 0]
        terms.append(_off_diagonal(scale * _matmul_t(positives, positives)))
    partition = jax.nn.logsumexp(jnp.concatenate(terms, axis=-1), axis=-1)
    return partition - positive, accuracy


def distillation(queries: jax.Array, passages: jax.Array, teacher_scores: jax.Array,
                 scale: jax.Array, teacher_temperature: float) -> jax.Array:
    """Per-query KL(teacher || student) over the query's own group ``[B]``."""
    student = scale * jnp.einsum("bd,bgd->bg", queries, passages, precision=_HIGHEST,
                                 preferred_element_type=jnp.float32)
    teacher = jax.nn.log_softmax(teacher_scores.astype(jnp.float32) / teacher_temperature, axis=-1)
    student = jax.nn.log_softmax(student, axis=-1)
    return jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def contrastive_loss(config: ContrastiveConfig, queries: jax.Array, passages: jax.Array,
                     teacher_scores: jax.Array | None = None,
                     log_scale: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over queries of the weighted objective, and metric sums.

    ``queries`` ``[B, d]`` and ``passages`` ``[B, G, d]`` are raw pooled
    embeddings: each Matryoshka dimension cuts them and L2-normalises. Returns
    ``(loss_sum, sums)`` where ``sums`` holds ``loss``, ``accuracy``,
    ``contrastive``, ``kd`` (sums over queries) and ``weight`` (= B), so that
    micro-batches and devices add up before one division.
    """
    batch, group, dim = passages.shape
    if queries.shape != (batch, dim):
        raise ValueError(f"queries {queries.shape} and passages {passages.shape} disagree: "
                         "expected [B, d] and [B, 1 + negatives, d]")
    if config.kd_weight and teacher_scores is None:
        raise ValueError("objective.kd_weight > 0 needs teacher_scores in the batch")
    dims = config.matryoshka_dims or (dim,)
    if max(dims) > dim:
        raise ValueError(f"objective.matryoshka_dims={dims} exceed the embedding size {dim}")
    weights = config.matryoshka_weights or (1.0,) * len(dims)
    scale = logit_scale(config, log_scale)
    total = jnp.zeros((batch,), jnp.float32)
    sums = {}
    for d, w in zip(dims, weights):
        q, p = _normalize(queries[:, :d]), _normalize(passages[..., :d])
        nce, accuracy = infonce(q, p, scale, query_query=config.query_query,
                                passage_passage=config.passage_passage)
        per_query = config.contrastive_weight * nce
        kd = jnp.zeros_like(nce)
        if config.kd_weight:
            kd = distillation(q, p, teacher_scores, scale, config.teacher_temperature)
            per_query = per_query + config.kd_weight * kd
        total = total + w * per_query
        if d == dims[0]:  # metrics of the first (full by default) dimension
            sums = {"contrastive": nce.sum(), "kd": kd.sum(), "accuracy": accuracy.sum()}
    loss_sum = total.sum() / sum(weights)
    sums.update(loss=loss_sum, weight=jnp.float32(batch))
    return loss_sum, sums


# ------------------------------------------------------------------ gradient cache

Encode = Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array]


def split_chunks(x: jax.Array, chunks: int) -> jax.Array:
    """``[N, ...]`` → ``[chunks, N / chunks, ...]`` where chunk ``j`` holds rows
    ``j, j + chunks, j + 2 * chunks, ...``: rows sharded contiguously over the
    data axis keep every device busy in every chunk."""
    if x.shape[0] % chunks:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {chunks} chunks")
    return jnp.swapaxes(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 0, 1)


def merge_chunks(x: jax.Array) -> jax.Array:
    """Inverse of ``split_chunks``."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _chunked(inputs: dict[str, jax.Array], chunks: int) -> dict[str, jax.Array]:
    return {k: split_chunks(v, chunks) for k, v in inputs.items()}


def embed_in_chunks(encode: Encode, params, inputs: dict[str, jax.Array], chunks: int,
                    rng: jax.Array) -> jax.Array:
    """Embeddings of every row, computed chunk by chunk with nothing kept for backward."""
    params = jax.lax.stop_gradient(params)

    def body(_, xs):
        index, chunk = xs
        return None, encode(params, chunk, jax.random.fold_in(rng, index))

    _, reps = jax.lax.scan(body, None, (jnp.arange(chunks), _chunked(inputs, chunks)))
    return merge_chunks(reps)


def pull_back(encode: Encode, params, inputs: dict[str, jax.Array], cotangent: jax.Array,
              chunks: int, rng: jax.Array, grads):
    """Adds ``d<encode(params, inputs), cotangent>/d params`` to ``grads``, one chunk at a time
    (the same per-chunk rng as ``embed_in_chunks``, so dropout masks match)."""

    def body(acc, xs):
        index, chunk, g = xs
        _, vjp = jax.vjp(lambda p: encode(p, chunk, jax.random.fold_in(rng, index)), params)
        (chunk_grads,) = vjp(g.astype(jnp.float32))
        return jax.tree.map(jnp.add, acc, chunk_grads), None

    grads, _ = jax.lax.scan(
        body, grads, (jnp.arange(chunks), _chunked(inputs, chunks), split_chunks(cotangent, chunks)))
    return grads


def gradient_cache(encode: Encode, loss_from_embeddings: Callable, params, queries: dict,
                   passages: dict, *, chunks: int, rng: jax.Array, head_params=None):
    """Loss and gradients of ``loss_from_embeddings(q_emb, p_emb, head_params)`` through
    ``encode``, with activation memory of one chunk.

    ``queries``: ``{"tokens", "mask"}`` ``[B, Lq]``; ``passages``: ``[B * G, Lp]``
    rows. ``loss_from_embeddings`` returns ``(loss, aux)``. Returns
    ``((loss, aux), encoder_grads, head_grads)``. Rows are split into
    ``chunks``; the query and passage passes use independent rng streams.
    """
    q_rng, p_rng = jax.random.split(rng)
    q_emb = embed_in_chunks(encode, params, queries, chunks, q_rng)
    p_emb = embed_in_chunks(encode, params, passages, chunks, p_rng)
    (loss, aux), (q_grad, p_grad, head_grads) = jax.value_and_grad(
        loss_from_embeddings, argnums=(0, 1, 2), has_aux=True)(q_emb, p_emb, head_params)
    grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads = pull_back(encode, params, queries, q_grad, chunks, q_rng, grads)
    grads = pull_back(encode, params, passages, p_grad, chunks, p_rng, grads)
    return (loss, aux), grads, head_grads
