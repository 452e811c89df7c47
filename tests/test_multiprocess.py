"""Two real processes join through initialize_distributed (gloo CPU collectives)."""

import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("_two_process_worker.py")
ROOT = WORKER.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_form_one_mesh_and_reduce_a_global_batch():
    port = str(free_port())
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), port, str(i)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        outputs.append(out)
        assert p.returncode == 0, out[-3000:]
    local = np.arange(12, dtype=np.float32)
    want = float(local.sum() + (local + 100).sum())
    for i, out in enumerate(outputs):
        line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
        assert line.startswith(f"RESULT {i} ")
        assert "'data': 4" in line and "'tensor': 2" in line
        assert float(line.split()[-1]) == want
