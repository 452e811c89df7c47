"""python -m t5x_like.train: every shipped tiny config runs; a run stopped and resumed
equals one that ran straight through, bit for bit; config errors come first and name fields."""

import json
import logging
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_like import checkpoints, config_cli, train
from t5x_like.metrics import read_jsonl

load = config_cli.load_with_overrides


PRETRAIN = "configs/e5_pretrain.py:tiny"


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """One tiny e5_pretrain run (checkpoints at steps 2 and 3), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("e5_pretrain_tiny")
    return workdir, train.train(load(PRETRAIN), workdir)


@pytest.mark.parametrize("spec", [PRETRAIN, "configs/e5_mistral_lora.py:tiny",
                                  "configs/long_context_demo.py:tiny"])
@pytest.mark.slow
def test_tiny_configs_train(devices, tmp_path, spec, request):
    lora = "lora" in spec
    if spec == PRETRAIN:
        tmp_path, results = request.getfixturevalue("pretrain_run")
    else:
        results = train.train(load(spec, **({"train.export": True} if lora else {})), tmp_path)
    assert results["steps"] == 3
    records = read_jsonl(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["task"] in ("dual_encoder", "lm")
    assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 3]
    if lora:  # the export is the base with the trained adapters merged in
        from t5x_like.convert import hf

        config, exported = hf.load_hf(tmp_path / "export")
        assert config.model_type == "mistral" and not config.lm_head
        ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints").manager.restore(3)["state"]["params"]
        base = ckpt["model"]["layer_0"]["attention"]["query"]["kernel"]
        merged = exported["layer_0"]["attention"]["query"]["kernel"]
        assert not np.allclose(merged, base)  # the adapters moved it
        np.testing.assert_array_equal(exported["embed"]["embedding"], ckpt["model"]["embed"]["embedding"])


@pytest.mark.slow
def test_staged_long_context_recipe_runs_every_stage_from_the_last(devices, tmp_path):
    """Two stages (128 then 256 tokens a row, RoPE base x4) in one call; the second starts
    from the first's export; running again skips both."""
    from t5x_like.convert import hf

    cfg = load("configs/llama_long_context.py:tiny")
    results = train.train(cfg, tmp_path)["stages"]
    assert list(results) == ["stage0_128", "stage1_256"]
    for name, theta, rows in (("stage0_128", 1e4, 16), ("stage1_256", 4e4, 8)):
        stage = tmp_path / name
        assert results[name]["steps"] == 3
        # held-out perplexity falls within every stage
        assert results[name]["after"]["perplexity"] < results[name]["before"]["perplexity"]
        config, _ = hf.load_hf(stage / "export")
        assert (config.rope_theta, config.max_position_embeddings) == (theta, int(name[7:]))
        resolved = json.loads((stage / "config.json").read_text())
        assert resolved["train"]["batch_size"] == rows  # the same tokens a step
        assert resolved["data"]["long_fraction"] == 0.6  # the long / short mix, per stage
        assert checkpoints.Checkpointer(stage / "checkpoints").all_steps() == [2, 3]
    # stage 1 began from stage 0's trained weights, not from a fresh model
    start = json.loads((tmp_path / "stage1_256" / "config.json").read_text())["model"]["pretrained"]
    assert start == str(tmp_path / "stage0_128" / "export")
    assert results["stage1_256"]["before"]["perplexity"] < results["stage0_128"]["before"]["perplexity"]
    logged = len(read_jsonl(tmp_path / "stage1_256" / "metrics.jsonl"))
    again = train.train(cfg, tmp_path)["stages"]
    assert again == results  # finished stages are skipped, their results read back
    assert len(read_jsonl(tmp_path / "stage1_256" / "metrics.jsonl")) == logged


def test_staged_config_errors_name_the_field(tmp_path):
    from t5x_like.stages import stage_configs

    with pytest.raises(ValueError, match="config.model.rope_theta"):
        stage_configs(load("configs/llama_long_context.py:tiny", **{"model.rope_theta": 0.0}), tmp_path)
    with pytest.raises(ValueError, match="divisible by 2"):
        stage_configs(load("configs/llama_long_context.py:tiny", **{"train.batch_size": 9}), tmp_path)
    with pytest.raises(ValueError, match="config.task='lm'"):
        stage_configs(load("configs/e5_pretrain.py:tiny", **{"stages.num": 2}), tmp_path)


