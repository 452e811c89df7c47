"""Device mesh, logical-axis rules and the shardings derived from them.

Every parameter and large activation in t5x_like carries *logical* axis names
(``batch``, ``length``, ``embed``, ``heads``, ...). One table of rules maps those
names to the four *mesh* axes (``data``, ``fsdp``, ``tensor``, ``sequence``), so
changing a parallelism layout is a config change, never a code change.

Rule resolution follows t5x / Flax: for each logical axis of an array, the rules
for that name are tried in order and the first whose mesh axes are all still
unused by the array's earlier dimensions wins; if none fits the dimension is
replicated. That is why ``embed`` can map to ``fsdp`` for parameters (FSDP) while
activations, whose ``batch`` already took ``fsdp``, keep ``embed`` replicated.

This module imports nothing else of ours (see the design card's import rule).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")

# A rule maps one logical name to one mesh axis, a tuple of mesh axes, or None.
MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# The one table. Order matters only between rules for the same logical name.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("kv_length", None),  # keys / values stay whole along length unless ring attention
    # Parameters (and activations where these mesh axes are still free).
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


# --------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the four mesh axes; exactly one may be -1 (takes what remains)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "MeshShape":
        """Reads ``data``, ``fsdp``, ``tensor``, ``sequence`` from a dict or ConfigDict."""
        items = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
        unknown = sorted(set(items) - set(MESH_AXES))
        if unknown:
            raise ValueError(
                f"mesh config has unknown field(s) {unknown}; valid fields are {list(MESH_AXES)}"
            )
        return cls(**{k: int(v) for k, v in items.items()})

    def as_dict(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """Returns concrete axis sizes whose product is ``num_devices``, or raises."""
        sizes = self.as_dict()
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{axis}={size}: a mesh axis size must be positive or -1")
        free = [axis for axis, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(
                f"mesh axes {free} are all -1; at most one axis may take the remaining devices"
            )
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {self._describe()} cannot use {num_devices} devices: the fixed axes "
                    f"multiply to {fixed}, which does not divide {num_devices}"
                )
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"mesh {self._describe()} has {fixed} devices but {num_devices} are available; "
                f"set one axis to -1 or make the sizes multiply to {num_devices}"
            )
        return tuple(sizes[axis] for axis in MESH_AXES)

    def _describe(self) -> str:
        return ",".join(f"{axis}={size}" for axis, size in self.as_dict().items())


def make_mesh(
    config: Mapping[str, Any] | MeshShape | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh with axes ``(data, fsdp, tensor, sequence)`` from config.

    Axes are ``Auto`` so that the logical rules below (``with_sharding_constraint``)
    drive the layout. ``devices`` defaults to all devices of all processes.
    """
    shape = config if isinstance(config, MeshShape) else MeshShape.from_config(config or {})
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def describe_mesh(mesh: Mesh) -> str:
    """One line a person can read: axis sizes and the device kind."""
    axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    kind = mesh.devices.flat[0].device_kind
    return f"Mesh({axes}) over {mesh.devices.size} x {kind}"


# ---------------------------------------------------------------- logical rules

_current_rules: contextvars.ContextVar[tuple[tuple[str, MeshAxes], ...]] = contextvars.ContextVar(
    "t5x_like_axis_rules", default=DEFAULT_RULES
)


@contextlib.contextmanager
def axis_rules(rules: Rules):
    """Makes ``rules`` the active logical-axis table inside the block."""
    token = _current_rules.set(validate_rules(rules))
    try:
        yield
    finally:
        _current_rules.reset(token)


def current_rules() -> tuple[tuple[str, MeshAxes], ...]:
    return _current_rules.get()


def validate_rules(rules: Rules) -> tuple[tuple[str, MeshAxes], ...]:
    """Checks that every rule names a known mesh axis; returns the rules as a tuple."""
    checked = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"axis rule #{i} {rule!r} must be (logical_name, mesh_axes)")
        name, target = rule
        for axis in _as_tuple(target):
            if axis not in MESH_AXES:
                raise ValueError(
                    f"axis rule #{i} maps {name!r} to unknown mesh axis {axis!r}; "
                    f"mesh axes are {list(MESH_AXES)}"
                )
        checked.append((name, tuple(target) if isinstance(target, list) else target))
    return tuple(checked)


