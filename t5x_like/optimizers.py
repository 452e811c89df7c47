"""The optimizer a run trains with: AdamW on the trained leaves, a warmup-then-decay
schedule, global-norm clipping, frozen leaves (a LoRA base) given zero updates and no state."""

from __future__ import annotations

import dataclasses

import jax
import optax

from t5x_like.train_tasks import FROZEN, TRAIN

DECAYS = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    decay: str = "linear"  # linear | cosine | constant, after warmup, to end_factor * lr
    end_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # on matrices only (not norms, biases, the temperature)
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"optimizer.decay={self.decay!r} is not one of {DECAYS}")
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_factor
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_factor)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if not cfg.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig, total_steps: int, labels
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the leaves labelled ``train``; ``frozen`` leaves get zero updates and no state."""
    schedule = make_schedule(cfg, total_steps)

    def decayed(params):  # matrices, not norms / biases / the temperature
        return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)

    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decayed)
    train = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
    return optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels), schedule
