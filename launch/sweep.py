"""Sweeps over config fields: one work directory and one training command a point.

A sweep is a grid (the cartesian product of a few values per field) or a list of
points over the fields of one ml-collections config. Each point trains with
``python -m t5x_like.train --config=FILE[:ARG] --workdir=ROOT/NAME --config.FIELD=VALUE ...``
where NAME is read off the point's ``field=value`` pairs (``learning_rate=3e-5,batch_size=32``).

Examples (from the repository root):

  # print one command a point (pipe into a job array, GNU parallel or xargs)
  python launch/sweep.py --config=configs/minilm_scifact.py --root=runs/sweep1 \\
      --grid optimizer.learning_rate=1e-5,3e-5,1e-4 --grid train.batch_size=32,64 \\
      --set train.epochs=0 --set train.steps=30   # (train.epochs > 0 would override steps)
  python launch/sweep.py ... | xargs -d '\\n' -P 2 -I{} sh -c {}

  # run the points here, one after another; a second call skips finished points
  python launch/sweep.py --sweep=configs/sweeps/minilm_lr.py --root=runs/minilm_lr --mode=local
  python launch/sweep.py --sweep=configs/sweeps/minilm_lr.py --root=runs/minilm_lr --mode=local --dry-run

  # one table over every point: ROOT/sweep.md and ROOT/sweep.csv
  python launch/sweep.py --root=runs/minilm_lr --gather

  # arguments after -- go to every training command
  python launch/sweep.py ... -- --verbosity=1

A sweep file defines ``get_sweep()`` returning a list of points (dicts of field ->
value) or a grid (a dict of field -> list of values), and optionally ``CONFIG``
(the default --config) and ``FIXED`` (fields set for every point, below --set).

Every field name and value is checked against the config before anything runs,
with the parser the training command itself uses. Print and local mode record the
sweep in ROOT/sweep.json, which is what ``--gather`` reads when given only --root.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from t5x_like import cli
from t5x_like.paths import write_text_atomic
from t5x_like.run_dirs import final_results, is_completed, last_logged, read_json, read_results

MANIFEST = "sweep.json"
RUN_RECORD = "sweep_run.json"  # the local runner's exit status for a point
MAX_NAME = 100


class SweepError(Exception):
    """A sweep that cannot run as given; the message says what to change."""


@dataclasses.dataclass
class Point:
    name: str
    overrides: dict[str, str]  # swept field -> value as written on the command line
    stages: int = 0  # config.stages.num: a staged recipe keeps its results per stage


@dataclasses.dataclass
class Sweep:
    config: str
    root: Path
    fields: list[str]  # every swept field, in first-seen order (the table's columns)
    fixed: dict[str, str]
    points: list[Point]
    extra: list[str] = dataclasses.field(default_factory=list)
    python: str = sys.executable


# ----------------------------------------------------------------- sweep spec


def flag_value(value: Any) -> str:
    """A Python value as the training CLI's flag parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return value if isinstance(value, str) else repr(value)