def _as_tuple(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def logical_to_mesh_axes(
    logical_axes: Sequence[str | None], rules: Rules | None = None
) -> PartitionSpec:
    """Maps logical axis names to a mesh ``PartitionSpec`` (see module docstring)."""
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in logical_axes:
        chosen: MeshAxes = None
        if name is not None:
            known = False
            for rule_name, target in rules:
                if rule_name != name:
                    continue
                known = True
                axes = _as_tuple(target)
                if not used.intersection(axes):
                    chosen = target
                    break
            if not known:
                raise KeyError(
                    f"logical axis {name!r} has no rule; known logical axes: "
                    f"{sorted({r for r, _ in rules})}"
                )
        used.update(_as_tuple(chosen))
        spec.append(chosen)
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    rules: Rules | None = None,
    what: str = "array",
) -> NamedSharding:
    """NamedSharding for one array; checks divisibility when ``shape`` is given."""
    spec = logical_to_mesh_axes(logical_axes, rules)
    if shape is not None:
        check_divisible(shape, spec, mesh.shape, logical_axes, what)
    return NamedSharding(mesh, spec)


def check_divisible(
    shape: Sequence[int],
    spec: PartitionSpec,
    mesh_shape: Mapping[str, int],
    logical_axes: Sequence[str | None] | None = None,
    what: str = "array",
) -> None:
    """Raises a ValueError naming the array, dimension and mesh axes that do not divide."""
    if len(spec) > len(shape):
        raise ValueError(
            f"{what}: {len(spec)} axis names {tuple(logical_axes or spec)} for an array of "
            f"rank {len(shape)} (shape {tuple(shape)})"
        )
    for dim, (size, target) in enumerate(zip(shape, spec)):
        parts = math.prod(mesh_shape[a] for a in _as_tuple(target))
        if size % parts:
            name = logical_axes[dim] if logical_axes else dim
            raise ValueError(
                f"{what}: dimension {dim} ({name!r}, size {size}) does not divide mesh axes "
                f"{_as_tuple(target)} of total size {parts}; change the mesh or the rule for "
                f"{name!r}"
            )


# ----------------------------------------------------- parameter trees and activations


def _is_logical_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def tree_shardings(
    mesh: Mesh,
    logical_specs: Any,
    shapes: Any | None = None,
    rules: Rules | None = None,
) -> Any:
    """NamedShardings for a pytree of *logical* PartitionSpecs.

    ``logical_specs`` is what ``flax.linen.get_partition_spec(variables)`` returns
    for logically annotated parameters (unannotated leaves come back replicated).
    With ``shapes`` (a matching pytree of arrays or ShapeDtypeStructs) every leaf
    is checked for divisibility and an error names the parameter path.
    """
    if shapes is None:
        return jax.tree.map(
            lambda s: NamedSharding(mesh, logical_to_mesh_axes(tuple(s), rules)),
            logical_specs,
            is_leaf=_is_logical_spec,
        )
    spec_leaves = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=_is_logical_spec)[0]
    shape_leaves, treedef = jax.tree.flatten(shapes)
    if len(spec_leaves) != len(shape_leaves):
        raise ValueError(
            f"{len(spec_leaves)} partition specs for {len(shape_leaves)} arrays: the spec tree "
            "and the parameter tree differ"
        )
    shardings = []
    for (path, spec), leaf in zip(spec_leaves, shape_leaves):
        logical = tuple(spec) if isinstance(spec, PartitionSpec) else ()
        shardings.append(
            logical_sharding(
                mesh, logical, np.shape(leaf), rules, what=f"parameter {jax.tree_util.keystr(path)}"
            )
        )
    return jax.tree.unflatten(treedef, shardings)


