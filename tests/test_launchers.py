"""launch/tpu_vm.py and launch/slurm.py: the commands and scripts they would run.

No gcloud, sbatch or accelerator needed: dry runs are checked command by command, the remote
shell scripts and the sbatch script are run under bash against stand-ins (a fake python,
srun, sbatch, gcloud), and bad inputs must fail before anything runs.
"""
import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIG = "configs/e5_finetune.py:base"
WORKDIR = "/mnt/shared/runs/e5"
OVERRIDES = ["--config.train.batch_size=1024", "--config.data.path=/data/my pairs.jsonl"]
TPU = ["--name", "e5-tpu", "--zone", "us-west4-a"]


def load(name):
    """Imports launch/NAME.py (launch/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(script, *args, env=None, timeout=60):
    return subprocess.run([sys.executable, str(LAUNCH / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def dry_run(script, *args):
    proc = launch(script, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def commands(*args):
    """tpu_vm.py's dry-run lines, each split back into its argv."""
    return [shlex.split(line) for line in dry_run("tpu_vm.py", *args).splitlines()]


def remote_script(argv):
    """The shell text an ssh command runs on the workers."""
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def pinned_jax() -> str:
    line = next(x for x in (REPO / "requirements-lock.txt").read_text().splitlines()
                if x.startswith("jax=="))
    return line.split("==")[1].strip()


# ---------------------------------------------------------------- tpu_vm.py

def test_create_passes_the_tpu_flags():
    (create,) = commands("create", *TPU, "--accelerator-type", "v5litepod-16", "--spot",
                         "--project", "my-proj", "--dry-run")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "e5-tpu",
                      "--zone=us-west4-a", "--project=my-proj",
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                      "--spot"]
    (v4,) = commands("create", *TPU, "--accelerator-type", "v4-32", "--preemptible",
                     "--dry-run")
    assert "--version=tpu-ubuntu2204-base" in v4 and "--preemptible" in v4
    assert "--spot" not in v4 and not any(a.startswith("--project") for a in v4)
    (explicit,) = commands("create", *TPU, "--accelerator-type", "v6e-8",
                           "--version", "v2-alpha-tpuv6e-custom", "--dry-run")
    assert "--version=v2-alpha-tpuv6e-custom" in explicit


def test_up_runs_every_step_in_order_on_all_workers():
    lines = commands("up", *TPU, "--accelerator-type", "v4-32", "--config", CONFIG,
                     "--workdir", WORKDIR, "--dry-run", "--skip-fit-check", "--", *OVERRIDES)
    kinds = [argv[4] if argv[0] == "gcloud" else argv[0] for argv in lines]
    assert kinds == ["create", "bash", "scp", "ssh", "rm", "ssh", "ssh"]
    for argv in lines:
        if argv[0] == "gcloud" and argv[4] in ("ssh", "scp"):
            assert "--worker=all" in argv and "--zone=us-west4-a" in argv
    scp = lines[2]
    assert scp[5].endswith(".tar.gz") and scp[6] == "e5-tpu:t5x_like-src.tar.gz"
    assert "git -C" in lines[1][2] and "ls-files -z" in lines[1][2]
    install = remote_script(lines[5])
    assert "bash scripts/env.sh" in install
    assert f"'jax[tpu]=={pinned_jax()}'" in install
    assert "-c requirements-lock.txt" in install
    run = remote_script(lines[6])
    assert "--config.distributed.auto=True" in run and "nohup" in run


