"""Building blocks shared by the encoder and the decoder, all logically annotated.

Parameters are created in ``param_dtype`` (fp32) and carry logical axis names
through ``nn.with_logical_partitioning``; computation runs in ``dtype``
(e.g. bf16). Large activations are constrained with
``partitioning.with_logical_constraint`` so the mesh layout follows the rules
table.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_like.kernels.attention import PER_DEVICE, ShardAxes, dot_product_attention
from t5x_like.partitioning import logical_to_mesh_axes, with_logical_constraint

Dtype = jnp.dtype | str
Initializer = Callable[..., jax.Array]


def default_init(stddev: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev)


def annotated(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): statistics in fp32, scale per feature."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", annotated(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * jnp.asarray(scale, jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias (BERT / XLM-R), statistics in fp32."""

    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", annotated(nn.initializers.ones, ("norm",)), features,
                           self.param_dtype)
        bias = self.param("bias", annotated(nn.initializers.zeros, ("norm",)), features,
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


class Dense(nn.Module):
    """A projection contracting the last ``len(in_axes)`` input dims, annotated.

    ``in_axes`` / ``out_axes`` are the logical names of the contracted input dims
    and of the produced dims; the kernel is ``[*in_dims, *out_dims]``. A LoRA
    adapter attached to the parameters (``lora.attach``: ``lora_a`` ``[*in_dims,
    rank]``, ``lora_b`` ``[rank, *out_dims]``, scaled) adds ``(x @ a) @ b`` without
    building the merged kernel.
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        in_dims = x.shape[-n_in:]
        kernel = self.param(
            "kernel",
            annotated(self.kernel_init, self.in_axes + self.out_axes),
            tuple(in_dims) + tuple(self.features),
            self.param_dtype,
        )
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
            preferred_element_type=jnp.float32,
        )
        if self.has_variable("params", "lora_a"):
            a = self.get_variable("params", "lora_a").astype(self.dtype)
            b = self.get_variable("params", "lora_b").astype(self.dtype)
            low = jax.lax.dot_general(x.astype(self.dtype), a, (contract, ((), ())),
                                      preferred_element_type=jnp.float32)
            y = y + jax.lax.dot_general(low.astype(self.dtype), b, (((low.ndim - 1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", annotated(nn.initializers.zeros, self.out_axes), tuple(self.features),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding ``[vocab, embed]``; ``attend`` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axes: tuple[str, str] = ("vocab", "embed")
    embedding_init: Initializer = default_init()

    def setup(self):
        self.embedding = self.param(
            "embedding",
            annotated(self.embedding_init, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather the (FSDP / vocab-sharded) table first: a gather from a table
        # sharded on both axes makes XLA replicate it anyway, less efficiently.
        table = with_logical_constraint(self.embedding, (None, None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(
            "...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


def _attention_shard_axes(kv_length: str) -> ShardAxes:
    """The mesh axes the active logical rules give q's and k / v's dimensions: where
    a per-device kernel (Pallas) runs inside ``shard_map``."""

    def axes(entry) -> tuple[str, ...]:
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    q_spec = logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    kv_spec = logical_to_mesh_axes(("batch", kv_length, "kv_heads", "head_dim"))
    return ShardAxes(
        batch=axes(q_spec[0]), length=axes(q_spec[1]), heads=axes(q_spec[2]),
        kv_heads=axes(kv_spec[2]),
    )


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention through the one attention entry point.

    ``rotary`` (optional) is applied to q and k as ``rotary(x, positions)``.

    KV-cache decoding (opt-in, no parameters of its own): with ``kv_cache=(k, v)``
    (each ``[batch, cache_len, kv_heads, head_dim]``; only kv heads are cached)
    the new keys / values are written at slot ``cache_index`` and the call returns
    ``(out, (k, v))``. Without ``kv_segment_ids`` the queries attend among the new
    tokens only (a prefill into an empty cache, masked as a plain call); with
    ``kv_segment_ids`` ``[batch, cache_len]`` they attend to the whole cache,
    unmasked but for the ids (``segment_ids`` on the query side): the caller folds
    causality and any sliding window into those ids.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    use_bias: bool = False
    out_bias: bool = False
    sliding_window: int | None = None
    implementation: str = "xla"
    interpret: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None,
        positions: jax.Array | None = None,
        rotary: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        *,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
        kv_segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        def proj(name, heads, axes):
            return Dense(
                features=(heads, self.head_dim), in_axes=("embed",), out_axes=(axes, "head_dim"),
                use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, name=name,
            )(x)

        q = proj("query", self.num_heads, "heads")
        k = proj("key", self.num_kv_heads, "kv_heads")
        v = proj("value", self.num_kv_heads, "kv_heads")
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        q = with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        # Keys / values are whole along length (`kv_length`), except for ring attention
        # (which Pallas becomes on a `sequence`-split mesh): it passes them around the
        # `sequence` axis in the layout of the queries.
        ring = self.implementation == "ring" or (
            self.implementation in PER_DEVICE and self.sliding_window is None
        )
        kv_length = "length" if ring and kv_cache is None else "kv_length"
        shard_axes = _attention_shard_axes(kv_length) if self.implementation in PER_DEVICE else None
        k = with_logical_constraint(k, ("batch", kv_length, "kv_heads", "head_dim"))
        v = with_logical_constraint(v, ("batch", kv_length, "kv_heads", "head_dim"))
        window = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        new_cache = None
        if kv_cache is not None:
            new_cache = tuple(
                with_logical_constraint(
                    jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, axis=1),
                    ("batch", "kv_length", "kv_heads", "head_dim"),
                )
                for c, new in zip(kv_cache, (k, v))
            )
        if kv_segment_ids is not None:
            if new_cache is None:
                raise ValueError("Attention: kv_segment_ids is for decoding against a kv_cache")
            out = dot_product_attention(
                q, *new_cache, causal=False, segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids, implementation=self.implementation,
                interpret=self.interpret, shard_axes=shard_axes,
            )
        else:
            out = dot_product_attention(
                q, k, v, causal=self.causal, segment_ids=segment_ids,
                implementation=self.implementation, interpret=self.interpret,
                shard_axes=shard_axes, **window,
            )
        out = with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = Dense(
            features=(x.shape[-1],), in_axes=("heads", "head_dim"), out_axes=("embed",),
            use_bias=self.out_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name="out",
        )(out)
        return out if new_cache is None else (out, new_cache)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Llama / Mistral / Qwen2): down(silu(gate(x)) * up(x))."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = _mlp_dense(self, "gate", self.mlp_dim, "embed", "mlp", use_bias=False)(x)
        up = _mlp_dense(self, "up", self.mlp_dim, "embed", "mlp", use_bias=False)(x)
        h = with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _mlp_dense(self, "down", x.shape[-1], "mlp", "embed", use_bias=False)(h)


def _mlp_dense(mlp: nn.Module, name: str, features: int, in_axis: str, out_axis: str,
               use_bias: bool) -> "Dense":
    """A feed-forward projection that inherits the MLP module's dtypes and initialiser."""
    return Dense(features=(features,), in_axes=(in_axis,), out_axes=(out_axis,), use_bias=use_bias,
                 dtype=mlp.dtype, param_dtype=mlp.param_dtype, kernel_init=mlp.kernel_init,
                 name=name)


class MLP(nn.Module):
    """BERT feed-forward: down(act(up(x))) with biases."""

    mlp_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _mlp_dense(self, "up", self.mlp_dim, "embed", "mlp", use_bias=True)(x)
        h = with_logical_constraint(activation(self.activation)(h), ("batch", "length", "mlp"))
        return _mlp_dense(self, "down", x.shape[-1], "mlp", "embed", use_bias=True)(h)


def exact_gelu(x: jax.Array) -> jax.Array:
    """``x * Phi(x)`` written with ``erf``, as torch computes it.

    ``jax.nn.gelu(approximate=False)`` uses ``erfc``, which XLA:CPU evaluates about 4x
    slower than ``erf`` (16 vs 4 ms on a MiniLM [4096, 1536] activation, 0.5 s of a
    MiniLM training step); the erf form is within 1.1e-6 of float64 there.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Hugging Face names: "gelu" is the exact (erf) GELU, the tanh forms are approximate.
    "gelu": exact_gelu,
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ------------------------------------------------------------------- layer stacks

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # keep every activation (no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(policy: str, field: str = "remat_policy") -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{field}={policy!r} is not one of {sorted(REMAT_POLICIES)}")


def apply_stack(block: type[nn.Module], num_layers: int, *, remat_policy: str, scan: bool,
                x: jax.Array, args: tuple, per_layer=None, **block_kwargs):
    """Runs ``num_layers`` copies of ``block`` over ``x``; blocks return ``(x, None)``.

    Unscanned layers are named ``layer_{i}``; scanned ones share one ``layers``
    scope whose parameters gain a leading ``layers`` axis. Call from inside a
    compact method.

    ``per_layer`` (e.g. a KV cache): one more argument that differs by layer,
    a pytree stacked on a leading layer axis when ``scan`` and a sequence of
    ``num_layers`` pytrees otherwise. Blocks then return ``(x, y)`` and the call
    returns ``(x, ys)`` with ``ys`` laid out as ``per_layer``.
    """
    check_remat_policy(remat_policy)
    if remat_policy != "none":
        # prevent_cse only matters outside scan (scan already blocks CSE across steps).
        block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        extra = () if per_layer is None else (0,)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args) + extra,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if per_layer is None:
            x, _ = scanned(**block_kwargs, name="layers")(x, *args)
            return x
        return scanned(**block_kwargs, name="layers")(x, *args, per_layer)
    if per_layer is None:
        for i in range(num_layers):
            x, _ = block(**block_kwargs, name=f"layer_{i}")(x, *args)
        return x
    if len(per_layer) != num_layers:
        raise ValueError(f"apply_stack: per_layer has {len(per_layer)} entries for {num_layers} layers")
    ys = []
    for i in range(num_layers):
        x, y = block(**block_kwargs, name=f"layer_{i}")(x, *args, per_layer[i])
        ys.append(y)
    return x, type(per_layer)(ys) if isinstance(per_layer, tuple) else ys
