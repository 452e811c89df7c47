"""Checkpoints on resume: an unreadable newest step is passed over and moved aside, never
deleted; a changed config is refused or warned about (``t5x_like.resume_check``). Through
``train.train``: tests/test_train_cli.py."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import checkpoints
from t5x_like.resume_check import check_resume, config_changes

ABSTRACT = {"w": jax.ShapeDtypeStruct((50_000,), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}


def three_steps(directory):
    ckpt = checkpoints.Checkpointer(directory, save_every=1, async_save=False)
    noise = np.random.default_rng(0).normal(size=50_000).astype(np.float32)  # incompressible
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.asarray(noise * step), "b": jnp.full((3,), float(step))},
                  config={"step": step})
    ckpt.close()


def largest_file(step_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    with open(largest_file(step_dir), "r+b") as f:
        f.truncate(100)


def delete(step_dir):
    os.remove(largest_file(step_dir))


@pytest.mark.parametrize("damage", [truncate, delete])
def test_resume_passes_over_a_damaged_newest_step_and_keeps_its_files(tmp_path, damage, caplog, capfd):
    three_steps(tmp_path / "checkpoints")
    damage(tmp_path / "checkpoints" / "3")
    files = sorted(p.relative_to(tmp_path / "checkpoints" / "3")
                   for p in (tmp_path / "checkpoints" / "3").rglob("*"))
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore_latest_readable(ABSTRACT)
    assert step == 2 and float(state["b"][0]) == 2.0
    assert "step 3 could not be read" in caplog.text and "checkpoints.unreadable/3" in caplog.text
    # orbax's stray "Exception ignored in <coroutine ...>" tracebacks are not printed
    assert "Exception ignored" not in capfd.readouterr().err
    moved = tmp_path / "checkpoints.unreadable" / "3"
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files  # nothing deleted
    assert ckpt.all_steps() == [1, 2]
    # The run goes on: step 3 is written afresh beside the moved one.
    assert ckpt.save(3, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), ABSTRACT), force=True)
    ckpt.close()
    assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [1, 2, 3]


def test_no_readable_step_is_one_error_naming_each_and_moves_nothing(tmp_path):
    three_steps(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        truncate(tmp_path / "checkpoints" / str(step))
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(checkpoints.CheckpointUnreadable) as raised:
        ckpt.restore_latest_readable(ABSTRACT)
    message = str(raised.value)
    for step in (3, 2, 1):
        assert f"step {step}: ValueError: OUT_OF_RANGE" in message
    assert "Nothing was moved or deleted" in message and "\n" not in message
    assert ckpt.all_steps() == [1, 2, 3] and not (tmp_path / "checkpoints.unreadable").exists()
    ckpt.close()


def test_config_changes_are_refused_or_warned_by_field():
    stored = {"task": "lm", "model": {"config": {"num_layers": 2}, "dtype": "float32"},
              "train": {"steps": 3, "stop_after": 2, "batch_size": 8}, "old_field": 1}
    current = {"task": "lm", "model": {"config": {"num_layers": 4}, "dtype": "bfloat16"},
               "train": {"steps": 9, "stop_after": 0, "batch_size": 8, "allow_config_change": False},
               "new_field": 2}
    refused, warned = config_changes(stored, current)
    assert refused == {"model.config.num_layers": (2, 4)}
    assert warned == {"model.dtype": ("float32", "bfloat16"), "train.steps": (3, 9)}
    with pytest.raises(ValueError, match=r"model.config.num_layers 2 -> 4\. .*allow_config_change=True"):
        check_resume(stored, current, "ckpt/3")
    current["train"]["allow_config_change"] = True
    check_resume(stored, current, "ckpt/3")  # allowed, with the warning