def test_train_command_reaches_the_worker_intact(tmp_path):
    """The run script, executed by bash as a worker would, starts the exact argv, once."""
    home = tmp_path / "home"
    venv = home / "t5x_like" / ".venv" / "bin"
    venv.mkdir(parents=True)
    record = tmp_path / "argv.json"
    executable(venv / "python", f"""#!{sys.executable}
import json, os, sys, time
json.dump({{"argv": sys.argv[1:], "env": os.environ.get("GREETING")}}, open({str(record)!r}, "w"))
print("training started", flush=True)
time.sleep(60)
""")
    (run,) = commands("run", *TPU, "--config", CONFIG, "--workdir", WORKDIR,
                      "--env", "GREETING=hello world", "--dry-run", "--", *OVERRIDES)
    script = remote_script(run)
    bash = ["bash", "-c", script]
    first = subprocess.run(bash, cwd=home, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    pid = int((home / "t5x_like/logs/train.pid").read_text())
    try:
        for _ in range(100):
            if record.exists() and record.stat().st_size:
                break
            time.sleep(0.05)
        got = json.loads(record.read_text())
        assert got["argv"] == ["-m", "t5x_like.train", f"--config={CONFIG}",
                               f"--workdir={WORKDIR}", *OVERRIDES,
                               "--config.distributed.auto=True"]
        assert got["env"] == "hello world"
        second = subprocess.run(bash, cwd=home, capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "stop it first" in second.stderr
        (stop,) = commands("stop", *TPU, "--dry-run")
        stopped = subprocess.run(["bash", "-c", remote_script(stop)], cwd=home,
                                 capture_output=True, text=True, timeout=30)
        assert stopped.returncode == 0 and "sent TERM" in stopped.stdout
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the stop script did not end the run")
        assert "training started" in (home / "t5x_like/logs/train.log").read_text()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs git and a git checkout")
def test_copy_packs_tracked_files_and_unpacks_them(tmp_path, monkeypatch):
    tpu_vm = load("tpu_vm")
    monkeypatch.setattr(tpu_vm, "local_archive", lambda name: tmp_path / "src.tar.gz")
    args = tpu_vm.build_parser().parse_args(["copy", *TPU])
    tpu_vm.check_args(args, [])
    pack, scp, unpack, cleanup = tpu_vm.copy_commands(args)
    subprocess.run(pack, check=True, timeout=60)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(tmp_path / "src.tar.gz", home / "t5x_like-src.tar.gz")
    subprocess.run(["bash", "-c", remote_script(unpack)], cwd=home, check=True, timeout=60)
    copy = home / "t5x_like"
    for tracked in ("scripts/env.sh", "requirements-lock.txt", "t5x_like/train.py"):
        assert (copy / tracked).is_file(), tracked
    assert not (copy / ".venv").exists() and not (copy / ".git").exists()
    assert not (home / "t5x_like-src.tar.gz").exists()
    assert cleanup == ["rm", "-f", str(tmp_path / "src.tar.gz")]


def test_logs_stop_delete():
    (logs,) = commands("logs", *TPU, "--dry-run")
    assert "--worker=0" in logs and "tail -n 100 t5x_like/logs/train.log" in remote_script(logs)
    (follow,) = commands("logs", *TPU, "--worker", "all", "--follow", "--lines", "20",
                         "--dry-run")
    assert "--worker=all" in follow and "tail -n 20 -F" in remote_script(follow)
    (stop,) = commands("stop", *TPU, "--signal", "KILL", "--dry-run")
    assert "--worker=all" in stop and "kill -KILL" in remote_script(stop)
    (delete,) = commands("delete", *TPU, "--dry-run")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "e5-tpu"]
    assert "--quiet" not in delete
    assert "--quiet" in commands("delete", *TPU, "--yes", "--dry-run")[0]


@pytest.mark.parametrize("args, message", [
    (["run", "--name", "t", "--config", CONFIG, "--workdir", WORKDIR], "--zone"),
    (["run", *TPU, "--config", "configs/no_such.py", "--workdir", WORKDIR], "configs/no_such.py"),
    (["run", *TPU, "--config", CONFIG, "--workdir", "runs/e5"], "--workdir=runs/e5"),
    (["run", *TPU, "--config", CONFIG, "--workdir", "gs://bucket/e5"], "gcsfuse"),
    (["run", *TPU, "--config", CONFIG, "--workdir", WORKDIR, "--", "--config.train.lr", "1"],
     "--config.SECTION.FIELD=VALUE"),
    (["run", *TPU, "--config", CONFIG, "--workdir", WORKDIR, "--",
      "--config.distributed.auto=False"], "--config.distributed"),
    (["run", *TPU, "--config", CONFIG, "--workdir", WORKDIR, "--env", "NOVALUE"], "--env"),
    (["create", "--name", "My_TPU", "--zone", "z", "--accelerator-type", "v4-8"], "--name"),
    (["create", *TPU, "--accelerator-type", "tpu16"], "--accelerator-type"),
    (["create", *TPU, "--accelerator-type", "v9x-8"], "--version"),
    (["create", *TPU, "--accelerator-type", "v4-8", "--spot", "--preemptible"], "--spot"),
    (["logs", *TPU, "--worker", "first"], "--worker"),
    (["delete", *TPU, "--config.train.x=1"], "unrecognized"),
])
def test_tpu_bad_inputs_fail_before_any_command(args, message):
    proc = launch("tpu_vm.py", *args, "--dry-run")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


def test_tpu_config_outside_the_repository_is_refused(tmp_path):
    outside = tmp_path / "mine.py"
    outside.write_text("")
    proc = launch("tpu_vm.py", "run", *TPU, "--config", str(outside), "--workdir", WORKDIR,
                  "--dry-run")
    assert proc.returncode == 2 and "outside the repository" in proc.stderr


def test_tpu_stops_at_the_first_failing_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    executable(bin_dir / "gcloud", f"#!/bin/sh\necho \"$*\" >> {calls}\nexit 3\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = launch("tpu_vm.py", "up", *TPU, "--skip-fit-check", "--accelerator-type", "v4-8",
                  "--config", CONFIG,
                  "--workdir", WORKDIR, env=env)
    assert proc.returncode == 3
    assert "step 1/7 failed (exit code 3)" in proc.stderr and "tpu-vm create" in proc.stderr
    assert len(calls.read_text().splitlines()) == 1

    env["PATH"] = str(tmp_path / "empty")
    proc = launch("tpu_vm.py", "delete", *TPU, "--yes", env=env)
    assert proc.returncode == 127 and "gcloud not found" in proc.stderr


# ---------------------------------------------------------------- slurm.py

# The fit check has tests of its own below; the bad-input test pairs these up (the flag
# without a value comes last, where that pairing drops it).
SLURM = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
         "--account", "lab", "--time", "12:00:00", "--cpus-per-task", "32", "--config", CONFIG,
         "--skip-fit-check"]