def split_values(text: str) -> list[str]:
    """``1e-5,3e-5`` -> two values; commas inside brackets or quotes stay (tuple values)."""
    values, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return values + [current]


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    field = field.strip().removeprefix("config.")
    if not sep or not field:
        raise SweepError(f"{flag} {text!r}: write FIELD=VALUE, e.g. {flag} optimizer.learning_rate=3e-5")
    return field, value


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    grid = {}
    for spec in specs:
        field, values = parse_assignment(spec, "--grid")
        if field in grid:
            raise SweepError(f"--grid {field} is given twice; list all its values in one --grid")
        grid[field] = split_values(values)
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The cartesian product, the last field varying fastest."""
    fields = list(grid)
    return [dict(zip(fields, combo)) for combo in itertools.product(*grid.values())]


def load_sweep_file(path: str) -> tuple[list[dict], str | None, dict]:
    """``(points, CONFIG or None, FIXED)`` of a sweep file (see the module doc)."""
    file = Path(path)
    if not file.is_file():
        raise SweepError(f"--sweep={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_t5x_like_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"--sweep={path}: define get_sweep() returning a list of points "
                         "(dicts) or a grid (a dict of lists)")
    sweep = module.get_sweep()
    if isinstance(sweep, dict):
        bad = [f for f, v in sweep.items() if not isinstance(v, (list, tuple))]
        if bad:
            raise SweepError(f"--sweep={path}: a grid maps each field to a list of values; "
                             f"{bad} do not (wrap a single value in a list, or put it in FIXED)")
        points = grid_points(sweep)
    elif isinstance(sweep, list) and all(isinstance(p, dict) for p in sweep):
        points = sweep
    else:
        raise SweepError(f"--sweep={path}: get_sweep() returned {type(sweep).__name__}; "
                         "return a list of dicts (points) or a dict of lists (grid)")
    return points, getattr(module, "CONFIG", None), dict(getattr(module, "FIXED", {}))


def as_flag_values(point: dict) -> dict[str, str]:
    return {str(k).removeprefix("config."): flag_value(v) for k, v in point.items()}


# ----------------------------------------------------------------- validation


def check_field_names(config: str, fields: list[str]) -> None:
    """A misspelt field fails here, naming the valid fields of its section."""
    from absl import app

    from t5x_like import config_cli

    try:
        config_cli.check_overrides(["sweep", f"--config={config}", *[f"--config.{f}=" for f in fields]])
    except (app.UsageError, ValueError) as e:  # ValueError: get_config's own (e.g. a bad ARG)
        raise SweepError(str(e)) from None


def resolve_config(config: str, overrides: dict[str, str]):
    """The config a point trains with, parsed exactly as ``t5x_like.train`` parses its flags."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["sweep", f"--config={config}", *[f"--config.{k}={v}" for k, v in overrides.items()]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:
        raise SweepError(f"{e}{default_hint(config, str(e))}") from None
    return values.config


def default_hint(config: str, message: str) -> str:
    """`` (the default of FIELD is ...)`` for the field a flag error names, so the type shows."""
    from t5x_like import config_cli

    match = re.search(r"--config\.([\w.]+)=", message)
    if not match:
        return ""
    node = config_cli.load_config_file(config)
    for key in match.group(1).split("."):
        node = node[key]
    return f" (the config's default for {match.group(1)} is {node!r}, of type {type(node).__name__})"


def config_fingerprint(cfg) -> str:
    return cfg.to_json_best_effort(sort_keys=True)


def check_distinct(points: list[Point], fingerprints: list[str]) -> None:
    seen = {}
    for point, fingerprint in zip(points, fingerprints):
        if fingerprint in seen:
            raise SweepError(f"points {seen[fingerprint].overrides} and {point.overrides} give the "
                             "same config; drop one of them")
        seen[fingerprint] = point


def check_overlap(fixed: dict[str, str], fields: list[str], extra: list[str]) -> None:
    both = sorted(set(fixed) & set(fields))
    if both:
        raise SweepError(f"{both} are both swept and fixed (--set / FIXED); keep one")
    for arg in extra:
        if arg.startswith(("--config", "--workdir")):
            raise SweepError(f"{arg!r} after --: set config fields with --set or --grid, "
                             "and the work directories with --root")


# --------------------------------------------------------------------- naming


def short_field_names(fields: list[str]) -> dict[str, str]:
    """The last part of each field (``learning_rate``), the whole path where two would clash."""
    leaves = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: leaf if leaves.count(leaf) == 1 else f for f, leaf in zip(fields, leaves)}


def sanitise(value: str) -> str:
    """Path-safe: ``(32, 64)`` -> ``32-64``, ``a/b`` -> ``a-b``; a leading minus stays."""
    return re.sub(r"[^A-Za-z0-9._+@-]+", " ", value).strip().replace(" ", "-")


def digest(overrides: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:6]


def point_name(overrides: dict[str, str], short: dict[str, str]) -> str:
    if not overrides:
        return "default"
    name = ",".join(f"{short[f]}={sanitise(v)}" for f, v in overrides.items())
    if len(name) > MAX_NAME:  # keep directory names usable; the digest keeps them distinct
        name = f"{name[:MAX_NAME - 7]}-{digest(overrides)}"
    return name


