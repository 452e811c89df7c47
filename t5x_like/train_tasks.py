"""What a training run optimises: a model wired to an objective.

* ``DualEncoderTask``: an encoder (BERT / XLM-R) or decoder embedder
  (E5-mistral) trained with the contrastive objective; optional LoRA and
  gradient caching.
* ``LanguageModelTask``: a decoder trained with next-token cross-entropy over
  packed rows (chunked over the vocabulary).

Both expose the same interface to the trainer: ``init_params`` /
``param_specs`` (logical axes), ``trainable_labels`` (what the optimizer
updates), and ``sums_and_grads(params, batch, rng)`` returning metric *sums*
(``loss``, ``weight`` and others) with the gradient of the ``loss`` sum, so
micro-batches and devices add up before one division by ``weight``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from t5x_like import models
from t5x_like.models import lora as lora_lib
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.pooling import hidden_states, pool
from t5x_like.objectives import contrastive, lm

TRAIN, FROZEN = "train", "frozen"


def _non_embedding_params(model_params) -> int:
    """Parameters that do matmul work per token (embedding lookups do none)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model_params)[0]:
        if "embedding" not in jax.tree_util.keystr(path):
            total += int(np.prod(leaf.shape))
    return total


def train_flops(matmul_params: int, tokens: int, length: int, layers: int, width: int, *,
                weight_grads: bool = True, extra_forward: bool = False) -> float:
    """Model FLOPs of one training step (the MFU convention: no remat recompute).

    2 per parameter-token forward, 2 more for input gradients, 2 for weight
    gradients (absent for a frozen base); attention scores and values add
    ``4 * length * width`` per token and layer forward, twice that backward.
    """
    forward = 2 * matmul_params * tokens + 4 * layers * width * length * tokens
    backward = forward * (2 if weight_grads else 1)
    return float(forward * (2 if extra_forward else 1) + backward)


@dataclasses.dataclass(frozen=True)
class _ModelTask:
    model: models.ModelConfig
    lora: lora_lib.LoraConfig | None = dataclasses.field(default=None, kw_only=True)

    @property
    def module(self):
        return models.build(self.model)

    def abstract_model_params(self, rng):
        return models.abstract_params(self.model, rng)

    def init_model_params(self, rng):
        return models.init_params(self.model, rng)

    def _extra_params(self, model_params, rng) -> dict:
        extra = {}
        if self.lora is not None:
            extra["lora"] = lora_lib.init(model_params, self.lora, rng)
        return extra

    def init_params(self, model_params, rng) -> dict:
        """The trained tree: ``{"model": ..., "lora"?: ..., "log_scale"?: ...}``. A frozen
        (LoRA) base is kept in ``lora.base_dtype`` (the compute dtype by default)."""
        extra = self._extra_params(model_params, rng)
        if self.lora is not None:
            dtype = self.model.dtype if self.lora.base_dtype == "compute" else self.lora.base_dtype
            model_params = jax.tree.map(lambda x: x.astype(dtype), model_params)
        return {"model": model_params, **extra}

    def param_specs(self, abstract_params, model_specs) -> dict:
        specs = {"model": model_specs}
        if "lora" in abstract_params:
            specs["lora"] = lora_lib.logical_axes(abstract_params["lora"])
        if "log_scale" in abstract_params:
            specs["log_scale"] = PartitionSpec()
        return specs

    def trainable_labels(self, params) -> dict:
        """LoRA freezes the base model; otherwise everything trains."""
        frozen = self.lora is not None
        return {k: jax.tree.map(lambda _: FROZEN if (k == "model" and frozen) else TRAIN, v)
                for k, v in params.items()}

    def model_params(self, params):
        """The parameters the model runs with: LoRA attached unmerged to a frozen base
        (``lora.attach``), so only the adapters get a gradient."""
        if self.lora is None:
            return params["model"]
        return lora_lib.attach(params["model"], params["lora"], self.lora)

    def export_params(self, params):
        """Plain fp32 model parameters for ``convert.hf.save_hf`` (LoRA merged into the base)."""
        if self.lora is None:
            return params["model"]
        merged = lora_lib.merge(params["model"], params["lora"], self.lora, freeze_base=True)
        return jax.tree.map(lambda x: x.astype(jnp.float32), merged)

    def frozen_keys(self) -> tuple[str, ...]:
        """Top-level keys of the trained tree that get no gradient (a LoRA base)."""
        return ("model",) if self.lora is not None else ()


