"""One RESULTS.md section for the benches that compile for chips they do not run on:
the host and toolchain line, the command, and the body, replacing the previous run's."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def toolchain_line() -> str:
    from importlib.metadata import version

    import jax
    import jaxlib

    from t5x_like import host_platform

    host = "an accelerator present" if host_platform.has_accelerator() else "no accelerator"
    return (f"Compiled, not run, on a {platform.machine()} host ({os.cpu_count()} cores, {host}) "
            f"for the chips named: jax {jax.__version__}, jaxlib {jaxlib.__version__}, libtpu "
            f"{version('libtpu')}, jax-cuda12-plugin {version('jax-cuda12-plugin')}, ptxas from "
            f"nvidia-cuda-nvcc-cu12 {version('nvidia-cuda-nvcc-cu12')}; "
            f"{datetime.date.today().isoformat()}.")


def write_section(section: str, script: str, body: str) -> None:
    """``section`` (a ``## `` heading) with the toolchain, ``python script ARGS`` and ``body``."""
    command = "python " + " ".join([script] + sys.argv[1:])
    header = f"{section}\n\n{toolchain_line()}\n\n`{command}`"
    text = RESULTS.read_text()
    start = text.find(section)
    if start >= 0:  # replace the previous run's section, keep what follows it
        end = text.find("\n## ", start + len(section))
        text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
    RESULTS.write_text(text.rstrip() + "\n\n" + header + "\n\n" + body + "\n")
    print(f"wrote {RESULTS}")