def name_points(overrides: list[dict[str, str]], fields: list[str]) -> list[str]:
    """Readable, stable names; where sanitising made two alike, each gets a digest."""
    short = short_field_names(fields)
    names = [point_name(o, short) for o in overrides]
    return [f"{n}-{digest(o)}" if names.count(n) > 1 else n for n, o in zip(names, overrides)]


# ---------------------------------------------------------------- build sweep


def build_sweep(args: argparse.Namespace) -> Sweep:
    """Points from --grid or --sweep, every one checked against the config."""
    if args.grid and args.sweep:
        raise SweepError("give --grid or --sweep, not both")
    raw, file_config, fixed = [{}], None, {}
    if args.sweep:
        raw, file_config, fixed = load_sweep_file(args.sweep)
    elif args.grid:
        raw = grid_points(parse_grid(args.grid))
    if not raw:
        raise SweepError(f"--sweep={args.sweep}: get_sweep() gave no points (an empty list, "
                         "or a grid field with no values)")
    config = args.config or file_config
    if not config:
        raise SweepError("give --config=FILE[:ARG] (or CONFIG in the sweep file)")
    fixed = as_flag_values(fixed)
    fixed.update(dict(parse_assignment(s, "--set") for s in args.set))
    overrides = [as_flag_values(p) for p in raw]
    fields = list(dict.fromkeys(f for o in overrides for f in o))
    check_overlap(fixed, fields, args.extra)
    check_field_names(config, [*fixed, *fields])
    points, fingerprints = [], []
    for o, name in zip(overrides, name_points(overrides, fields)):
        cfg = resolve_config(config, {**fixed, **o})
        points.append(Point(name, o, stages=int(cfg.stages.num)))
        fingerprints.append(config_fingerprint(cfg))
    check_distinct(points, fingerprints)
    return Sweep(config, Path(args.root), fields, fixed, points, args.extra, args.python)


def command(sweep: Sweep, point: Point) -> list[str]:
    overrides = {**sweep.fixed, **point.overrides}
    return [sweep.python, "-m", "t5x_like.train", f"--config={sweep.config}",
            f"--workdir={sweep.root / point.name}",
            *[f"--config.{k}={v}" for k, v in overrides.items()], *sweep.extra]


# ------------------------------------------------------------------- manifest


def write_manifest(sweep: Sweep) -> None:
    record = {"config": sweep.config, "fields": sweep.fields, "fixed": sweep.fixed,
              "extra": sweep.extra, "points": [dataclasses.asdict(p) for p in sweep.points]}
    write_text_atomic(sweep.root / MANIFEST, json.dumps(record, indent=2) + "\n")


def read_manifest(root: Path) -> Sweep:
    path = root / MANIFEST
    if not path.is_file():
        raise SweepError(f"{path} does not exist: gather with the sweep's own flags "
                         "(--config and --grid / --sweep), or run it in print or local mode first")
    record = json.loads(path.read_text())
    return Sweep(record["config"], root, record["fields"], record["fixed"],
                 [Point(**p) for p in record["points"]], record.get("extra", []))


# --------------------------------------------------------------------- status


def point_status(workdir: Path, stages: int) -> str:
    """completed | stopped (ran, then stopped early; running again resumes) | failed (the
    local runner saw a non-zero exit) | incomplete (started, no results yet) | missing."""
    results = read_results(workdir)
    if results is not None:
        return "completed" if is_completed(results, stages) else "stopped"
    record = read_json(workdir / RUN_RECORD)
    if record and record.get("returncode"):
        return "failed"
    return "incomplete" if workdir.is_dir() and any(workdir.iterdir()) else "missing"


# --------------------------------------------------------------------- gather


def point_row(sweep: Sweep, point: Point) -> dict:
    workdir = sweep.root / point.name
    row = {"point": point.name, **point.overrides, "status": point_status(workdir, point.stages)}
    results = read_results(workdir) or {}
    final, stage = final_results(results)
    logged = last_logged(workdir / stage / "metrics.jsonl")
    if logged:
        row.update(step=logged.get("step"), loss=logged["loss"])
    row.update(final.get("after", {}))
    return row


