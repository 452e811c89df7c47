"""Compiling for the real targets on this CPU host: TPU slices (libtpu) and H100s.

Interpret mode (the other Pallas tests) checks the kernels' numbers; these check
that the hardware's compilers accept them (Mosaic TPU in libtpu, Mosaic GPU through
ptxas for sm_90a), that on a mesh each device's kernel sees its own shard with no
gather of q / k / v, and that the sharded kernels give one device's numbers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t5x_like import compile_report, host_platform, partitioning as part, targets
from t5x_like.compile_report import AttentionCase
from t5x_like.kernels.attention import ShardAxes, dot_product_attention

# ----------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "name, platform, count, kind, hbm_gib",
    [
        ("v5e:2x2", "tpu", 4, "TPU v5 lite", 16),
        ("v5p:2x2x1", "tpu", 4, "TPU v5", 95),
        ("v6e:4x4", "tpu", 16, "TPU v6 lite", 32),
        ("v4:2x2x1", "tpu", 8, "TPU v4", 16),  # a device per TensorCore, two a chip
        ("h100:8", "gpu", 8, "NVIDIA H100 80GB HBM3", 84978434048 / 2**30),
        ("h200:16", "gpu", 16, "NVIDIA H200", 150754820096 / 2**30),
    ],
)
def test_targets_give_devices_and_memory(name, platform, count, kind, hbm_gib):
    target = targets.get(name)
    assert (target.platform, target.num_devices, target.device_kind) == (platform, count, kind)
    assert target.hbm_bytes / 2**30 == pytest.approx(hbm_gib)
    assert jax.default_backend() == "cpu"  # no TPU / GPU client was started


def test_gpu_targets_span_hosts_of_eight():
    assert {d.process_index for d in targets.get("h200:16").devices} == {0, 1}
    assert targets.get("cpu").platform == "cpu"


@pytest.mark.parametrize(
    "name, message",
    [("v9z:2x2", "libtpu refused the topology"), ("h100:12", "multiple of 8"),
     ("tpu", "not known"), ("cpu:99", "8 CPU devices")],
)
def test_bad_target_names_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        targets.get(name)


def test_cpu_runtime_is_the_default_without_a_chip(monkeypatch):
    monkeypatch.setattr(host_platform, "has_accelerator", lambda: False)
    env = {}
    assert host_platform.configure(env) and env["JAX_PLATFORMS"] == "cpu"
    env = {"JAX_PLATFORMS": "cuda"}
    assert not host_platform.configure(env) and env["JAX_PLATFORMS"] == "cuda"
    monkeypatch.setattr(host_platform, "has_accelerator", lambda: True)
    env = {}
    assert not host_platform.configure(env) and "JAX_PLATFORMS" not in env


# --------------------------------------- sharded kernels equal one device (interpret)

SHARDED_LAYOUTS = {
    "data8": {"data": 8},
    "data2-tensor4": {"data": 2, "tensor": 4},
    "fsdp2-tensor2-data2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _operands(dtype=jnp.float32, batch=8, length=128, heads=8, kv_heads=4, head_dim=64):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, length, heads, head_dim))
    k, v = (rng.standard_normal((batch, length, kv_heads, head_dim)) for _ in range(2))
    # Packed rows: documents of varied lengths, one padding tail.
    seg = np.minimum(np.arange(length)[None] // (17 + 9 * np.arange(batch)[:, None]), 3)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(seg, jnp.int32),)


def _value_and_grads(implementation, q, k, v, seg):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, causal=True, segment_ids=seg,
                                    implementation=implementation, interpret=True)
        return jnp.sum(out * jnp.cos(out)), out  # a loss whose cotangent varies per element

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out,) + grads


@functools.lru_cache(maxsize=None)
def _one_device(implementation):
    return jax.jit(functools.partial(_value_and_grads, implementation))(*_operands())


# The TPU kernel's interpreter. Mosaic GPU's interpreter deadlocks when several CPU
# devices run it at once (its threads wait in _allocate_buffer_for_all_threads), so
# the GPU kernel's sharding is checked by the compile for 8 H100s below: both
# kernels go through the same shard_map wrapper (attention._per_device).
@pytest.mark.parametrize("layout", list(SHARDED_LAYOUTS))
def test_sharded_pallas_equals_one_device(devices, layout, implementation="pallas_tpu"):
    mesh = part.make_mesh(part.MeshShape(**SHARDED_LAYOUTS[layout]), devices=devices)
    want = _one_device(implementation)
    qkv = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    ids = NamedSharding(mesh, P(("data", "fsdp"), None))
    q, k, v, seg = _operands()
    args = [jax.device_put(x, s) for x, s in zip((q, k, v, seg), (qkv, qkv, qkv, ids))]
    with jax.set_mesh(mesh):
        step = jax.jit(functools.partial(_value_and_grads, implementation))
        got = step(*args)
        hlo = step.lower(*args).compile().as_text()
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5,
                                   err_msg=name)
    assert compile_report.collectives(hlo)["all-gather"] == 0
