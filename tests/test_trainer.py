"""The trainer: the same steps on 1 and 8 devices, accumulation, LoRA freezing,
non-finite steps, checkpoints across mesh layouts, preemption."""

import os
import signal

import jax
import numpy as np
import pytest

from t5x_like import checkpoints
from t5x_like import partitioning as part
from t5x_like.callbacks import EvalHook
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.encoder import EncoderConfig
from t5x_like.models.lora import LoraConfig
from t5x_like.objectives.contrastive import ContrastiveConfig
from t5x_like.optimizers import OptimizerConfig
from t5x_like.train_tasks import DualEncoderTask, LanguageModelTask
from t5x_like.trainer import Trainer

DECODER = DecoderConfig(vocab_size=128, embed_dim=32, num_layers=1, num_heads=8, num_kv_heads=4,
                        head_dim=4, mlp_dim=64, max_position_embeddings=64)
ENCODER = EncoderConfig(vocab_size=128, embed_dim=32, num_layers=1, num_heads=4, mlp_dim=64,
                        max_position_embeddings=64, dropout_rate=0.0)
OPTIMIZER = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, clip_norm=1.0)


def lm_batches(n, batch=8, length=32, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(1, 128, size=(batch, length)).astype(np.int32)
        cut = rng.integers(4, length - 4, size=batch)
        segments = np.where(np.arange(length)[None] < cut[:, None], 1, 2).astype(np.int32)
        segments[:, -3:] = 0  # padding
        positions = np.where(segments == 1, np.arange(length), np.arange(length) - cut[:, None])
        out.append({"tokens": tokens * (segments > 0), "segment_ids": segments,
                    "positions": np.maximum(positions, 0).astype(np.int32),
                    "loss_weights": (segments > 0).astype(np.float32)})
    return out


def contrastive_batches(n, batch=8, group=3, seed=0):
    rng = np.random.default_rng(seed)

    def rows(shape):
        tokens = rng.integers(1, 128, size=shape)
        mask = (np.arange(shape[-1]) < rng.integers(3, shape[-1] + 1, size=shape[:-1])[..., None])
        return (tokens * mask).astype(np.int32), mask.astype(np.int32)

    out = []
    for _ in range(n):
        qt, qm = rows((batch, 12))
        pt, pm = rows((batch, group, 16))
        out.append({"query_tokens": qt, "query_mask": qm, "passage_tokens": pt, "passage_mask": pm})
    return out


def run_steps(task, mesh_shape, batches, devices=None, **kwargs):
    mesh = part.make_mesh(part.MeshShape(**mesh_shape), devices=devices)
    trainer = Trainer(task, OPTIMIZER, mesh, total_steps=10, **kwargs)
    state = trainer.init_state()
    losses = []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


LAYOUTS = [dict(data=8), dict(data=2, fsdp=2, tensor=2)]


@pytest.mark.parametrize("name", ["lm", "dual_encoder"])
@pytest.mark.slow
def test_same_losses_on_one_and_eight_devices(devices, name):
    if name == "lm":
        task, batches = LanguageModelTask(DECODER, loss_chunk_size=8), lm_batches(1) * 3
    else:
        task = DualEncoderTask(ENCODER, ContrastiveConfig(temperature=0.05), pooling="mean")
        batches = contrastive_batches(1) * 3
    _, _, single = run_steps(task, dict(data=1), batches, devices=devices[:1])
    for layout in LAYOUTS:
        _, state, losses = run_steps(task, layout, batches)
        np.testing.assert_allclose(losses, single, rtol=2e-5, err_msg=str(layout))
    assert single[2] < single[0]  # it learns


@pytest.mark.slow
def test_context_parallel_lm_steps_equal_one_device(devices):
    """Ring attention with rows split 4 ways over `sequence` and parameters / batch over
    fsdp (the recipe's layout): three training steps give the unsharded losses. (Data x
    sequence and tensor x sequence: tests/test_ring_attention.py.)"""
    import dataclasses

    ring = LanguageModelTask(dataclasses.replace(DECODER, attention="ring"), loss_chunk_size=8)
    batches = lm_batches(1, batch=2) * 3
    _, _, single = run_steps(LanguageModelTask(DECODER, loss_chunk_size=8), dict(data=1),
                             batches, devices=devices[:1])
    _, _, losses = run_steps(ring, dict(fsdp=2, sequence=4), batches)
    np.testing.assert_allclose(losses, single, rtol=2e-5)


@pytest.mark.slow
def test_accumulation_equals_one_large_batch(devices):
    task = LanguageModelTask(DECODER, loss_chunk_size=8)
    batches = lm_batches(2, batch=16)
    _, big, big_losses = run_steps(task, dict(data=8), batches)
    _, acc, acc_losses = run_steps(task, dict(data=8), batches, accumulation=2)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        # Adam turns reduction-order noise in near-zero gradients into update noise of up
        # to lr = 3e-3: a fresh-clone suite run saw 4.2e-6 on 1 of 2048 elements.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradient_cache_step_equals_plain_step(devices):
    batches = contrastive_batches(2, batch=16)
    plain = DualEncoderTask(ENCODER, ContrastiveConfig(temperature=0.05))
    cached = DualEncoderTask(ENCODER, ContrastiveConfig(temperature=0.05), grad_cache_chunks=2)
    _, s1, l1 = run_steps(plain, dict(data=8), batches)
    _, s2, l2 = run_steps(cached, dict(data=8), batches)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    # Adam turns ~1e-7 gradient differences on near-zero gradients into up to lr-sized
    # moves, so parameters agree to a fraction of the learning rate, not to 1e-5.
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=0.3 * 3e-3)


