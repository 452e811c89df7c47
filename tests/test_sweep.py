"""launch/sweep.py: grids and sweep files expand to named points, print mode gives exact
commands, bad fields / values / duplicates fail before anything runs, gather reads hand-made
work directories, and local mode trains real tiny points, then skips them when run again."""

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_sweep", REPO / "launch" / "sweep.py")
sweep = sys.modules["launch_sweep"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(sweep)

TINY = "configs/e5_finetune.py:tiny"
# ml_collections loads config files with the deprecated importlib load_module
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the repository root


def build(*argv):
    return sweep.build_sweep(sweep.parse_args(list(argv)))


def run_main(capsys, *argv):
    code = sweep.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ expansion


def test_grid_is_the_cartesian_product_with_readable_stable_names(tmp_path):
    s = build(f"--config={TINY}", f"--root={tmp_path}", "--grid", "optimizer.learning_rate=1e-3,3e-3",
              "--grid", "train.batch_size=8,16", "--set", "train.steps=2")
    assert s.fields == ["optimizer.learning_rate", "train.batch_size"]
    assert [p.overrides for p in s.points] == [
        {"optimizer.learning_rate": "1e-3", "train.batch_size": "8"},
        {"optimizer.learning_rate": "1e-3", "train.batch_size": "16"},
        {"optimizer.learning_rate": "3e-3", "train.batch_size": "8"},
        {"optimizer.learning_rate": "3e-3", "train.batch_size": "16"}]
    assert [p.name for p in s.points] == [
        "learning_rate=1e-3,batch_size=8", "learning_rate=1e-3,batch_size=16",
        "learning_rate=3e-3,batch_size=8", "learning_rate=3e-3,batch_size=16"]
    assert s.fixed == {"train.steps": "2"}
    assert s.points == build(f"--config={TINY}", f"--root={tmp_path}", "--grid",
                             "optimizer.learning_rate=1e-3,3e-3", "--grid", "train.batch_size=8,16",
                             "--set", "train.steps=2").points  # the same flags, the same names


def test_names_spell_out_clashing_fields_and_keep_tuples_and_signs_readable(tmp_path):
    s = build(f"--config={TINY}", f"--root={tmp_path}", "--grid", "seed=0,1", "--grid", "data.seed=0",
              "--grid", "objective.matryoshka_dims=(32, 64),(64,)")
    assert s.points[0].overrides["objective.matryoshka_dims"] == "(32, 64)"  # commas in brackets
    assert [p.name for p in s.points] == [
        "seed=0,data.seed=0,matryoshka_dims=32-64", "seed=0,data.seed=0,matryoshka_dims=64",
        "seed=1,data.seed=0,matryoshka_dims=32-64", "seed=1,data.seed=0,matryoshka_dims=64"]
    assert sweep.name_points([{"a.x": "-1"}, {"a.x": "p/q"}, {"a.x": "p q"}], ["a.x"]) == [
        "x=-1", "x=p-q-" + sweep.digest({"a.x": "p/q"}), "x=p-q-" + sweep.digest({"a.x": "p q"})]
    assert len(sweep.point_name({"a.x": "v" * 300}, {"a.x": "x"})) == sweep.MAX_NAME


def test_sweep_files_give_points_or_a_grid_with_config_and_fixed_fields(tmp_path):
    points = tmp_path / "points.py"
    points.write_text(
        f"CONFIG = {TINY!r}\nFIXED = {{'train.steps': 2}}\n"
        "def get_sweep():\n"
        "    return [{'optimizer.learning_rate': 1e-3, 'train.dropout': False},\n"
        "            {'optimizer.learning_rate': 3e-3, 'objective.matryoshka_dims': (32, 64)}]\n")
    s = build(f"--sweep={points}", f"--root={tmp_path}", "--set", "train.batch_size=8")
    assert s.config == TINY and s.fixed == {"train.steps": "2", "train.batch_size": "8"}
    assert s.fields == ["optimizer.learning_rate", "train.dropout", "objective.matryoshka_dims"]
    assert [p.name for p in s.points] == ["learning_rate=0.001,dropout=false",
                                          "learning_rate=0.003,matryoshka_dims=32-64"]
    # the values reach the config with their types, as the training CLI parses them
    cfg = sweep.resolve_config(s.config, {**s.fixed, **s.points[1].overrides})
    assert cfg.objective.matryoshka_dims == (32, 64) and cfg.optimizer.learning_rate == 3e-3
    assert sweep.resolve_config(s.config, s.points[0].overrides).train.dropout is False

    grid = tmp_path / "grid.py"
    grid.write_text("def get_sweep():\n    return {'seed': [0, 1], 'objective.temperature': [0.02, 0.05]}\n")
    s = build(f"--sweep={grid}", f"--config={TINY}", f"--root={tmp_path}")
    assert [p.name for p in s.points] == ["seed=0,temperature=0.02", "seed=0,temperature=0.05",
                                          "seed=1,temperature=0.02", "seed=1,temperature=0.05"]


def test_the_shipped_minilm_sweep_file_validates(tmp_path):
    s = build("--sweep=configs/sweeps/minilm_lr.py", f"--root={tmp_path}")
    assert s.config == "configs/minilm_scifact.py"
    assert s.fields == ["optimizer.learning_rate", "objective.temperature"]
    assert len(s.points) == 4 and len({p.name for p in s.points}) == 4


# ----------------------------------------------------------------- print mode


def test_print_mode_prints_one_exact_shell_quoted_command_a_point(tmp_path, capsys):
    code, out, _ = run_main(capsys, f"--config={TINY}", f"--root={tmp_path}", "--grid",
                            "optimizer.learning_rate=1e-3,3e-3", "--set", "train.steps=2", "--set",
                            "objective.matryoshka_dims=(32, 64)", "--python=python", "--",
                            "--verbosity=1")
    assert code == 0
    common = ("--config.train.steps=2 '--config.objective.matryoshka_dims=(32, 64)'")
    assert out.splitlines() == [
        f"python -m t5x_like.train --config={TINY} --workdir={tmp_path}/learning_rate=1e-3 "
        f"{common} --config.optimizer.learning_rate=1e-3 --verbosity=1",
        f"python -m t5x_like.train --config={TINY} --workdir={tmp_path}/learning_rate=3e-3 "
        f"{common} --config.optimizer.learning_rate=3e-3 --verbosity=1"]
    assert shlex.split(out.splitlines()[0])[6] == "--config.objective.matryoshka_dims=(32, 64)"
    manifest = json.loads((tmp_path / "sweep.json").read_text())  # what --gather reads later
    assert manifest["config"] == TINY and [p["name"] for p in manifest["points"]] == [
        "learning_rate=1e-3", "learning_rate=3e-3"]


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize("args, message", [
    (["--grid", "optimizer.learning_rte=1e-3,3e-3"],
     r"config.optimizer has no field 'learning_rte'; valid fields of config.optimizer: .*learning_rate"),
    (["--grid", "model.config.num_layer=1,2"],
     r"config.model.config has no field 'num_layer'; .*num_layers"),
    (["--set", "train.batchsize=8"], r"config.train has no field 'batchsize'"),
    (["--grid", "train.batch_size=8,3x"],
     r"--config.train.batch_size=3x: .*the config's default for train.batch_size is 16, of type int"),
    (["--grid", "train.dropout=true,maybe"], r"--config.train.dropout=maybe"),
    (["--grid", "optimizer.learning_rate=1e-3,0.001"], r"give the same config; drop one"),
    (["--grid", "train.steps=2,3", "--set", "train.steps=4"], r"both swept and fixed"),
    (["--grid", "train.steps"], r"write FIELD=VALUE"),
    (["--grid", "seed=1", "--", "--config.train.steps=3"], r"set config fields with --set"),
    (["--grid", "seed=1", "--sweep=configs/sweeps/minilm_lr.py"], r"--grid or --sweep, not both"),
])
def test_bad_sweeps_fail_before_anything_runs_naming_the_field(tmp_path, capsys, args, message):
    root = tmp_path / "root"
    code, out, err = run_main(capsys, f"--config={TINY}", f"--root={root}", "--mode=local", *args)
    assert code == 2 and out == ""
    assert re.search(message, err), err
    assert not root.exists()  # nothing written, nothing run


def test_bad_sweep_files_and_configs_say_what_to_change(tmp_path):
    with pytest.raises(sweep.SweepError, match="choose one of"):  # the config's own error
        build("--config=configs/e5_finetune.py:huge", f"--root={tmp_path}", "--grid", "seed=1")
    missing = tmp_path / "none.py"
    missing.write_text("POINTS = []\n")
    with pytest.raises(sweep.SweepError, match="define get_sweep"):
        build(f"--sweep={missing}", f"--config={TINY}", f"--root={tmp_path}")
    scalar = tmp_path / "scalar.py"
    scalar.write_text("def get_sweep():\n    return {'seed': 1}\n")
    with pytest.raises(sweep.SweepError, match=r"\['seed'\] do not"):
        build(f"--sweep={scalar}", f"--config={TINY}", f"--root={tmp_path}")
    empty = tmp_path / "empty.py"
    empty.write_text("def get_sweep():\n    return {'seed': [0, 1], 'data.seed': []}\n")
    with pytest.raises(sweep.SweepError, match="gave no points"):
        build(f"--sweep={empty}", f"--config={TINY}", f"--root={tmp_path}")


# --------------------------------------------------------------------- gather


def write_json(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def write_metrics(path, losses, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i, "loss": loss, "learning_rate": 1e-3}) for i, loss in enumerate(losses, 1)]
    path.write_text("\n".join(lines) + "\n" + tail)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gather_tables_every_point_completed_stopped_failed_incomplete_missing(tmp_path, capsys):
    root = tmp_path / "sweep"
    code, _, _ = run_main(capsys, f"--config={TINY}", f"--root={root}", "--grid",
                          "optimizer.learning_rate=1,2,3,4,5")
    assert code == 0
    done, stopped, failed, started, _missing = (root / f"learning_rate={i}" for i in range(1, 6))
    write_json(done / "results.json", {"steps": 3, "before": {"ndcg@10": 0.1},
                                       "after": {"ndcg@10": 0.5, "recall@100": 0.9}, "completed": True})
    # an eval record without a loss and a half-written line (a killed writer) are passed over
    write_metrics(done / "metrics.jsonl", [3.0, 2.5, 2.25], tail='{"step": 3, "beir/ndcg@10": 0.5}\n{"st')
    write_json(stopped / "results.json", {"steps": 3, "completed": False})
    write_metrics(stopped / "metrics.jsonl", [3.0, 2.75])
    write_json(failed / sweep.RUN_RECORD, {"returncode": 1})
    (failed / "train.log").write_text("Traceback ...\n")
    write_metrics(started / "metrics.jsonl", [3.0])

    code, out, _ = run_main(capsys, f"--root={root}", "--gather")  # from ROOT/sweep.json
    assert code == 0
    rows = read_csv(root / "sweep.csv")
    assert list(rows[0]) == ["point", "optimizer.learning_rate", "status", "step", "loss",
                             "ndcg@10", "recall@100"]
    assert [(r["status"], r["step"], r["loss"], r["ndcg@10"]) for r in rows] == [
        ("completed", "3", "2.25", "0.5"), ("stopped", "2", "2.75", ""), ("failed", "", "", ""),
        ("incomplete", "1", "3.0", ""), ("missing", "", "", "")]
    table = (root / "sweep.md").read_text()
    assert out.startswith(table)
    assert "| learning_rate=1 | 1 | completed | 3 | 2.2500 | 0.5000 | 0.9000 |" in table.splitlines()
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == [
        "sweep.csv", "sweep.json", "sweep.md"]  # no temporary files left behind