@dataclasses.dataclass(frozen=True)
class DualEncoderTask(_ModelTask):
    objective: contrastive.ContrastiveConfig = contrastive.ContrastiveConfig()
    pooling: str = "mean"
    grad_cache_chunks: int = 1  # > 1: embed the batch in this many chunks (GradCache)
    dropout: bool = True  # the encoder's own dropout_rate while training

    def _extra_params(self, model_params, rng) -> dict:
        extra = super()._extra_params(model_params, rng)
        if self.objective.learn_temperature:
            extra["log_scale"] = self.objective.initial_log_scale()
        return extra

    def encode(self, params, inputs: dict, rng) -> jax.Array:
        """Pooled (not yet normalised) fp32 embeddings ``[rows, dim]``."""
        use_dropout = self.dropout and getattr(self.model, "dropout_rate", 0.0) > 0
        hidden = hidden_states(self.module, self.model_params(params), inputs["tokens"],
                               inputs["mask"], dropout_rng=rng if use_dropout else None)
        return pool(hidden, inputs["mask"], self.pooling)

    def sums_and_grads(self, params, batch: dict, rng):
        batch_size, group, p_len = batch["passage_tokens"].shape
        queries = {"tokens": batch["query_tokens"], "mask": batch["query_mask"]}
        passages = {"tokens": batch["passage_tokens"].reshape(batch_size * group, p_len),
                    "mask": batch["passage_mask"].reshape(batch_size * group, p_len)}
        teacher = batch.get("teacher_scores")
        # Gradients exist only for what trains: a frozen base is closed over, never carried.
        frozen = {k: params[k] for k in self.frozen_keys()}
        trainable = {k: v for k, v in params.items() if k != "log_scale" and k not in frozen}
        head = {"log_scale": params["log_scale"]} if "log_scale" in params else {}
        encode = lambda trainable, inputs, rng: self.encode({**trainable, **frozen}, inputs, rng)

        def loss_from_embeddings(q, p, head):
            p = p.reshape(batch_size, group, -1)
            return contrastive.contrastive_loss(self.objective, q, p, teacher, head.get("log_scale"))

        if self.grad_cache_chunks > 1:
            (_, sums), grads, head_grads = contrastive.gradient_cache(
                encode, loss_from_embeddings, trainable, queries, passages,
                chunks=self.grad_cache_chunks, rng=rng, head_params=head)
        else:
            q_rng, p_rng = jax.random.split(rng)

            def total(trainable, head):
                return loss_from_embeddings(encode(trainable, queries, q_rng),
                                            encode(trainable, passages, p_rng), head)

            (_, sums), (grads, head_grads) = jax.value_and_grad(
                total, argnums=(0, 1), has_aux=True)(trainable, head)
        sums["tokens"] = (queries["mask"].sum() + passages["mask"].sum()).astype(jnp.float32)
        return sums, {**grads, **head_grads, **_zero_grads(frozen)}

    def flops(self, params, batch_shapes: dict) -> float:
        b, g, p_len = batch_shapes["passage_tokens"]
        q_len = batch_shapes["query_tokens"][1]
        cfg = self.model
        n = _non_embedding_params(params["model"])
        kwargs = dict(weight_grads=self.lora is None, extra_forward=self.grad_cache_chunks > 1)
        return (train_flops(n, b * q_len, q_len, cfg.num_layers, cfg.embed_dim, **kwargs)
                + train_flops(n, b * g * p_len, p_len, cfg.num_layers, cfg.embed_dim, **kwargs))


@dataclasses.dataclass(frozen=True)
class LanguageModelTask(_ModelTask):
    z_loss: float = 0.0
    loss_chunk_size: int = 1024  # tokens whose logits exist at once

    def __post_init__(self):
        if not isinstance(self.model, DecoderConfig):
            raise ValueError("task=lm needs a decoder model config")

    def eval_sums(self, params, batch: dict) -> dict:
        """Loss sums of a packed batch: ``loss`` (with z-loss), ``cross_entropy``,
        ``z_loss``, ``accuracy``, ``weight`` (predicted tokens), ``tokens``."""
        targets, weights = lm.next_token_targets(batch["tokens"], batch["segment_ids"],
                                                 batch["loss_weights"])
        out = lm.decoder_sums(self.module, self.model_params(params), self.model, batch, targets,
                              weights, chunk_size=self.loss_chunk_size, z_loss=self.z_loss)
        return {"loss": out["loss_sum"], "z_loss": out["z_loss_sum"],
                "cross_entropy": out["loss_sum"] - out["z_loss_sum"],
                "accuracy": out["correct_sum"], "weight": out["weight_sum"],
                "tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}

    def sums_and_grads(self, params, batch: dict, rng):
        del rng  # the decoders have no dropout
        frozen = {k: params[k] for k in self.frozen_keys()}
        trainable = {k: v for k, v in params.items() if k not in frozen}

        def total(trainable):
            sums = self.eval_sums({**trainable, **frozen}, batch)
            return sums["loss"], sums

        (_, sums), grads = jax.value_and_grad(total, has_aux=True)(trainable)
        return sums, {**grads, **_zero_grads(frozen)}

    def flops(self, params, batch_shapes: dict) -> float:
        b, length = batch_shapes["tokens"]
        cfg = self.model
        n = _non_embedding_params(params["model"])
        if cfg.tie_embeddings:
            n += cfg.vocab_size * cfg.embed_dim  # the tied head still multiplies
        return train_flops(n, b * length, length, cfg.num_layers, cfg.num_heads * cfg.head_dim,
                           weight_grads=self.lora is None)



def _zero_grads(frozen: dict) -> dict:
    """The optimizer's zero updates for frozen leaves: broadcasts XLA folds, no buffers."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), frozen)


def batch_shapes(batch: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in batch.items()}
