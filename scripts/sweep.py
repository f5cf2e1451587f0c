"""A sweep: one config, a grid of overrides, one run per grid point, one table and overlaid plots at the end.

    python scripts/sweep.py --config experiments/testbed.py:small --out sweeps/kl \\
        --grid reward.kl_estimator=k2,k3 --grid reward.kl_coef=0.01,0.1 --grid reward.score_norm=none,whiten \\
        [--set train.steps=200 ...] [--launcher local|print|gpu|tpu|slurm] [--report_only]

Grid: every `--grid KEY=V1,V2,...` is one axis (or `--grid_file grid.json` holding {"KEY": [V1, V2], ...}); the
runs are the cartesian product, in the order the axes are given. `--set KEY=V` applies to every run. Values reach
the training program as `--config.KEY=V` (absl parses them with the field's type).

Each run's name lists its grid values ("kl_estimator=k2,kl_coef=0.01"); its workdir is OUT/runs/<name with "="
as "-" and "," as "__">. Launchers:
  local   (default) runs them here one after another, each in a fresh process (`python -m rlaif_jax.train`), its
          output in WORKDIR/train.log; a run whose workdir holds the marker DONE_MARKER is skipped, so a re-invoked
          sweep continues where it stopped. A failed run is reported and the sweep goes on.
  print   prints one `python -m rlaif_jax.train ...` command per run;
  gpu / tpu / slurm   print one launcher command per run (scripts/launch_gpu_node.sh, launch_tpu_pod.sh,
          `sbatch scripts/launch_slurm.sbatch`); run them on the cluster, then `--report_only` to aggregate.
Afterwards (not with the printing launchers) the runs that have metrics are aggregated by rlaif_jax.report into
OUT/report/ (summary.md, one PNG per metric with the runs overlaid), the table printed; OUT/sweep.json records the
grid and each run's overrides, workdir and status.

Runs of a local sweep share XLA's persistent compilation cache (OUT/xla_cache unless JAX_COMPILATION_CACHE_DIR is
set), so grid points that compile to the same program compile once.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Sequence

from rlaif_jax import metrics, report

DONE_MARKER = "SWEEP_RUN_DONE"
LAUNCHERS = ("local", "print", "gpu", "tpu", "slurm")


# ---------------------------------------------------------------------------------------------- the grid
def parse_assignment(text: str) -> tuple[str, str]:
    """"a.b=v" -> ("a.b", "v")."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def parse_grid(axes: Sequence[str], grid_json: dict | None = None) -> list[tuple[str, list[str]]]:
    """--grid "KEY=V1,V2" flags (and a {"KEY": [V1, V2]} dict) -> [(KEY, [V1, V2]), ...] in the given order."""
    grid: list[tuple[str, list[str]]] = []
    for axis in axes:
        key, values = parse_assignment(axis)
        grid.append((key, [v.strip() for v in values.split(",")]))
    for key, values in (grid_json or {}).items():
        values = values if isinstance(values, list) else [values]
        grid.append((key, [v if isinstance(v, str) else json.dumps(v) for v in values]))
    keys = [k for k, _ in grid]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"grid axes given twice: {duplicates}")
    for key, values in grid:
        if not values or any(v == "" for v in values):
            raise ValueError(f"grid axis {key!r} has an empty value: {values}")
    return grid


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its last component, or by more components where the last ones collide."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(1 for k in keys if k.split(".")[-n:] == parts[-n:]) == 1:
                break
        names[key] = name
    return names


def expand(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product: one {KEY: value} per run, the last axis varying fastest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in grid))]


def run_label(point: dict[str, str]) -> str:
    names = short_names(list(point))
    return ",".join(f"{names[k]}={v}" for k, v in point.items()) or "base"


def folder_name(label: str) -> str:
    """A label as a folder name: "=" -> "-", "," -> "__", and nothing a shell or a path would misread."""
    out = label.replace("=", "-").replace(",", "__")
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in out)