def test_gather_reads_the_last_stage_of_a_staged_recipe(tmp_path, capsys):
    root = tmp_path / "staged"
    config = "configs/llama_long_context.py:tiny"
    code, _, _ = run_main(capsys, f"--config={config}", f"--root={root}", "--grid",
                          "optimizer.learning_rate=1e-3,2e-3")
    assert code == 0
    s = sweep.read_manifest(root)
    assert [p.stages for p in s.points] == [2, 2]
    first, second = (root / p.name for p in s.points)
    stage = {"steps": 3, "completed": True}
    write_json(first / "stages.json", {"stage0_128": {**stage, "after": {"perplexity": 90.0}},
                                       "stage1_256": {**stage, "after": {"perplexity": 70.0}}})
    write_metrics(first / "stage0_128" / "metrics.jsonl", [6.0, 5.0, 4.5])
    write_metrics(first / "stage1_256" / "metrics.jsonl", [4.5, 4.25, 4.0])
    # stopped after its first stage: running again goes on with the second
    write_json(second / "stages.json", {"stage0_128": {**stage, "after": {"perplexity": 80.0}}})
    write_metrics(second / "stage0_128" / "metrics.jsonl", [6.0, 5.0, 4.5])
    code, _, _ = run_main(capsys, f"--config={config}", f"--root={root}", "--grid",
                          "optimizer.learning_rate=1e-3,2e-3", "--gather")
    assert code == 0
    rows = read_csv(root / "sweep.csv")
    assert [(r["status"], r["loss"], r["perplexity"]) for r in rows] == [
        ("completed", "4.0", "70.0"), ("stopped", "4.5", "80.0")]


