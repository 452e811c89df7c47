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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t5x_like import compile_report, host_platform, targets
from t5x_like import partitioning as part
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
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keep this process's setting
    monkeypatch.setattr(host_platform, "jax_backends_started", lambda: True)
    env = {}
    assert not host_platform.configure(env) and not env  # too late once jax's clients run
    monkeypatch.setattr(host_platform, "jax_backends_started", lambda: False)
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


# ------------------------------------------- compiled for the chips: sharded kernels


def _local(case: AttentionCase, layout: dict) -> tuple[int, int, int]:
    """Batch, heads and kv heads of one device's shard under ``layout``."""
    batch_parts = layout.get("data", 1) * layout.get("fsdp", 1)
    tensor = layout.get("tensor", 1)
    return case.batch // batch_parts, case.heads // tensor, case.kv_heads // tensor


SHARDED_CASE = AttentionCase(batch=8, length=1024, heads=8, kv_heads=4, head_dim=128,
                             causal=True, segmented=True)


@pytest.mark.parametrize(
    "target, layout",
    [("v5e:2x2", {"data": 4}), ("v5e:2x2", {"data": 1, "fsdp": 2, "tensor": 2}),
     ("h100:8", {"data": 8}), ("h100:8", {"data": 2, "fsdp": 2, "tensor": 2})],
    ids=["v5e-data4", "v5e-fsdp2-tensor2", "h100x8-data8", "h100x8-data2-fsdp2-tensor2"],
)
def test_pallas_compiles_sharded_with_no_gather(target, layout):
    """The real compiler (XLA:TPU + Mosaic, or XLA:GPU + Mosaic GPU + ptxas) takes the
    sharded call, and each device's kernels see their shard: no all-gather at all."""
    compiled, _ = compile_report.attention_program(
        targets.get(target), part.MeshShape(**layout), SHARDED_CASE)
    hlo = compiled.as_text()
    assert compile_report.collectives(hlo)["all-gather"] == 0
    calls = {c.name: c.shapes for c in compile_report.kernel_calls(hlo)}
    assert sorted(calls) == ["t5x_like_flash_dkv", "t5x_like_flash_dq", "t5x_like_flash_fwd"]
    b, h, kh = _local(SHARDED_CASE, layout)
    t, d = SHARDED_CASE.length, SHARDED_CASE.head_dim
    assert calls["t5x_like_flash_fwd"][0] == (b, h, t, d)
    assert calls["t5x_like_flash_dq"][0] == (b, h, t, d)
    assert calls["t5x_like_flash_dkv"] == ((b, kh, t, d), (b, kh, t, d))


def test_cudnn_is_partitioned_by_xla_on_eight_h100s():
    compiled, _ = compile_report.attention_program(
        targets.get("h100:8"), part.MeshShape(data=8),
        dataclasses.replace(SHARDED_CASE, segmented=False), implementation="cudnn")
    hlo = compiled.as_text()
    assert compile_report.collectives(hlo)["all-gather"] == 0
    calls = compile_report.kernel_calls(hlo)
    assert [c.target for c in calls] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    assert calls[0].shapes[0] == (1, 8, 1024, 128)  # one row of the 8 per device


def test_kernel_refuses_heads_that_do_not_divide_the_mesh():
    case = dataclasses.replace(SHARDED_CASE, heads=6, kv_heads=3)
    with pytest.raises(ValueError, match="kv_heads=3 does not divide mesh axes .'tensor',. .size 2."):
        compile_report.attention_program(
            targets.get("v5e:2x2"), part.MeshShape(data=2, tensor=2), case)


