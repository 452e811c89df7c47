"""LoRA adapters for the projections of ``layers.Attention`` and the MLPs (E5-mistral style).

An adapter for a ``layers.Dense`` kernel ``W`` ``[*in_dims, *out_dims]`` is a
pair ``a`` ``[*in_dims, rank]`` and ``b`` ``[rank, *out_dims]``; the adapted
kernel is ``W + (alpha / rank) * a @ b`` (the rank axis contracted). Adapters
live in their own tree that mirrors the parameter paths, e.g.
``lora["layer_0"]["attention"]["query"] == {"a": ..., "b": ...}``; with
``scan_layers`` the ``layers`` subtree keeps its leading layer axis on ``a`` and
``b`` too.

Two ways to run an adapted model, equal up to rounding:

- ``attach`` (training): each adapted ``layers.Dense`` gets ``lora_a`` and
  ``lora_b`` (``b`` pre-scaled) beside its kernel and computes
  ``x @ W + (x @ a) @ b``, so no merged kernel is ever built, the base keeps its
  own dtype (bf16 for a frozen 7B base) and sits behind ``stop_gradient``: a
  gradient w.r.t. the adapter tree trains only ``a`` and ``b``.
- ``merge`` (export): folds ``W + (alpha / rank) * a @ b`` into fp32 kernels, the
  plain tree ``convert.hf.save_hf`` writes.

There is no LoRA dropout: the merged form has no separate adapter input to drop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# Logical axes (in, out) of every projection ``layers.Attention`` / ``GatedMLP`` /
# ``MLP`` create, keyed by module name; the kernel is ``[*in_axes, *out_axes]``.
PROJECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "query": (("embed",), ("heads", "head_dim")),
    "key": (("embed",), ("kv_heads", "head_dim")),
    "value": (("embed",), ("kv_heads", "head_dim")),
    "out": (("heads", "head_dim"), ("embed",)),
    "gate": (("embed",), ("mlp",)),
    "up": (("embed",), ("mlp",)),
    "down": (("mlp",), ("embed",)),
}
# E5-mistral adapts every attention and MLP projection (q, k, v, o, gate, up, down).
DEFAULT_TARGETS: tuple[str, ...] = tuple(PROJECTIONS)

_LAYER_KEY = re.compile(r"layer_\d+")
_STACKED_KEY = "layers"  # layers.apply_stack(scan=True): a leading `layers` axis


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names of the projections to adapt
    dropout: float = 0.0
    # The frozen base's storage dtype: "compute" (the model's compute dtype: bf16 halves a
    # 7B base) or a dtype name such as "float32".
    base_dtype: str = "compute"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # lists from configs
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r} must be positive")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name at least one projection, "
                             f"e.g. {DEFAULT_TARGETS}")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(f"LoraConfig.targets has unknown projection name(s) {unknown}; "
                             f"projections are named {sorted(PROJECTIONS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoraConfig.targets={self.targets} names a projection twice")
        if self.base_dtype != "compute":
            try:
                jnp.dtype(self.base_dtype)
            except TypeError:
                raise ValueError(f"LoraConfig.base_dtype={self.base_dtype!r}: use 'compute' or a "
                                 "dtype name such as 'float32' or 'bfloat16'") from None
        if self.dropout != 0.0:
            raise ValueError(
                f"LoraConfig.dropout={self.dropout}: adapters are merged into the kernels "
                "(W + s * a @ b), which leaves no adapter input to drop out; use 0.0"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------ the tree walk


@dataclasses.dataclass(frozen=True)
class _Target:
    path: tuple[str, ...]  # to the Dense module, whose "kernel" is adapted
    name: str  # the module name: a key of PROJECTIONS
    stacked: bool  # under a scanned `layers` subtree: a leading layer axis

    @property
    def num_lead(self) -> int:
        return int(self.stacked)

    @property
    def num_in(self) -> int:
        return len(PROJECTIONS[self.name][0])

    def where(self) -> str:
        return "/".join(self.path)


def _projections(tree: Any, path: tuple[str, ...] = (), stacked: bool | None = None
                 ) -> Iterator[_Target]:
    """Every known projection module inside a layer subtree, in sorted path order."""
    if not isinstance(tree, dict):
        return
    for key in sorted(tree):
        child = tree[key]
        if stacked is None and (key == _STACKED_KEY or _LAYER_KEY.fullmatch(key)):
            yield from _projections(child, path + (key,), key == _STACKED_KEY)
        elif stacked is not None and key in PROJECTIONS and isinstance(child, dict) \
                and "kernel" in child:
            yield _Target(path + (key,), key, stacked)
        else:
            yield from _projections(child, path + (key,), stacked)


def _targets(params: Any, config: LoraConfig) -> list[_Target]:
    found = list(_projections(params))
    names = sorted({t.name for t in found})
    missing = [t for t in config.targets if t not in names]
    if missing:
        raise ValueError(
            f"LoraConfig.targets {missing} match no kernel in these parameters; the "
            f"projections found in their layers are {names}"
        )
    chosen = [t for t in found if t.name in config.targets]
    for t in chosen:
        kernel = _get(params, t.path)["kernel"]
        in_axes, out_axes = PROJECTIONS[t.name]
        if kernel.ndim != t.num_lead + len(in_axes) + len(out_axes):
            raise ValueError(
                f"lora: kernel {t.where()} has shape {kernel.shape}; a {t.name!r} projection "
                f"kernel is [{'layers, ' if t.stacked else ''}{', '.join(in_axes + out_axes)}]"
            )
    return chosen


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of ``tree`` with ``path`` replaced, copying only the dicts on the way."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree.get(path[0], {}), path[1:], value)
    return out


def _adapter_paths(lora_params: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths of the ``{"a", "b"}`` nodes of an adapter tree."""
    if isinstance(lora_params, dict) and set(lora_params) == {"a", "b"}:
        yield path
        return
    if isinstance(lora_params, dict):
        for key in sorted(lora_params):
            yield from _adapter_paths(lora_params[key], path + (key,))