# ----------------------------------------------------------------- local mode


def test_local_dry_run_skips_completed_points_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "sweep"
    write_json(root / "seed=0" / "results.json", {"steps": 3, "completed": True})
    write_json(root / "seed=1" / "results.json", {"steps": 3, "completed": False})  # resumes
    code, out, _ = run_main(capsys, f"--config={TINY}", f"--root={root}", "--grid", "seed=0,1,2",
                            "--mode=local", "--dry-run", "--python=python")
    assert code == 0
    assert out.splitlines() == [
        "[1/3] seed=0: completed earlier; skipping",
        f"[2/3] seed=1: would run python -m t5x_like.train --config={TINY} --workdir={root}/seed=1 "
        "--config.seed=1",
        f"[3/3] seed=2: would run python -m t5x_like.train --config={TINY} --workdir={root}/seed=2 "
        "--config.seed=2"]
    assert sorted(p.name for p in root.iterdir()) == ["seed=0", "seed=1"]


CHEAP = ["--set=train.steps=2", "--set=optimizer.warmup_steps=0", "--set=train.batch_size=8",
         "--set=train.grad_cache_chunks=1", "--set=data.query_length=16",
         "--set=data.passage_length=32", "--set=model.config.num_layers=1",
         "--set=train.checkpoint_every=100", "--set=train.async_checkpoints=false"]