@pytest.mark.parametrize(
    "target, layout, implementation",
    [("v5e:2x2", {"data": 1, "sequence": 4}, "pallas"),
     ("h100:8", {"data": 2, "sequence": 4}, "ring")],
    ids=["v5e-sequence4-pallas", "h100x8-data2-sequence4-ring"],
)
@pytest.mark.slow
def test_sequence_split_compiles_as_a_ring(target, layout, implementation):
    """Ring attention over `sequence` compiles for the chips; Pallas on such a mesh
    becomes the ring (a kernel on a length shard would miss the other keys)."""
    case = dataclasses.replace(SHARDED_CASE, length=2048, heads=4, kv_heads=2)
    compiled, _ = compile_report.attention_program(
        targets.get(target), part.MeshShape(**layout), case, implementation=implementation)
    hlo = compiled.as_text()
    counts = compile_report.collectives(hlo)
    assert counts["all-gather"] == 0
    assert counts["collective-permute"] >= 2  # k / v forward round the ring, dk / dv back
    assert compile_report.kernel_calls(hlo) == []


# ------------------------------------------------ compiled for the chips: the kernels

# The shapes the recipes run: packed long-context GQA decoders, a 32K row, encoders.
KERNEL_CASES = [
    AttentionCase(batch=1, length=8192, heads=8, kv_heads=2, head_dim=128, segmented=True),
    AttentionCase(batch=1, length=32768, heads=2, kv_heads=2, head_dim=128),
    AttentionCase(batch=4, length=512, heads=4, kv_heads=4, head_dim=64, causal=False,
                  segmented=True),
]


# Edge cases on one chip each: fp32, a sliding window, head_dim 256, q_len != kv_len,
# lengths that are not whole blocks.
TPU_EDGE_CASES = [
    AttentionCase(batch=1, length=2048, heads=2, kv_heads=1, head_dim=64, dtype=jnp.float32,
                  sliding_window=300),
    AttentionCase(batch=1, length=700, heads=2, kv_heads=2, head_dim=256, causal=False,
                  segmented=True),
]
GPU_EDGE_CASES = [
    AttentionCase(batch=1, length=256, heads=2, kv_heads=1, head_dim=128, dtype=jnp.float16,
                  sliding_window=100),
    AttentionCase(batch=2, length=100, kv_length=300, heads=2, kv_heads=2, head_dim=256,
                  causal=False, segmented=True),
]


@pytest.mark.parametrize(
    "target, case",
    [("v5e:2x2", c) for c in KERNEL_CASES + TPU_EDGE_CASES]
    + [(t, c) for t in ("v5p:2x2x1", "v6e:2x2") for c in KERNEL_CASES[:2]],
    ids=lambda x: x.label() if isinstance(x, AttentionCase) else x,
)
def test_pallas_tpu_kernel_compiles_in_libtpu(target, case):
    """Mosaic TPU compiles forward, dq and dk/dv for one chip of each generation."""
    compiled, _ = compile_report.attention_program(
        targets.get(target), part.MeshShape(data=1), case, devices=1)
    calls = compile_report.kernel_calls(compiled.as_text())
    assert [c.target for c in calls] == ["tpu_custom_call"] * 3


@pytest.mark.parametrize("case", KERNEL_CASES + GPU_EDGE_CASES, ids=lambda c: c.label())
def test_pallas_gpu_kernel_compiles_through_ptxas(monkeypatch, case):
    """Mosaic GPU lowers to PTX and ptxas compiles it for sm_90a: its report names
    each of the three kernels."""
    monkeypatch.setenv("MOSAIC_GPU_DUMP_PTXAS", "1")
    with compile_report.capture_output() as lines:
        compiled, _ = compile_report.attention_program(
            targets.get("h100:1"), part.MeshShape(data=1), case)
    assert any("for 'sm_90a'" in line for line in lines)
    figures = compile_report.ptxas_figures(lines)
    assert sorted(figures) == ["t5x_like_flash_dkv", "t5x_like_flash_dq", "t5x_like_flash_fwd"]
    assert all(0 < f.registers <= 255 for f in figures.values())
    assert len(compile_report.kernel_calls(compiled.as_text())) == 3


# --------------------------------------------- compiled for the chips: whole steps

DECODER = dict(vocab_size=1024, embed_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=64, mlp_dim=512, attention="pallas", dtype="bfloat16",
               scan_layers=True, remat_policy="full", max_position_embeddings=2048)
