"""The training program end to end: exact resume after SIGTERM and SIGKILL, config errors, two processes."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest

from rlaif_jax import config as config_lib
from tests import tiny, tiny_config
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    tiny.make_world(root)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # The runs of one test share XLA's persistent compilation cache: the program compiles once, not per run.
    return str(tmp_path_factory.mktemp("xla_cache"))


def env(cache_dir, devices=1):
    e = dict(os.environ)
    e["XLA_FLAGS"] = xla_flags(devices)
    e["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["PYTHONPATH"] = ROOT
    return e


def command(world, workdir, *overrides):
    return [sys.executable, "-m", "rlaif_jax.train", f"--config={CONFIG}:{world}", f"--workdir={workdir}",
            *overrides]


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_workdir(world, cache_dir, tmp_path_factory):
    """tests/tiny_config.py's run, uninterrupted (token-space judge, evaluation at 0, 3 and 6)."""
    full = str(tmp_path_factory.mktemp("full"))
    subprocess.run(command(world, full), env=env(cache_dir), check=True, capture_output=True, cwd=ROOT)
    assert os.path.exists(os.path.join(full, "final_policy", "model.safetensors"))
    return full


@pytest.fixture(scope="module")
def full_run(full_workdir):
    """The metrics of the uninterrupted run."""
    return read_metrics(full_workdir)


def wait_for_lines(proc, path, n):
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.05)