def slurm_dry_run(workdir, *extra):
    out = dry_run("slurm.py", *SLURM, "--workdir", str(workdir), "--dry-run", *extra)
    header, rest = out.split("\n", 1)
    script, submit = rest.split("# and run:\n")
    return header, script, shlex.split(submit)


def srun_argv(script: str) -> list[str]:
    """The srun command of the script, continuation lines joined."""
    text = script.replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("srun ")]
    return shlex.split(line)


def test_sbatch_script_one_task_per_node_all_gpus(tmp_path):
    workdir = tmp_path / "run"
    header, script, submit = slurm_dry_run(workdir, "--env", "NCCL_SOCKET_IFNAME=ib0",
                                           "--sbatch-option=--qos=high", "--", *OVERRIDES)
    path = workdir / "slurm" / "t5x_like.sbatch"
    assert header == f"# would write {path}:" and submit == ["sbatch", str(path)]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--partition=gpu", "--account=lab", "--time=12:00:00",
                      "--cpus-per-task=32", "--qos=high", "--job-name=t5x_like",
                      f"--output={workdir}/slurm/%x-%j.out"):
        assert f"#SBATCH {directive}" in lines, directive
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in lines
    assert "export NCCL_SOCKET_IFNAME=ib0" in lines
    (xla,) = [x for x in lines if x.startswith("export XLA_FLAGS=")]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla
    srun = srun_argv(script)
    python = srun.index(".venv/bin/python")
    assert "--ntasks-per-node=1" in srun[:python] and "--gpus-per-node=8" in srun[:python]
    assert f"--output={workdir}/slurm/%x-%j-node%t.log" in srun[:python]
    assert srun[python:] == [".venv/bin/python", "-m", "t5x_like.train", f"--config={CONFIG}",
                             f"--workdir={workdir}", *OVERRIDES,
                             "--config.distributed.auto=True"]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=30)
    assert not workdir.exists()  # a dry run writes nothing