ENCODER = dict(vocab_size=1024, embed_dim=256, num_layers=1, num_heads=4, mlp_dim=512,
               attention="pallas", dtype="bfloat16", max_position_embeddings=512)


def _attention_activations(batch: int, length: int, heads: int) -> set[tuple[int, ...]]:
    """q / k / v shapes, tokens- and heads-major, with the global batch."""
    return {(batch, length, heads, 64) for heads in (heads, 2)} | {
        (batch, heads, length, 64) for heads in (heads, 2)}


@pytest.mark.parametrize(
    "target, layout",
    [("v5e:2x2", {"data": 4}), ("v5p:2x2x1", {"data": 1, "fsdp": 4}), ("h100:8", {"data": 8})],
    ids=["v5e-data4", "v5p-fsdp4", "h100x8-data8"],
)
@pytest.mark.slow
def test_decoder_train_step_with_pallas_compiles(target, layout):
    """The whole LM step (forward, backward, AdamW), packed rows, scanned layers, full
    remat: compiled, each device's kernels on its rows, no q / k / v gathered."""
    from t5x_like.models.decoder import DecoderConfig
    from t5x_like.train_tasks import LanguageModelTask

    batch, length = 8, 2048
    row = ((batch, length), jnp.int32)
    compiled, _ = compile_report.train_step_program(
        targets.get(target), part.MeshShape(**layout),
        LanguageModelTask(DecoderConfig(**DECODER), loss_chunk_size=256),
        {"tokens": row, "segment_ids": row, "positions": row,
         "loss_weights": ((batch, length), jnp.float32)})
    hlo = compiled.as_text()
    rows = batch // (layout.get("data", 1) * layout.get("fsdp", 1))
    calls = compile_report.kernel_calls(hlo)
    assert {c.name for c in calls} == {"t5x_like_flash_fwd", "t5x_like_flash_dq",
                                       "t5x_like_flash_dkv"}
    assert all(c.shapes[0][0] == rows for c in calls)
    gathered = set(compile_report.gathered_shapes(hlo))
    assert not gathered & _attention_activations(batch, length, 4)
    if "fsdp" not in layout:
        assert not gathered
    assert targets.memory_report(compiled, targets.get(target))["fits"]


