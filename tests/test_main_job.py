"""The README main job end to end, as `bash scripts/main.sh` runs it, on its tiny variant:
real MiniLM weights, SciFact with BM25 negatives, 3 steps, evaluation before and after on
50 test queries, the printed table and results.json."""

import json
import os
import subprocess

import pytest

from t5x_like import paths


@pytest.mark.slow
def test_main_script_trains_evaluates_and_prints_the_table(tmp_path):
    env = dict(os.environ, T5X_LIKE_MAIN_CONFIG="configs/minilm_scifact.py:tiny",
               T5X_LIKE_WORKDIR=str(tmp_path / "run"))
    env.pop("XLA_FLAGS", None)  # one device, as a user's shell has it
    result = subprocess.run(["bash", "scripts/main.sh"], cwd=paths.REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["ndcg@10", "recall@100"])
    table = {}
    for line in lines[header + 1:header + 4]:
        name, *numbers = line.split()
        table[name] = [float(n) for n in numbers]
    assert list(table) == ["bm25", "before", "after"], result.stdout[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for name, (ndcg, recall) in table.items():  # the table prints what results.json holds
        assert round(results[name]["ndcg@10"], 4) == ndcg and round(results[name]["recall@100"], 4) == recall
        assert 0.3 < ndcg <= 1.0 and 0.5 < recall <= 1.0
    assert results["completed"] and results["steps"] == 3
    assert table["after"] != table["before"]  # three steps moved the model
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 3
    assert "before training" in result.stdout