# ------------------------------------------------------------------------ public


def init(params: Any, config: LoraConfig, rng: jax.Array) -> dict:
    """Adapters for every targeted kernel of ``params``: ``a`` random, ``b`` zero (fp32).

    ``a`` is uniform in ``±1 / sqrt(fan_in)`` with ``fan_in = prod(in_dims)``
    (PyTorch's Kaiming-uniform with a = sqrt(5), as PEFT initialises lora_A), so
    the adapted model starts equal to the base.
    """
    params = nn.unbox(params)
    targets = _targets(params, config)
    shapes = []
    for t in targets:
        kernel_shape = tuple(_get(params, t.path)["kernel"].shape)
        split = t.num_lead + t.num_in
        shapes.append((kernel_shape[:split], kernel_shape[:t.num_lead], kernel_shape[split:]))
    arrays = _draw(rng, tuple(shapes), config.rank)
    lora: dict = {}
    for t, adapter in zip(targets, arrays):
        lora = _set(lora, t.path, adapter)
    return lora


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(rng: jax.Array, shapes: tuple, rank: int) -> list[dict[str, jax.Array]]:
    """All adapters from one uniform draw (each separate draw costs seconds of compile on CPU)."""
    a_shapes = [lead_and_in + (rank,) for lead_and_in, _, _ in shapes]
    unit = jax.random.uniform(rng, (sum(math.prod(s) for s in a_shapes),), jnp.float32, -1.0, 1.0)
    out, offset = [], 0
    for a_shape, (lead_and_in, lead, out_dims) in zip(a_shapes, shapes):
        size = math.prod(a_shape)
        bound = 1.0 / math.sqrt(math.prod(lead_and_in[len(lead):]))
        a = unit[offset:offset + size].reshape(a_shape) * bound
        out.append({"a": a, "b": jnp.zeros(lead + (rank,) + out_dims, jnp.float32)})
        offset += size
    return out