@pytest.mark.parametrize(
    "target, layout",
    [("v5e:2x2", {"data": 2, "tensor": 2}), ("h100:8", {"data": 8})],
    ids=["v5e-data2-tensor2", "h100x8-data8"],
)
@pytest.mark.slow
def test_dual_encoder_train_step_with_pallas_compiles(target, layout):
    """The contrastive step (queries and passages with a hard negative, negatives
    gathered across devices): the kernels run on each device's rows and heads."""
    from t5x_like.models.encoder import EncoderConfig
    from t5x_like.train_tasks import DualEncoderTask

    batch, group, q_len, p_len = 8, 2, 64, 128
    compiled, _ = compile_report.train_step_program(
        targets.get(target), part.MeshShape(**layout), DualEncoderTask(EncoderConfig(**ENCODER)),
        {"query_tokens": ((batch, q_len), jnp.int32), "query_mask": ((batch, q_len), jnp.int32),
         "passage_tokens": ((batch, group, p_len), jnp.int32),
         "passage_mask": ((batch, group, p_len), jnp.int32)})
    hlo = compiled.as_text()
    parts = layout.get("data", 1) * layout.get("fsdp", 1)
    heads = 4 // layout.get("tensor", 1)
    local = {(batch // parts, heads, q_len, 64), (batch * group // parts, heads, p_len, 64)}
    calls = compile_report.kernel_calls(hlo)
    assert {c.shapes[0] for c in calls if c.name == "t5x_like_flash_fwd"} == local
    gathered = set(compile_report.gathered_shapes(hlo))
    assert not gathered & (_attention_activations(batch, q_len, 4)
                           | _attention_activations(batch * group, p_len, 4))
    # What is gathered: the embeddings for cross-device negatives (rows x 256), never
    # an activation with a length.
    assert all(len(shape) <= 3 for shape in gathered)


# ------------------------------------------------------ edges of the per-device path


def test_sharded_cross_length_without_segments_equals_one_device(devices):
    """q_len != kv_len (decoding against a cache), no segment ids, data 2 x tensor 4."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((8, 16, 8, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((8, 256, 4, 64)), jnp.float32) for _ in range(2))
    attend = functools.partial(dot_product_attention, implementation="pallas_tpu",
                               interpret=True)
    want = jax.jit(attend)(q, k, v)
    mesh = part.make_mesh(part.MeshShape(data=2, tensor=4), devices=devices)
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        got = jax.jit(attend)(*(jax.device_put(x, spec) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "layout, kwargs, message",
    [({"data": 2, "tensor": 4}, {"shard_axes": ShardAxes(kv_heads=())},
      "heads are split over .'tensor',. but kv_heads over ()"),
     ({"data": 2, "fsdp": 4}, {"shard_axes": ShardAxes(batch=("data",), length=("fsdp",))},
      "length is split over mesh axes .'fsdp',.; ring attention runs over the 'sequence'"),
     ({"data": 2, "sequence": 4}, {"sliding_window": 16, "causal": True},
      "with sliding_window on a mesh that splits the length"),
     ],
    ids=["heads-vs-kv-heads", "length-not-sequence", "window-on-sequence"],
)
def test_per_device_layouts_it_cannot_run_are_refused(devices, layout, kwargs, message):
    mesh = part.make_mesh(part.MeshShape(**layout), devices=devices)
    q = jax.ShapeDtypeStruct((8, 64, 8, 64), jnp.float32)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=message):
        jax.jit(functools.partial(dot_product_attention, implementation="pallas",
                                  interpret=True, **kwargs)).trace(q, q, q)


def test_gathered_shapes_reads_sync_async_and_combined_gathers():
    hlo = "\n".join([
        "  %a = bf16[8,2048,4,64]{3,2,1,0} all-gather(bf16[1,2048,4,64]{3,2,1,0} %x), dims={0}",
        "  %b = (bf16[1,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(bf16[1,16]{1,0} %y)",
        "  %c = (f32[2]{0}, f32[4,3]{1,0}) all-gather(f32[1]{0} %z, f32[2,3]{1,0} %w)",
        "  %d = bf16[8,16]{1,0} all-gather-done((bf16[1,16]{1,0}, bf16[8,16]{1,0}) %b)",
    ])
    assert compile_report.gathered_shapes(hlo) == [(8, 2048, 4, 64), (8, 16), (2,), (4, 3)]
    assert compile_report.collectives(hlo)["all-gather"] == 3


def test_hopper_is_recognised_from_an_abstract_mesh():
    """Inside a shard_map with only the abstract mesh set, the device has a kind but no
    compute capability; an H100 must still pass the Hopper check."""
    from t5x_like.kernels import compile_target, pallas_gpu

    mesh = targets.get("h100:8").mesh(part.MeshShape(data=8))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert compile_target.platform() == "gpu"
        pallas_gpu._check_hopper()


@pytest.mark.slow
def test_trainer_initialises_a_pallas_model_outside_the_mesh(devices):
    """The init example (one row, no mesh) runs the plain attention: parameters do not
    depend on the backend, and a per-device kernel there would meet the whole program."""
    from t5x_like.models.decoder import DecoderConfig
    from t5x_like.optimizers import OptimizerConfig
    from t5x_like.train_tasks import LanguageModelTask
    from t5x_like.trainer import Trainer

    config = dict(DECODER, num_layers=1, scan_layers=False, remat_policy="none", dtype="float32")
    task = LanguageModelTask(DecoderConfig(**config))
    mesh = part.make_mesh(part.MeshShape(data=8), devices=devices)
    state = Trainer(task, OptimizerConfig(), mesh, total_steps=1).init_state()
    reference = LanguageModelTask(DecoderConfig(**dict(config, attention="xla")))
    import flax

    want = flax.linen.unbox(reference.init_model_params(jax.random.PRNGKey(0)))
    assert jax.tree.map(jnp.shape, state.params["model"]) == jax.tree.map(jnp.shape, want)