def final_params(workdir):
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
    restored = ckpt.manager.restore(3)  # no target: plain numpy arrays as saved
    return jax.tree.leaves(restored["state"]["params"])


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(devices, tmp_path):
    """BM25 negatives, shuffled tf.data, dropout on: params, optimizer, RNG and the
    data iterator's position must all come back for the bits to agree."""
    spec = "configs/e5_finetune.py:tiny"
    overrides = {"model.config.dropout_rate": 0.1, "train.checkpoint_every": 100}
    train.train(load(spec, **overrides), tmp_path / "straight")
    stopped = train.train(load(spec, **overrides, **{"train.stop_after": 2, "train.export": True}),
                          tmp_path / "split")
    assert checkpoints.Checkpointer(tmp_path / "split" / "checkpoints").all_steps() == [2]
    # a stopped run is not passed off as finished: no "after", no export
    assert not stopped["completed"] and "after" not in stopped
    assert not (tmp_path / "split" / "export").exists()
    assert train.train(load(spec, **overrides), tmp_path / "split")["completed"]
    for a, b in zip(final_params(tmp_path / "straight"), final_params(tmp_path / "split")):
        np.testing.assert_array_equal(a, b)
    straight = [r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    split = [r["loss"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert straight == split


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "t5x_like.train", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_lists_valid_fields_for_a_misspelt_override(tmp_path):
    out = run_cli("--config=configs/e5_finetune.py:tiny", f"--workdir={tmp_path}",
                  "--config.train.batch_sise=8")
    assert out.returncode != 0
    assert "config.train has no field 'batch_sise'" in out.stderr
    assert "batch_size" in out.stderr and "grad_cache_chunks" in out.stderr


def test_config_errors_before_compute(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="config.data.path='no/such/dir'"):
        train.train(load("configs/e5_finetune.py:tiny", **{"data.path": "no/such/dir"}), tmp_path)
    with pytest.raises(ValueError, match=r"config.objective: .*temperature"):
        train.train(load("configs/e5_finetune.py:tiny", **{"objective.temperature": -1.0}), tmp_path)
    with pytest.raises(ValueError, match="accumulation"):
        train.train(load("configs/e5_finetune.py:tiny",
                         **{"train.accumulation": 2, "train.grad_cache_chunks": 2}), tmp_path)
    with pytest.raises(ValueError, match=r"eval.extra_documents=5 needs config.eval.max_queries"):
        train.train(load("configs/e5_finetune.py:tiny", **{"eval.extra_documents": 5}), tmp_path)
    # Accumulation would shrink the in-batch negatives from the batch to a micro-batch.
    with pytest.raises(ValueError, match=r"micro-batch's 4 examples' .*grad_cache_chunks=2"):
        train.train(load("configs/e5_finetune.py:tiny", **{"train.accumulation": 2,
                                                          "train.batch_size": 8}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    from t5x_like import run_config

    with caplog.at_level(logging.WARNING):
        run_config.check_config(load("configs/e5_finetune.py:tiny", **{
            "train.accumulation": 2, "train.batch_size": 8, "train.micro_batch_negatives": True}))
    assert "fewer in-batch negatives" in caplog.text


@pytest.mark.slow
def test_resume_passes_over_an_unreadable_step_and_checks_the_config(devices, pretrain_run,
                                                                     tmp_path, caplog):
    from test_checkpoints import truncate

    shutil.copytree(pretrain_run[0], tmp_path / "run")
    workdir = tmp_path / "run"
    truncate(workdir / "checkpoints" / "3")
    written = (workdir / "config.json").read_text()
    # Another model shape is refused before anything is built; config.json is kept.
    with pytest.raises(ValueError, match=r"model.config.num_layers 2 -> 3"):
        train.train(load(PRETRAIN, **{"model.config.num_layers": 3}), workdir)
    assert (workdir / "config.json").read_text() == written
    # A longer schedule is a warning; the run resumes from step 2 and finishes step 4.
    with caplog.at_level(logging.WARNING):
        results = train.train(load(PRETRAIN, **{"train.steps": 4}), workdir)
    assert "train.steps 3 -> 4" in caplog.text and "step 3 could not be read" in caplog.text
    assert results["completed"] and results["steps"] == 4
    assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]
    assert (workdir / "checkpoints.unreadable" / "3").is_dir()
    steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    assert steps[-2:] == [3, 4]
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 4