def logical_axes(lora_params: Any) -> Any:
    """Logical ``PartitionSpec`` s of an adapter tree, for ``partitioning.tree_shardings``.

    ``a`` takes the kernel's input axes and ``b`` its output axes (so both shard
    like the kernel they adapt); the rank axis is replicated.
    """
    specs: dict = {}
    for path in _adapter_paths(lora_params):
        in_axes, out_axes = PROJECTIONS[path[-1]]
        lead = ("layers",) if _STACKED_KEY in path else ()
        specs = _set(specs, path, {"a": PartitionSpec(*lead, *in_axes, None),
                                   "b": PartitionSpec(*lead, None, *out_axes)})
    return specs


def delta(a: jax.Array, b: jax.Array, num_lead: int = 0) -> jax.Array:
    """``a @ b`` over the rank axis in full fp32: ``[*lead, *in_dims, *out_dims]``."""
    lead = tuple(range(num_lead))
    return jax.lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32),
        (((a.ndim - 1,), (num_lead,)), (lead, lead)),
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )


def _checked_adapters(params: Any, lora_params: Any, config: LoraConfig) -> Iterator[tuple]:
    """``(path, module, adapter)`` for every adapter, checked against the kernel it adapts."""
    for path in _adapter_paths(lora_params):
        where = "/".join(path)
        if path[-1] not in config.targets:
            raise ValueError(f"lora: adapter {where} is for {path[-1]!r}, which is not in "
                             f"LoraConfig.targets={config.targets}")
        try:
            module = _get(params, path)
            kernel = module["kernel"]
        except (KeyError, TypeError):
            raise ValueError(f"lora: adapter {where} has no kernel {where}/kernel in the "
                             "parameters (adapters from another model?)") from None
        adapter = _get(lora_params, path)
        if adapter["a"].shape[-1] != config.rank:
            raise ValueError(f"lora: adapter {where} has rank {adapter['a'].shape[-1]}, "
                             f"LoraConfig.rank={config.rank}")
        lead = int(_STACKED_KEY in path)
        want = tuple(adapter["a"].shape[:-1]) + tuple(adapter["b"].shape[lead + 1:])
        if want != tuple(kernel.shape):
            raise ValueError(f"lora: adapter {where} gives a {want} update for a "
                             f"{kernel.shape} kernel")
        yield path, module, adapter


def attach(params: Any, lora_params: Any, config: LoraConfig) -> Any:
    """``params`` (frozen: behind ``stop_gradient``) with ``lora_a`` / ``lora_b`` added to
    every adapted Dense module; ``layers.Dense`` applies them unmerged (module doc)."""
    params = jax.tree.map(jax.lax.stop_gradient, nn.unbox(params))
    out = params
    for path, module, adapter in _checked_adapters(params, lora_params, config):
        out = _set(out, path, {**module, "lora_a": adapter["a"],
                               "lora_b": adapter["b"] * config.scale})
    return out


def merge(params: Any, lora_params: Any, config: LoraConfig, *, freeze_base: bool = True) -> Any:
    """``params`` with every adapted kernel replaced by ``W + (alpha / rank) * a @ b`` (fp32).

    With ``freeze_base`` the base parameters pass through ``stop_gradient``, so
    a gradient w.r.t. ``params`` is zero and only the adapters train.
    """
    params = nn.unbox(params)
    if freeze_base:
        params = jax.tree.map(jax.lax.stop_gradient, params)
    merged = params
    for path, module, adapter in _checked_adapters(params, lora_params, config):
        update = delta(adapter["a"], adapter["b"], num_lead=int(_STACKED_KEY in path))
        new_kernel = jnp.asarray(module["kernel"], jnp.float32) + config.scale * update
        merged = _set(merged, path, {**module, "kernel": new_kernel})
    return merged
