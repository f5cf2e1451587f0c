"""scripts/rlaif_vs_rlhf.py: the RLAIF-vs-RLHF study end to end on tiny testbed builds (every stage runs through
its library code, at a few steps), its labels and table against hand-computed values, and its resume."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlaif_jax.testbed import data, world
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("rlaif_vs_rlhf", os.path.join(ROOT, "scripts", "rlaif_vs_rlhf.py"))
study = importlib.util.module_from_spec(_spec)
sys.modules["rlaif_vs_rlhf"] = study  # its dataclass looks its module up while the module executes
_spec.loader.exec_module(study)


def test_grader_labels_prefer_the_higher_ground_truth_quality():
    cat = world.parse_instruction("describe a red cat")
    rng = np.random.default_rng(0)
    good = " ".join(data.good_response(rng, cat))  # passes: quality 4
    off_topic = " ".join(data.off_topic_response(rng, cat))
    assert study.quality(cat.text, good) == 4 and study.quality(cat.text, off_topic) < 4
    labels = study.grader_labels([{"prompt": cat.text, "response_a": good, "response_b": off_topic},
                                  {"prompt": cat.text, "response_a": off_topic, "response_b": good},
                                  {"prompt": cat.text, "response_a": good, "response_b": good}])
    assert [r["p_a_better"] for r in labels] == [1.0, 0.0, 0.5]


def test_summary_is_the_mean_of_build_means_with_a_hierarchical_interval():
    def run(win):
        return {f"{a} vs {b}": {"grader": win, "evaluator": 1 - win} for a, b in study.COMPARISONS} | {
            f"{p} pass rate": win for p in ("SFT",) + study.ARMS} | {"ai_label_agreement_with_grader": 0.8}

    per_build = {2: {1: run(0.2), 2: run(0.4)}, 3: {1: run(0.9)}}  # build means 0.3 and 0.9
    s = study.summarise(per_build)
    q = s["RLAIF vs SFT"]["grader"]
    assert q["mean"] == pytest.approx(0.6) and q["runs"] == [[0.2, 0.4], [0.9]]
    assert q["interval"][0] <= 0.3 and q["interval"][1] >= 0.9 - 1e-9  # resampled builds reach both build means
    assert s["RLAIF vs SFT"]["evaluator"]["mean"] == pytest.approx(0.4)
    assert s["ai_label_agreement_with_grader"] == {"per_build": {2: 0.8, 3: 0.8}}
    text = study.table(s, [2, 3], [1, 2], 7)
    assert "| RLAIF vs SFT | 71% | 60% [" in text


def test_the_evaluator_is_never_a_pipeline_build(tmp_path):
    with pytest.raises(SystemExit, match="evaluator_build=2 is also a pipeline build"):
        study.run(str(tmp_path), [2], [1], 2, study.Settings.small())


def run_cli(out: str) -> str:
    """The script's smoke run (tiny builds, a few steps per stage) as a user runs it, in a process of its own with
    one CPU device (the tests' 8 simulated devices are for sharding tests; the study runs unsharded here)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "rlaif_vs_rlhf.py"), "--out", out,
                           "--builds", "2", "--seeds", "1", "--evaluator_build", "3", "--smoke"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_study_runs_every_stage_and_resumes_without_rerunning(tmp_path):
    out = str(tmp_path / "study")
    first = run_cli(out)
    for stage in ("SFT", "reward model (RLAIF)", "reward model (RLHF)", "seed 1 RLAIF", "seed 1 RLHF",
                  "seed 1 d-RLAIF", "seed 1 evaluation"):
        assert f"build 2 {stage}: done" in first

    b = os.path.join(out, "b2")
    # The SFT policy started from the seeded random base, and every RL arm from the SFT policy.
    for arm in ("rlaif", "rlhf", "d-rlaif"):
        with open(os.path.join(b, f"{arm}_s1", "config.json")) as f:
            assert json.load(f)["policy"]["path"] == os.path.join(b, "sft", "final_policy")
    with open(os.path.join(b, "rlaif_s1", "config.json")) as f:
        assert json.load(f)["judge"]["path"] == os.path.join(b, "rm_rlaif", "reward_model")
    # AI labels: the judge's two orders averaged; grader labels: hard, or 1/2 on a tie; same pairs in both.
    ai, human = (study.read_jsonl(os.path.join(b, f)) for f in ("labels_ai.jsonl", "labels_grader.jsonl"))
    assert len(ai) == len(human) == study.Settings.small().pairs
    for a, h in zip(ai, human):
        assert (a["prompt"], a["response_a"]) == (h["prompt"], h["response_a"])
        assert a["p_a_better"] == pytest.approx((a["p_a_better_ab"] + a["p_a_better_ba"]) / 2)
        assert h["p_a_better"] == study.grader_labels([h])[0]["p_a_better"] and h["p_a_better"] in (0.0, 0.5, 1.0)
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)["summary"]
    for a, b_ in study.COMPARISONS:
        for who in ("grader", "evaluator"):
            q = summary[f"{a} vs {b_}"][who]
            assert 0 <= q["interval"][0] <= q["mean"] <= q["interval"][1] <= 1
    assert os.path.exists(os.path.join(out, "table.md"))

    again = run_cli(out)
    assert "done in" not in again.replace("study done in", "")  # every stage's output found: nothing reran
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["summary"] == summary