def gather(sweep: Sweep) -> tuple[list[str], list[dict]]:
    """``(columns, rows)``: the point, its swept fields, status, last step and loss, "after" metrics."""
    rows = [point_row(sweep, p) for p in sweep.points]
    base = ["point", *sweep.fields, "status", "step", "loss"]
    metrics = sorted({k for r in rows for k in r} - set(base))
    return base + metrics, rows


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
    return out.getvalue()


def write_tables(sweep: Sweep) -> list[dict]:
    columns, rows = gather(sweep)
    table = markdown(columns, rows)
    write_text_atomic(sweep.root / "sweep.md", table)
    write_text_atomic(sweep.root / "sweep.csv", csv_text(columns, rows))
    print(table, end="")
    print(f"(written to {sweep.root / 'sweep.md'} and {sweep.root / 'sweep.csv'})")
    return rows


# ---------------------------------------------------------------------- modes


def print_commands(sweep: Sweep) -> None:
    for point in sweep.points:
        print(shlex.join(command(sweep, point)))


def run_point(sweep: Sweep, point: Point, echo: bool) -> int:
    """Runs one point, appending its output to WORKDIR/train.log (and echoing it)."""
    workdir = sweep.root / point.name
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_RECORD).unlink(missing_ok=True)
    cmd = command(sweep, point)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach the log as they happen
    start = time.time()
    with open(workdir / "train.log", "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env)
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        finally:  # Ctrl-C reaches the child too; wait for it to save and exit
            returncode = proc.wait()
    record = {"returncode": returncode, "seconds": round(time.time() - start, 1), "command": cmd}
    write_text_atomic(workdir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    return returncode


def run_local(sweep: Sweep, dry_run: bool, echo: bool) -> int:
    """Every point not yet completed, in order; failures are reported at the end."""
    failed = []
    for i, point in enumerate(sweep.points, 1):
        workdir = sweep.root / point.name
        label = f"[{i}/{len(sweep.points)}] {point.name}"
        if is_completed(read_results(workdir), point.stages):
            print(f"{label}: completed earlier; skipping")
            continue
        if dry_run:
            print(f"{label}: would run {shlex.join(command(sweep, point))}")
            continue
        print(f"{label}: running (log: {workdir / 'train.log'})", flush=True)
        returncode = run_point(sweep, point, echo)
        if returncode:
            print(f"{label}: FAILED with exit status {returncode}; see {workdir / 'train.log'}")
            failed.append(point.name)
    if dry_run:
        return 0
    write_tables(sweep)
    if failed:
        print(f"{len(failed)} of {len(sweep.points)} points failed: {', '.join(failed)}\n"
              "fix the cause and run the same command again: finished points are skipped")
        return 1
    return 0


# ------------------------------------------------------------------------ CLI


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python launch/sweep.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="ml-collections config FILE[:ARG] (default: CONFIG of the sweep file)")
    p.add_argument("--root", required=True, help="every point's work directory goes under ROOT")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="sweep FIELD over these values (repeat for a cartesian product)")
    p.add_argument("--sweep", metavar="FILE.py", help="a sweep file defining get_sweep()")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="fix FIELD for every point (repeatable)")
    p.add_argument("--mode", choices=("print", "local"), default="print",
                   help="print: one shell-quoted command a line; local: run them here in turn")
    p.add_argument("--dry-run", action="store_true", help="local mode: say what would run, run nothing")
    p.add_argument("--gather", action="store_true",
                   help="only collect every point's results into ROOT/sweep.md and ROOT/sweep.csv")
    p.add_argument("--quiet", action="store_true", help="local mode: runs' output to train.log only")
    p.add_argument("--python", default=sys.executable, help="the interpreter in the commands")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments before ``--`` are the sweep's; those after go to every command."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # config files import ``configs.base``
    try:
        if args.gather and not (args.config or args.grid or args.sweep):
            write_tables(read_manifest(Path(args.root)))
            return 0
        sweep = build_sweep(args)
        if args.gather:
            write_tables(sweep)
            return 0
        if not args.dry_run:
            write_manifest(sweep)
        if args.mode == "print":
            print_commands(sweep)
            return 0
        return run_local(sweep, args.dry_run, echo=not args.quiet)
    except KeyboardInterrupt:
        print("sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except SweepError as e:
        print(f"error: sweep: {e}", file=sys.stderr)
        return cli.USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