@pytest.mark.slow
def test_lora_trains_adapters_only(devices):
    task = DualEncoderTask(DECODER, ContrastiveConfig(temperature=0.02), pooling="last",
                           lora=LoraConfig(rank=4, alpha=8.0))
    trainer, state, losses = run_steps(task, dict(data=4, tensor=2), contrastive_batches(2))
    fresh = trainer.init_state()
    for a, b in zip(jax.tree.leaves(state.params["model"]), jax.tree.leaves(fresh.params["model"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state.params["lora"]), jax.tree.leaves(fresh.params["lora"]))]
    assert all(moved)
    # Adam moments exist for the adapters only.
    opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
    lora_size = sum(x.size for x in jax.tree.leaves(state.params["lora"]))
    assert opt_size <= 2 * lora_size + 16


@pytest.mark.slow
def test_lora_with_gradient_caching_equals_the_plain_step(devices):
    """Gradient caching over a frozen base carries gradients for the adapters only; the
    losses and the adapters it trains are the single pass's."""
    import dataclasses

    plain = DualEncoderTask(DECODER, ContrastiveConfig(temperature=0.02), pooling="last",
                            lora=LoraConfig(rank=4, alpha=8.0))
    cached = dataclasses.replace(plain, grad_cache_chunks=2)
    batches = contrastive_batches(2)
    _, s1, l1 = run_steps(plain, dict(data=4, tensor=2), batches)
    _, s2, l2 = run_steps(cached, dict(data=4, tensor=2), batches)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s2.params["lora"]), jax.tree.leaves(s1.params["lora"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=0.3 * 3e-3)


def test_frozen_base_is_kept_in_the_compute_dtype(devices):
    import dataclasses

    bf16 = dataclasses.replace(DECODER, dtype="bfloat16")
    mesh = part.make_mesh(part.MeshShape(data=8))
    for lora, want in ((LoraConfig(rank=4), "bfloat16"), (LoraConfig(rank=4, base_dtype="float32"),
                                                          "float32")):
        task = DualEncoderTask(bf16, ContrastiveConfig(), pooling="last", lora=lora)
        state = Trainer(task, OPTIMIZER, mesh, total_steps=2).abstract_state
        assert {str(x.dtype) for x in jax.tree.leaves(state.params["model"])} == {want}
        assert {str(x.dtype) for x in jax.tree.leaves(state.params["lora"])} == {"float32"}
    full = Trainer(DualEncoderTask(bf16, ContrastiveConfig(), pooling="last"), OPTIMIZER, mesh,
                   total_steps=2).abstract_state  # no LoRA: the trained base stays fp32
    assert {str(x.dtype) for x in jax.tree.leaves(full.params["model"])} == {"float32"}


@pytest.mark.slow
def test_learnt_temperature_is_a_trained_parameter(devices):
    task = DualEncoderTask(ENCODER, ContrastiveConfig(temperature=0.05, learn_temperature=True))
    _, state, _ = run_steps(task, dict(data=8), contrastive_batches(2))
    assert float(state.params["log_scale"]) != pytest.approx(np.log(20.0), abs=1e-7)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_reported(devices, tmp_path):
    task = LanguageModelTask(DECODER, loss_chunk_size=8)
    batches = lm_batches(3)
    batches[1]["loss_weights"][0, 5] = np.nan
    mesh = part.make_mesh(part.MeshShape(data=8))
    trainer = Trainer(task, OPTIMIZER, mesh, total_steps=3)
    state = trainer.init_state()
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite loss") as info:
        trainer.fit(state, batches, workdir=tmp_path, show_progress=False)
    saved = np.load(tmp_path / "nonfinite_batch_step2.process0.npz")
    assert np.isnan(saved["loss_weights"][0, 5]) and "saved to" in str(info.value)

    skipping = Trainer(task, OPTIMIZER, mesh, total_steps=3, on_nonfinite="skip")
    state = skipping.init_state()
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = skipping.step(state, batches[1])
    assert not bool(metrics["finite"]) and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_layout(devices, tmp_path):
    task = LanguageModelTask(DECODER, loss_chunk_size=8)
    trainer, state, _ = run_steps(task, dict(data=8), lm_batches(2))
    ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", save_every=1)
    ckpt.save(2, state, config={"note": "x"})
    ckpt.close()

    mesh = part.make_mesh(part.MeshShape(data=2, tensor=4))
    other = Trainer(task, OPTIMIZER, mesh, total_steps=10)
    restored = checkpoints.Checkpointer(tmp_path / "ckpt").restore(other.abstract_state)
    assert int(restored.step) == 2
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    q = restored.params["model"]["layer_0"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == other.param_shardings["model"]["layer_0"]["attention"]["query"]["kernel"].spec
    assert "tensor" in str(q.sharding.spec)
    # The restored state trains on the new layout.
    other.step(restored, lm_batches(1, seed=5)[0])
    assert checkpoints.Checkpointer(tmp_path / "ckpt").restore_config() == {"note": "x"}


@pytest.mark.slow
def test_sigterm_saves_and_stops(devices, tmp_path):
    task = LanguageModelTask(DECODER, loss_chunk_size=8)
    mesh = part.make_mesh(part.MeshShape(data=8))
    trainer = Trainer(task, OPTIMIZER, mesh, total_steps=6)
    watcher = checkpoints.PreemptionWatcher()
    ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", save_every=100)
    sent = EvalHook("preempt", every=2, fn=lambda s: os.kill(os.getpid(), signal.SIGTERM) or {})
    try:
        state = trainer.fit(trainer.init_state(), lm_batches(6), checkpointer=ckpt,
                            preemption=watcher, hooks=(sent,), show_progress=False)
    finally:
        watcher.close()
    assert int(state.step) == 2
    assert ckpt.all_steps() == [2]


# ------------------------------------------------------------------- distillation


def teacher_batches(n, batch=16, group=3, seed=0):
    rng = np.random.default_rng(seed + 100)
    out = contrastive_batches(n, batch=batch, group=group, seed=seed)
    for b in out:
        b["teacher_scores"] = (rng.normal(size=(batch, group)) * 3).astype(np.float32)
    return out


DISTILL = ContrastiveConfig(temperature=0.05, kd_weight=1.0, contrastive_weight=0.2,
                            teacher_temperature=2.0)


def distillation_reference(task, params, batch, micro_batches=1):
    """The step's loss in float64 from the definitions (tests/test_objectives_contrastive.py),
    on the model's embeddings at ``params``: each micro-batch (rows j, j + k, ..., as the
    trainer splits them) scores its queries against its own passages only."""
    from test_objectives_contrastive import reference

    rng = jax.random.key(0)  # unused: the encoder has no dropout
    losses = []
    for j in range(micro_batches):
        rows = slice(j, None, micro_batches)
        b, g, length = batch["passage_tokens"][rows].shape
        q = task.encode(params, {"tokens": batch["query_tokens"][rows],
                                 "mask": batch["query_mask"][rows]}, rng)
        p = task.encode(params, {"tokens": batch["passage_tokens"][rows].reshape(b * g, length),
                                 "mask": batch["passage_mask"][rows].reshape(b * g, length)}, rng)
        losses.append(reference(np.asarray(q), np.asarray(p).reshape(b, g, -1), 1 / DISTILL.temperature,
                                batch["teacher_scores"][rows], kd_weight=DISTILL.kd_weight,
                                t_temp=DISTILL.teacher_temperature,
                                c_weight=DISTILL.contrastive_weight))
    return float(np.mean(np.concatenate(losses)))


@pytest.mark.parametrize("mode", ["plain", "grad_cache", "accumulation"])
@pytest.mark.slow
def test_distillation_steps_match_the_float64_reference(devices, mode):
    """Steps with teacher scores through DualEncoderTask and the trainer: every step's loss
    is the float64 reference at that step's parameters (KD + weighted InfoNCE)."""
    chunks = 2 if mode == "grad_cache" else 1
    task = DualEncoderTask(ENCODER, DISTILL, grad_cache_chunks=chunks)
    micro = 2 if mode == "accumulation" else 1
    mesh = part.make_mesh(part.MeshShape(data=8))
    trainer = Trainer(task, OPTIMIZER, mesh, total_steps=10, accumulation=micro)
    state = trainer.init_state()
    losses, expected = [], []
    for batch in teacher_batches(3):
        expected.append(distillation_reference(task, jax.device_get(state.params), batch, micro))
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["kd"]) > 0
    np.testing.assert_allclose(losses, expected, rtol=2e-5)
    assert losses[2] < losses[0]  # it learns from the teacher