# ---------------------------------------------------------------------------------------------- commands
def train_args(config: str, workdir: str, overrides: dict[str, str]) -> list[str]:
    """Arguments of `python -m rlaif_jax.train` for one run."""
    return [f"--config={config}", f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def launch_command(launcher: str, config: str, workdir: str, overrides: dict[str, str]) -> list[str]:
    """The command that runs one grid point with `launcher` (argv list)."""
    if launcher in ("local", "print"):
        python = sys.executable if launcher == "local" else "python"
        return [python, "-m", "rlaif_jax.train", *train_args(config, workdir, overrides)]
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    script = {"gpu": "scripts/launch_gpu_node.sh", "tpu": "scripts/launch_tpu_pod.sh"}.get(launcher)
    if script:  # the launchers take CONFIG WORKDIR [overrides...]
        return ["bash", script, config, workdir, *flags]
    if launcher == "slurm":
        return ["sbatch", f"--job-name={os.path.basename(workdir)[:60]}", "scripts/launch_slurm.sbatch", config,
                workdir, *flags]
    raise ValueError(f"launcher {launcher!r}; use one of {LAUNCHERS}")


def run_local(command: list[str], workdir: str, env: dict[str, str]) -> int:
    """Runs one training program to completion in its own process; output to workdir/train.log."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.log"), "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        # From the caller's folder: relative config paths mean what they meant there.
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def paper_seeds(config: str) -> tuple[int, ...]:
    """The PAPER_SEEDS of an experiment file (experiments/X.py[:arg]): the seed count of the paper it reproduces."""
    import importlib.util

    path = config.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("sweep_experiment", path)
    if spec is None or not os.path.exists(path):
        raise SystemExit(f"--paper_seeds: no experiment file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "PAPER_SEEDS"):
        raise SystemExit(f"--paper_seeds: {path} names no PAPER_SEEDS (only the paper recipes do)")
    return tuple(module.PAPER_SEEDS)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiments/X.py[:arg]")
    p.add_argument("--out", required=True, help="sweep folder: runs/, report/, sweep.json")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="one axis of the grid")
    p.add_argument("--grid_file", default="", help='JSON file {"KEY": [V1, V2], ...} with more axes')
    p.add_argument("--set", action="append", default=[], metavar="KEY=V", help="override for every run")
    p.add_argument("--paper_seeds", action="store_true",
                   help="add a seed axis with the seeds of the paper the config reproduces (its PAPER_SEEDS)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--report_only", action="store_true", help="aggregate the runs' metrics, start nothing")
    p.add_argument("--rerun", action="store_true", help="local: also run grid points already marked done")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA factor of the train curves in the plots")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grid_json = None
    if args.grid_file:
        with open(args.grid_file) as f:
            grid_json = json.load(f)
    grid = parse_grid(args.grid, grid_json)
    if args.paper_seeds:
        grid.append(("seed", [str(s) for s in paper_seeds(args.config)]))
    fixed = dict(parse_assignment(s) for s in args.set)
    clash = sorted(set(fixed) & {k for k, _ in grid})
    if clash:
        raise SystemExit(f"keys both in --set and --grid: {clash}")
    # Printed cluster commands keep the folder as given (it names a path on the cluster's shared filesystem).
    out = args.out if args.launcher != "local" and not args.report_only else os.path.abspath(args.out)
    points = expand(grid)
    runs = []
    for point in points:
        label = run_label(point)
        runs.append({"label": label, "workdir": os.path.join(out, "runs", folder_name(label)),
                     "overrides": {**fixed, **point}, "status": "pending"})

    # ---- print the commands for a cluster
    if args.launcher != "local" and not args.report_only:
        for r in runs:
            print(shlex.join(launch_command(args.launcher, args.config, r["workdir"], r["overrides"])))
        print(f"# then: python scripts/sweep.py --config {shlex.quote(args.config)} --out {shlex.quote(args.out)} "
              "<the same --grid/--set> --report_only", file=sys.stderr)
        return 0

    # ---- run them here, one after another, each a fresh process
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "xla_cache"))
    failed = 0
    for i, r in enumerate(runs, 1):
        done = os.path.exists(os.path.join(r["workdir"], DONE_MARKER))
        if args.report_only or (done and not args.rerun):
            r["status"] = "done" if done else "not run"
            continue
        start = time.time()
        print(f"[{i}/{len(runs)}] {r['label']} -> {r['workdir']}", file=sys.stderr, flush=True)
        rc = run_local(launch_command("local", args.config, r["workdir"], r["overrides"]), r["workdir"], env)
        r["status"] = "done" if rc == 0 else f"failed (exit {rc})"
        r["seconds"] = round(time.time() - start, 1)
        if rc == 0:
            open(os.path.join(r["workdir"], DONE_MARKER), "w").close()
        else:
            failed += 1
            print(f"  failed with exit code {rc}; see {os.path.join(r['workdir'], 'train.log')}", file=sys.stderr)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"config": args.config, "grid": dict(grid), "fixed": fixed, "runs": runs}, f, indent=2)

    # ---- aggregate: one table, overlaid plots
    have = [r for r in runs if os.path.exists(os.path.join(r["workdir"], metrics.METRICS_FILE))]
    if not have:
        print("no run has metrics yet; nothing to report", file=sys.stderr)
        return 1
    _, table = report.make_report([r["workdir"] for r in have], os.path.join(out, "report"),
                                  [r["label"] for r in have], smooth=args.smooth)
    print(table)
    print(f"report: {os.path.join(out, 'report')} ({len(have)} of {len(runs)} runs)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