def test_resume_after_sigterm_then_sigkill_reproduces_every_step(world, cache_dir, tmp_path, full_run):
    killed = str(tmp_path / "killed")
    reference = full_run
    assert [m["step"] for m in reference] == list(range(7))
    path = os.path.join(killed, "metrics.jsonl")

    # SIGTERM (a preemption notice) once the evaluation of step 0 is logged, before the first step is compiled: the
    # run stops after step 1 with a checkpoint of it (not an interval step: checkpoint.every_steps=2) and says so.
    proc = subprocess.Popen(command(world, killed), env=env(cache_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(proc, path, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM after step 1" in err and "resume from step 2" in err
    assert "checkpoint of step 1 -> " in err
    assert os.listdir(os.path.join(killed, "checkpoints")) == ["1"]
    assert read_metrics(killed) == reference[:2]

    # The resumed run is killed (SIGKILL: no cleanup of any kind) as soon as step 4 is logged, mid-run.
    proc = subprocess.Popen(command(world, killed), env=env(cache_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_lines(proc, path, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(killed)) < len(reference), "the run finished before it could be killed"

    subprocess.run(command(world, killed), env=env(cache_dir), check=True, capture_output=True, cwd=ROOT)
    assert read_metrics(killed) == reference


def test_corrupt_checkpoint_is_one_line_naming_it(world, cache_dir, tmp_path, full_workdir):
    workdir = shutil.copytree(full_workdir, str(tmp_path / "copy"))
    state = os.path.join(workdir, "checkpoints", "6", "state")
    for folder, _, files in os.walk(state):
        for name in files:
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)
    out = subprocess.run(command(world, workdir, "--config.train.steps=8"), env=env(cache_dir), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1].startswith(
        f"FATAL checkpoint error: the checkpoint {os.path.join(workdir, 'checkpoints', '6')} ")


def test_host_judge_path_run_with_held_out_evaluation(world, cache_dir, tmp_path, full_run):
    """A judge whose tokenizer differs from the policy's: training and the held-out evaluation (reward judge and
    win rate) both run on the host path. Its evaluation of the initial policy (step 0, the same eval key) equals
    the token-space run's: the same judge behind another tokenizer."""
    judge = tiny.write_judge_with_other_tokenizer(str(tmp_path / "other_judge"))
    workdir = str(tmp_path / "host")
    out = subprocess.run(command(world, workdir, f"--config.judge.path={judge}",
                                 "--config.train.allow_tokenizer_mismatch=True", "--config.train.steps=2",
                                 "--config.eval.every=2"), env=env(cache_dir), cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "templating path=host" in out.stderr
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["judge_path_is_token_space"] == 0 and full_run[0]["judge_path_is_token_space"] == 1
    names = ("eval/judge_score", "eval/win_rate", "eval/position_agreement", "eval/kl", "eval/response_length")
    for name in names:
        assert name in metrics[2], name
        assert metrics[0][name] == pytest.approx(full_run[0][name], abs=1e-5), name
    assert metrics[0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference


def run_expecting_error(world, cache_dir, tmp_path, *overrides):
    out = subprocess.run(command(world, str(tmp_path / "run"), *overrides), env=env(cache_dir), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0
    return out.stderr


def test_error_typo_in_override(world, cache_dir, tmp_path):
    err = run_expecting_error(world, cache_dir, tmp_path, "--config.polcy.path=x")
    assert 'Did you mean "policy" instead of "polcy"?' in err
    assert "Traceback" not in err


def test_error_mistyped_field(world, cache_dir, tmp_path):
    err = run_expecting_error(world, cache_dir, tmp_path, "--config.train.steps=many")
    assert "FATAL config error: flag --config.train.steps=many: invalid literal for int()" in err


def test_error_missing_field(world, cache_dir, tmp_path):
    err = run_expecting_error(world, cache_dir, tmp_path, "--config.policy.path=")
    assert "config.policy.path is empty: set it to an HF checkpoint folder or hub id" in err


def test_error_batch_not_divisible_by_mesh(world, cache_dir, tmp_path):
    e = env(cache_dir, devices=4)
    out = subprocess.run(command(world, str(tmp_path / "run"), "--config.train.batch_size=6"), env=e, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert ("config.train.batch_size=6 is not divisible by the mesh's batch shards (data x fsdp = 4); "
            "use a multiple of 4") in out.stderr


def test_error_judge_template_without_slot(world, cache_dir, tmp_path):
    err = run_expecting_error(world, cache_dir, tmp_path, "--config.judge.template=Q : {prompt} S :")
    assert "{response}" in err and "config.judge.template" in err


def test_error_tokenizer_mismatch_not_allowed(world, cache_dir, tmp_path):
    other = tiny.write_judge_with_other_tokenizer(str(tmp_path / "other_judge"))
    err = run_expecting_error(world, cache_dir, tmp_path, f"--config.judge.path={other}")
    assert "differs from the policy's" in err and "--config.train.allow_tokenizer_mismatch=True" in err


def test_error_rollout_setting_before_anything_loads(cache_dir, tmp_path):
    """Sampling settings are checked with the config, before the policy (missing here) is looked for."""
    out = subprocess.run(command(str(tmp_path / "no_world"), str(tmp_path / "run"), "--config.rollout.top_p=0"),
                         env=env(cache_dir), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "rollout.top_p=0.0 must be in (0, 1] (1.0 turns it off)" in out.stderr


ONLINE_DPO = {"algo.estimator": "online_dpo", "critic.kind": "none", "rollout.n_samples": 2, "judge.mode": "pairwise",
              "judge.template": "Q : {prompt} R : {response} R : {response_b} S :", "reward.kl_coef": 0.0,
              "reward.missing_stop_mode": "none"}


@pytest.mark.parametrize("override,message", [
    ({}, None),
    ({"judge.mode": "pointwise", "judge.template": "Q : {prompt} R : {response} S :"},
     "algo.estimator='online_dpo' learns from a pairwise judge's preferences: set config.judge.mode='pairwise'"),
    ({"critic.kind": "value_head"}, "algo.estimator='online_dpo' trains no critic: set config.critic.kind='none'"),
    ({"rollout.n_samples": 1}, "set config.rollout.n_samples >= 2 (it is 1)"),
    ({"reward.kl_coef": 0.05}, "reward.kl_coef=0.05 shapes a scalar reward, which online_dpo does not use (its KL "
                               "strength is algo.dpo_beta): set reward.kl_coef=0.0"),
    ({"reward.missing_stop_mode": "replace"}, "set reward.missing_stop_mode='none'"),
    ({"algo.loss_agg": "seq_mean_token_mean"}, "algo.loss_agg='seq_mean_token_mean' is a PPO-family setting that "
                                               "online_dpo does not use: leave it at its default 'token_mean'"),
    ({"train.batch_size": 4, "algo.minibatches": 8},
     "8 rows of (chosen, rejected) pairs per step (2 x train.batch_size) cannot be split into "
     "algo.minibatches=8 x optim.grad_accum=1 micro-batches of whole pairs"),
])
def test_online_dpo_config_checks(override, message):
    """What online_dpo refuses, each in one line that says what to change; the settings it needs pass."""
    c = tiny_config.get_config()
    for key, value in {**ONLINE_DPO, **override}.items():
        section, field = key.split(".")
        c[section][field] = value
    if message is None:
        config_lib.validate(c, num_devices=1)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate(c, num_devices=1)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(world, cache_dir, workdir):
    address = f"localhost:{free_port()}"
    procs = [subprocess.Popen(command(world, workdir, f"--coordinator_address={address}", "--num_processes=2",
                                      f"--process_id={i}", "--config.train.steps=2", "--config.eval.every=2"),
                              env=env(cache_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outputs]


def test_two_processes_complete_a_run_each_loading_its_shard(world, cache_dir, tmp_path):
    for attempt in range(3):
        workdir = str(tmp_path / f"two-{attempt}")
        codes, errs = run_two_processes(world, cache_dir, workdir)
        gloo = [e for c, e in zip(codes, errs) if c != 0 and "Gloo context initialization failed" in e]
        if not gloo:
            break
        # jax's CPU collectives (gloo) give each new communicator 30 s (fixed in XLA's GlooKeyValueStore) for both
        # processes to publish their addresses: when the two reach a collective more than 30 s apart, as when the
        # host is loaded and one compiles its step slower (seen in CI and here, 2026-12-07, in a process_allgather
        # after the first step), set-up fails. That is the transport, not our program: run again in a new folder,
        # at most three times, and say so.
        warnings.warn(f"two-process run {attempt + 1}: gloo's 30 s connection set-up timed out:\n" + gloo[0][-800:])
    # Either process's failure can show up as the other's (a collective waiting for a dead peer): show both.
    assert codes == [0, 0], "\n".join(f"--- process {i} (exit {c}):\n{e[-2500:]}"
                                      for i, (c, e) in enumerate(zip(codes, errs)))
    for i, err in enumerate(errs):
        assert f"process {i}/2 loads 4 of 8 rows per batch" in err
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/judge_score" in metrics[-1]
    assert os.path.exists(os.path.join(workdir, "final_policy", "model.safetensors"))