def test_sbatch_script_runs_under_bash(tmp_path):
    """With a stand-in srun, the job script hands srun the right argv and environment."""
    workdir = tmp_path / "run"
    _, script, _ = slurm_dry_run(workdir, "--xla-flag=--xla_gpu_enable_command_buffer=",
                                 "--", *OVERRIDES)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    executable(bin_dir / "srun", f"""#!{sys.executable}
import json, os, sys
keys = ("XLA_FLAGS", "JAX_LOCAL_DEVICE_IDS", "NCCL_DEBUG", "XLA_PYTHON_CLIENT_MEM_FRACTION")
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), **{{k: os.environ.get(k) for k in keys}}}},
          open({str(record)!r}, "w"))
""")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4"}
    env.pop("NCCL_DEBUG", None)
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(record.read_text())
    assert got["cwd"] == str(REPO)
    assert got["argv"][-len(OVERRIDES) - 1:] == [*OVERRIDES, "--config.distributed.auto=True"]
    assert got["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert got["XLA_FLAGS"].split()[-1] == "--xla_gpu_enable_command_buffer="
    assert got["NCCL_DEBUG"] == "WARN" and got["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"


def test_submit_writes_the_script_and_calls_sbatch(tmp_path):
    workdir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    executable(bin_dir / "sbatch", f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                                   "echo 'Submitted batch job 7'\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = launch("slurm.py", *SLURM, "--workdir", str(workdir), "--", *OVERRIDES, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Submitted batch job 7" in proc.stdout
    path = workdir / "slurm" / "t5x_like.sbatch"
    assert calls.read_text().split() == [str(path)]
    _, script, _ = slurm_dry_run(workdir, "--", *OVERRIDES)
    assert path.read_text() == script
    assert sorted(p.name for p in path.parent.iterdir()) == ["t5x_like.sbatch"]  # no temp files

    env["PATH"] = str(tmp_path / "empty")
    proc = launch("slurm.py", *SLURM, "--workdir", str(workdir), env=env)
    assert proc.returncode == 127 and "sbatch not found" in proc.stderr


@pytest.mark.parametrize("change, message", [
    ({"--nodes": "0"}, "--nodes=0"),
    ({"--gpus-per-node": "0"}, "--gpus-per-node=0"),
    ({"--time": "12h"}, "--time=12h"),
    ({"--config": "configs/no_such.py"}, "configs/no_such.py"),
    ({"--workdir": "/shared/my runs"}, "--workdir"),
    ({"--mem-fraction": "1.5"}, "--mem-fraction"),
    ({"--xla-flag": "xla_gpu_foo"}, "--xla-flag"),
    ({"--python": "envs/none/bin/python"}, "--python"),
    ({"--": "--config.train.batch_size"}, "--config.SECTION.FIELD=VALUE"),
])
def test_slurm_bad_inputs_fail_before_writing(tmp_path, change, message):
    args = dict(zip(SLURM[::2], SLURM[1::2]))
    args["--workdir"] = str(tmp_path / "run")
    args.update(change)
    argv = [x for key, value in args.items() if key != "--" for x in (key, value)]
    argv += ["--", args["--"]] if "--" in args else []
    proc = launch("slurm.py", *argv)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_requires_nodes_and_gpus():
    proc = launch("slurm.py", "--config", CONFIG, "--workdir", "/w", "--dry-run")
    assert proc.returncode == 2 and "--nodes" in proc.stderr and "--gpus-per-node" in proc.stderr


# ---------------------------------------------------------------- both

def test_launchers_do_not_import_jax():
    code = ("import sys; sys.path.insert(0, 'launch'); import tpu_vm, slurm; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_help_shows_examples():
    for script in ("tpu_vm.py", "slurm.py"):
        proc = launch(script, "--help")
        assert proc.returncode == 0 and "examples:" in proc.stdout


def test_default_xla_flags_are_known_to_this_xla():
    """XLA aborts on an unknown name in XLA_FLAGS, so a renamed flag shows up here."""
    flags = load("slurm").DEFAULT_XLA_FLAGS
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- the fit check

TINY = "configs/e5_mistral_lora.py:tiny"
# 131,072 queries against 262,144 passages: a 137 GB similarity matrix for four v5e chips.
OVERSIZED = "--config.train.batch_size=131072"


def test_accelerator_types_map_to_their_topologies():
    sys.path.insert(0, str(LAUNCH))
    fit_check = load("fit_check")
    assert fit_check.tpu_target("v5litepod-16") == "v5e:4x4"
    assert fit_check.tpu_target("v5litepod-8") == "v5e:2x4"
    assert fit_check.tpu_target("v5p-8") == "v5p:2x2x1"  # 8 TensorCores, 4 chips
    assert fit_check.tpu_target("v5p-128") == "v5p:4x4x4"
    assert fit_check.tpu_target("v4-32") == "v4:2x2x4"
    assert fit_check.tpu_target("v6e-8") == "v6e:2x4"
    assert fit_check.gpu_target("h100", 8, 4) == "h100:32"
    with pytest.raises(ValueError, match="--skip-fit-check"):
        fit_check.tpu_target("v5litepod-12")
    with pytest.raises(ValueError, match="whole 8-GPU hosts"):
        fit_check.gpu_target("h100", 6, 2)


@pytest.mark.slow
def test_tpu_up_dry_run_shows_the_fit_check():
    proc = launch("tpu_vm.py", "up", *TPU, "--accelerator-type", "v5litepod-4", "--config", TINY,
                  "--workdir", WORKDIR, "--dry-run", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[fit check]" in proc.stderr and "--target=v5e:2x2" in proc.stderr
    assert "v5e:2x2 (4 devices" in proc.stderr and "(fits)" in proc.stderr
    assert proc.stdout.splitlines()[0].startswith("gcloud compute tpus tpu-vm create")


@pytest.mark.slow
def test_tpu_create_refuses_a_config_that_cannot_fit():
    proc = launch("tpu_vm.py", "create", *TPU, "--accelerator-type", "v5litepod-4",
                  "--config", TINY, "--", OVERSIZED, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not fit v5e:2x2; nothing was launched" in proc.stderr
    assert "DOES NOT FIT" in proc.stderr and "try: " in proc.stderr
    assert "gcloud" not in proc.stdout and "[tpu_vm 1/" not in proc.stderr


def test_slurm_refuses_a_config_that_cannot_fit_before_writing(tmp_path):
    workdir = tmp_path / "run"
    args = [a for a in SLURM if a != "--skip-fit-check"]
    args[args.index(CONFIG)] = TINY
    proc = launch("slurm.py", *args, "--nodes", "1", "--gpus-per-node", "4", "--workdir",
                  str(workdir), "--", OVERSIZED, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not fit h100:4; nothing was launched" in proc.stderr
    assert not workdir.exists()