def _active_mesh() -> Any | None:
    """The mesh set by ``jax.set_mesh`` (or ``with mesh:``), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside a mesh.

    Raises a clear error when a dimension does not divide its mesh axes.
    """
    mesh = _active_mesh()
    if mesh is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(
            f"activation of shape {x.shape} given {len(logical_axes)} logical axes {logical_axes}"
        )
    spec = logical_to_mesh_axes(logical_axes)
    check_divisible(x.shape, spec, mesh.shape, logical_axes, what="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules | None = None) -> NamedSharding:
    """Sharding for an input batch: leading ``batch`` axis, the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(mesh: Mesh, batch: Any, rules: Rules | None = None) -> Any:
    """Places a pytree of host numpy arrays (the global batch) on the mesh."""

    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, rules)
        check_divisible(x.shape, sharding.spec, mesh.shape, ("batch",), what="batch")
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


# ------------------------------------------------------------- sharded Flax init


def abstract_params(module: Any, rng: jax.Array, *args: Any, **kwargs: Any):
    """``(shapes, logical specs)`` of a logically annotated Linen module's params,
    from ``jax.eval_shape`` (nothing is allocated)."""
    import flax.linen as nn

    boxed = jax.eval_shape(lambda r: module.init(r, *args, **kwargs), rng)["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def sharded_init(module: Any, mesh: Mesh, rng: jax.Array, *args: Any, **kwargs: Any):
    """Initialises a logically annotated Flax Linen module directly onto ``mesh``.

    Shapes come from ``jax.eval_shape`` (nothing is materialised on one device),
    the logical names from ``nn.get_partition_spec``, and every parameter is
    checked for divisibility before compute. Returns ``(params, shardings)`` with
    plain (unboxed) arrays.
    """
    import flax.linen as nn  # flax is a dependency, not ours: the import rule holds

    def init(rng):
        return nn.unbox(module.init(rng, *args, **kwargs))["params"]

    # Shapes first, outside the mesh, so a parameter that does not divide is
    # reported by name before any activation constraint is traced.
    abstract, specs = abstract_params(module, rng, *args, **kwargs)
    shardings = tree_shardings(mesh, specs, abstract)
    with jax.set_mesh(mesh):
        params = jax.jit(init, out_shardings=shardings)(rng)
    return params, shardings


# ------------------------------------------------------------------- the partitioner


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """The mesh and the logical-axis rules a program runs under, and the shardings they give.

    One object for training and inference: the trainer, ``generate``, ``Embedder``,
    the long-context scorer and the evaluation hooks place parameters (``fsdp`` /
    ``tensor`` by the rules), batches (rows over the ``batch`` axes) and outputs with
    it, and trace inside ``scope()`` so activation constraints and per-device kernels
    see the mesh.
    """

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", validate_rules(self.rules))

    @classmethod
    def create(cls, shape: Mapping[str, Any] | MeshShape | None = None,
               devices: Sequence[jax.Device] | None = None, rules: Rules | None = None
               ) -> "Partitioner":
        """Over ``make_mesh(shape, devices)``; ``rules`` default to the active table."""
        return cls(make_mesh(shape, devices), current_rules() if rules is None else rules)

    @classmethod
    def local(cls) -> "Partitioner":
        """This process's first device alone (an evaluation that needs no collectives)."""
        return cls.create(MeshShape(data=1), devices=jax.local_devices()[:1])

    @classmethod
    def of(cls, mesh_or_partitioner: "Mesh | Partitioner | None") -> "Partitioner | None":
        """A partitioner for an API that takes either (None stays None: unsharded)."""
        if mesh_or_partitioner is None or isinstance(mesh_or_partitioner, Partitioner):
            return mesh_or_partitioner
        return cls(mesh_or_partitioner, current_rules())

    @property
    def batch_shards(self) -> int:
        """How many ways the rows of a batch are split."""
        axes = _as_tuple(logical_to_mesh_axes(("batch",), self.rules)[0])
        return math.prod(self.mesh.shape[a] for a in axes)

    def padded_rows(self, rows: int) -> int:
        """``rows`` rounded up to a multiple of ``batch_shards``."""
        return -(-rows // self.batch_shards) * self.batch_shards

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, logical_specs: Any, shapes: Any | None = None) -> Any:
        """NamedShardings of a parameter tree from its logical specs (divisibility checked)."""
        return tree_shardings(self.mesh, logical_specs, shapes, self.rules)

    def place(self, tree: Any, shardings: Any) -> Any:
        """Host (numpy) or device arrays onto ``shardings``; a mismatch is a clear error."""
        def put(x, s):
            return jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), s)

        try:
            return jax.tree.map(put, tree, shardings)
        except ValueError as e:
            raise ValueError(f"the given parameters do not match the model config: {e}") from None

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return batch_sharding(self.mesh, ndim, self.rules)

    def shard_batch(self, batch: Any) -> Any:
        """A pytree of host arrays (the global batch) onto the mesh, rows split."""
        return shard_batch(self.mesh, batch, self.rules)

    @contextlib.contextmanager
    def scope(self):
        """Trace and run inside: the mesh is set and the rules are active."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            yield
