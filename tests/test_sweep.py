"""scripts/sweep.py: the grid, run names, printed cluster commands, and a real 2-point sweep with its table.

The end-to-end sweep runs the testbed's small variant when experiments/testbed.py exists, otherwise the tiny
world of tests/tiny.py (tests/tiny_config.py); both through the same training program.
"""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from tests import tiny
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTBED = os.path.join(ROOT, "experiments", "testbed.py")
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")

_spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "scripts", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_grid_is_the_cartesian_product_in_flag_order():
    grid = sweep.parse_grid(["reward.kl_estimator=k1,k3", "reward.kl_coef=0.01, 0.1"],
                            {"reward.score_norm": ["none"], "algo.epochs": [2]})
    assert grid == [("reward.kl_estimator", ["k1", "k3"]), ("reward.kl_coef", ["0.01", "0.1"]),
                    ("reward.score_norm", ["none"]), ("algo.epochs", ["2"])]
    points = sweep.expand(grid)
    assert [(p["reward.kl_estimator"], p["reward.kl_coef"]) for p in points] == [
        ("k1", "0.01"), ("k1", "0.1"), ("k3", "0.01"), ("k3", "0.1")]
    assert sweep.run_label(points[1]) == "kl_estimator=k1,kl_coef=0.1,score_norm=none,epochs=2"
    assert sweep.folder_name("kl_estimator=k1,kl_coef=0.1") == "kl_estimator-k1__kl_coef-0.1"
    assert sweep.folder_name("path=/a b") == "path-_a_b"
    assert sweep.expand([]) == [{}] and sweep.run_label({}) == "base"


def test_names_disambiguate_keys_with_the_same_last_part():
    assert sweep.short_names(["reward.kl_coef", "algo.kl_coef", "seed"]) == {
        "reward.kl_coef": "reward.kl_coef", "algo.kl_coef": "algo.kl_coef", "seed": "seed"}


def test_grid_errors():
    with pytest.raises(ValueError, match="twice"):
        sweep.parse_grid(["seed=0,1", "seed=2"])
    with pytest.raises(ValueError, match="empty value"):
        sweep.parse_grid(["seed=0,"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_grid(["seed"])


@pytest.mark.parametrize("launcher", ["print", "gpu", "tpu", "slurm"])
def test_printed_commands_one_per_run(launcher, capsys):
    config = "experiments/rlaif_tldr.py:runlocal"
    rc = sweep.main(["--config", config, "--out", "sweeps/s", "--grid", "reward.kl_coef=0.01,0.1",
                     "--set", "train.steps=3", "--launcher", launcher])
    assert rc == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert len(lines) == 2
    for argv, coef in zip(lines, ("0.01", "0.1")):
        workdir = f"sweeps/s/runs/kl_coef-{coef}"
        overrides = ["--config.train.steps=3", f"--config.reward.kl_coef={coef}"]
        expected = {
            "print": ["python", "-m", "rlaif_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides],
            "gpu": ["bash", "scripts/launch_gpu_node.sh", config, workdir, *overrides],
            "tpu": ["bash", "scripts/launch_tpu_pod.sh", config, workdir, *overrides],
            "slurm": ["sbatch", f"--job-name=kl_coef-{coef}", "scripts/launch_slurm.sbatch", config, workdir,
                      *overrides],
        }[launcher]
        assert argv == expected


def test_paper_seeds_add_the_papers_seed_axis(capsys):
    """--paper_seeds runs the reproduction's 4 seeds (ppo_tldr_details: its sbatch file's SEEDS)."""
    assert sweep.main(["--config", os.path.join(ROOT, "experiments", "ppo_tldr_details.py") + ":runlocal", "--out", "/cluster/s", "--launcher",
                       "print", "--paper_seeds"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("--config.seed=")[1].split()[0] for line in lines] == ["44413", "55513", "66613", "77713"]
    with pytest.raises(SystemExit, match="no PAPER_SEEDS"):
        sweep.main(["--config", os.path.join(ROOT, "experiments", "testbed.py"), "--out", "/x", "--launcher", "print", "--paper_seeds"])


def test_printed_gpu_command_reaches_the_training_program_with_the_overrides(capsys):
    sweep.main(["--config", "c.py", "--out", "o", "--grid", "seed=4", "--launcher", "gpu"])
    argv = shlex.split(capsys.readouterr().out.strip())
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1"}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert shlex.split(out.stdout) == ["python3", "-m", "rlaif_jax.train", "--config=c.py", "--workdir=o/runs/seed-4",
                                       "--config.seed=4"]


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory):
    """The testbed's small variant when it exists, else the tiny world's config (its argument: the world)."""
    if os.path.exists(TESTBED):
        return f"{TESTBED}:small"
    world = str(tmp_path_factory.mktemp("world"))
    tiny.make_world(world)
    return f"{TINY_CONFIG}:{world}"


def test_local_sweep_runs_each_point_and_writes_one_table(sweep_config, tmp_path):
    out = str(tmp_path / "sweep")
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(1)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla_cache")  # the second run reuses the first's program
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    command = [sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "--config", sweep_config, "--out", out,
               "--grid", "reward.kl_coef=0.01,0.2", "--set", "train.steps=2", "--set", "eval.every=0",
               "--set", "checkpoint.every_steps=100",
               "--set", "train.export_final=False"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.load(open(os.path.join(out, "sweep.json")))
    assert [r["label"] for r in manifest["runs"]] == ["kl_coef=0.01", "kl_coef=0.2"]
    assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
    for run, coef in zip(manifest["runs"], (0.01, 0.2)):
        config = json.load(open(os.path.join(run["workdir"], "config.json")))
        assert config["reward"]["kl_coef"] == coef and config["train"]["steps"] == 2  # each run got its point
        steps = [json.loads(line)["step"] for line in open(os.path.join(run["workdir"], "metrics.jsonl"))]
        assert steps == [1, 2]  # (no evaluation: the sweep's report reads the training curves)

    # One markdown table, a row per run (label, last step), printed and written; overlaid plots next to it.
    table = open(os.path.join(out, "report", "summary.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| kl_coef=")]
    assert [r.split("|")[1:3] for r in rows] == [[" kl_coef=0.01 ", " 2 "], [" kl_coef=0.2 ", " 2 "]]
    assert "| kl_coef=0.01 | 2 |" in result.stdout
    pngs = [f for f in os.listdir(os.path.join(out, "report")) if f.endswith(".png")]
    assert "judge_score.png" in pngs

    # Invoked again: finished points are skipped (nothing retrains), the report is rebuilt.
    log = os.path.join(manifest["runs"][0]["workdir"], "train.log")
    size, start = os.path.getsize(log), time.time()
    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert again.returncode == 0 and os.path.getsize(log) == size
    assert "| kl_coef=0.2 | 2 |" in again.stdout and time.time() - start < 60