def run_sweep_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: cheaper
    return subprocess.run([sys.executable, "launch/sweep.py", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)


def test_local_mode_goes_on_past_failed_points_and_exits_non_zero(tmp_path):
    """Real training commands that fail fast (an unknown absl flag after --): each failure is
    logged and reported, the sweep goes on, and the exit status says some failed."""
    root = tmp_path / "sweep"
    write_json(root / "seed=0" / "results.json", {"steps": 3, "completed": True})
    out = run_sweep_cli(f"--config={TINY}", f"--root={root}", "--grid", "seed=0,1,2", "--mode=local",
                        "--quiet", "--", "--no_such_flag=1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[1/3] seed=0: completed earlier; skipping" in out.stdout
    for i in (2, 3):
        # the train CLI refuses the unknown flag as a usage error: status 2
        assert f"[{i}/3] seed={i - 1}: FAILED with exit status 2" in out.stdout
        log = (root / f"seed={i - 1}" / "train.log").read_text()
        assert "--no_such_flag=1" in log and "no_such_flag" in log.split("\n", 2)[2]  # its error
    assert "2 of 3 points failed: seed=1, seed=2" in out.stdout
    assert [r["status"] for r in read_csv(root / "sweep.csv")] == ["completed", "failed", "failed"]


@pytest.mark.slow
def test_local_mode_trains_each_point_then_skips_them_when_run_again(tmp_path):
    """Two real tiny points, 2 steps each; the same command again retrains neither."""
    root = tmp_path / "sweep"
    args = ["--config=configs/e5_pretrain.py:tiny", f"--root={root}",
            "--grid=optimizer.learning_rate=1e-3,1e-2", *CHEAP, "--mode=local", "--quiet"]
    out = run_sweep_cli(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    names = ["learning_rate=1e-3", "learning_rate=1e-2"]
    losses = []
    for name, lr in zip(names, (1e-3, 1e-2)):
        workdir = root / name
        assert json.loads((workdir / "results.json").read_text())["completed"]
        assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == lr
        log = (workdir / "train.log").read_text()
        assert f"--config.optimizer.learning_rate={name[14:]}" in log and "train:" in log
        losses.append(sweep.last_logged(workdir / "metrics.jsonl")["loss"])
    assert losses[0] != losses[1]  # the second step saw each point's own learning rate
    rows = read_csv(root / "sweep.csv")
    assert [(r["point"], r["status"], r["step"]) for r in rows] == [(n, "completed", "2") for n in names]

    logged = (root / names[0] / "metrics.jsonl").read_text()
    out = run_sweep_cli(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"[1/2] {names[0]}: completed earlier; skipping\n"
                                 f"[2/2] {names[1]}: completed earlier; skipping\n")
    assert (root / names[0] / "metrics.jsonl").read_text() == logged  # not retrained
