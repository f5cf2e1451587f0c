"""rlaif_jax.report and its CLI scripts/report.py on two small fake runs: PNGs for the curves present, and the
summary table."""
import json
import os
import subprocess
import sys

import pytest

from rlaif_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "report.py")


def write_run(path, records, torn_tail=False):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        if torn_tail:
            f.write('{"step": 9, "judge')


@pytest.fixture
def two_runs(tmp_path):
    a = [{"step": s, "judge/score": v, "kl/k1": 0.1 * s, "response/length": 10 + s}
         for s, v in zip(range(1, 7), [0.1, 0.3, 0.6, 0.5, 0.4, 0.45])]
    a += [{"step": 3, "eval/judge_score": 0.5, "eval/win_rate": 0.6},
          {"step": 6, "eval/judge_score": 0.7, "eval/win_rate": 0.55}]
    b = [{"step": s, "judge/score": 0.2 * s, "kl/k1": 0.05 * s} for s in range(1, 5)]
    b += [{"step": 4, "eval/judge_score": 0.65, "eval/gt/pass_rate": 0.25}]
    write_run(tmp_path / "run_a", a, torn_tail=True)
    write_run(tmp_path / "run_b", b)
    return str(tmp_path / "run_a"), str(tmp_path / "run_b")


def test_cli_writes_pngs_and_table(tmp_path, two_runs):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, *two_runs, "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image

    expected = {"judge_score", "kl_k1", "response_length", "eval_judge_score", "eval_gt_pass_rate", "eval_win_rate"}
    assert {f[:-4] for f in os.listdir(out) if f.endswith(".png")} == expected  # eval/kl etc. never logged
    for name in expected:
        img = matplotlib.image.imread(out / f"{name}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real, non-blank picture
    table = (out / "summary.md").read_text()
    assert table.split("\n", 2)[2] == proc.stdout.strip() + "\n"
    rows = [line.split(" | ") for line in proc.stdout.strip().splitlines()]
    header = [h.strip("| ") for h in rows[0]]
    cells = {r[0].strip("| "): dict(zip(header, (c.strip("| ") for c in r))) for r in rows[2:]}
    ra, rb = cells["run_a"], cells["run_b"]
    assert ra["last step"] == "6" and rb["last step"] == "4"
    assert ra["judge/score final"] == "0.45" and ra["judge/score best (step)"] == "0.6 (3)"
    assert rb["judge/score final"] == "0.8" and rb["judge/score best (step)"] == "0.8 (4)"
    assert ra["kl/k1 final"] == "0.6" and rb["kl/k1 final"] == "0.2" and "kl/k1 best (step)" not in header
    assert ra["eval/judge_score final"] == "0.7" and ra["eval/win_rate best (step)"] == "0.6 (3)"
    assert ra["eval/gt/pass_rate final"] == "-" and rb["eval/gt/pass_rate final"] == "0.25"
    assert rb["response/length final"] == "-"


def test_series_ema_best():
    recs = [{"step": 2, "x": 1.0}, {"step": 1, "x": 3.0}, {"step": 2, "x": 2.0}, {"step": 3, "y": 1.0}]
    assert report.series(recs, "x") == ([1, 2], [3.0, 2.0])  # sorted, the later record for a step wins
    # alpha 0.5 on [2, 4]: m1 = 1 -> 1/0.5 = 2; m2 = 0.5 + 2 = 2.5 -> 2.5/0.75
    assert report.ema([2.0, 4.0], 0.5) == pytest.approx([2.0, 2.5 / 0.75])
    assert report.best([1, 2, 3], [0.5, float("nan"), 0.2], -1) == (0.2, 3)
    assert report.best([1, 2], [0.5, 0.5], +1) == (0.5, 1) and report.best([1], [1.0], 0) is None
    assert report.labels_for(["/x/a/run", "/y/b/run"]) == ["/x/a/run", "/y/b/run"]


def test_bootstrap_interval_and_seed_table():
    """The interval is the quantiles of resampled means (checked against an independent NumPy loop); the table
    shows mean, std (ddof 1), the interval and each run's value."""
    import numpy as np

    from rlaif_jax.report import seed_table
    from rlaif_jax.stats import bootstrap_interval
    values = [0.2, 0.5, 0.9, 0.4]
    lo, hi = bootstrap_interval(values, resamples=2000, seed=3)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 4, (2000, 4))
    means = np.array([np.mean([values[i] for i in row]) for row in idx])
    assert (lo, hi) == (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    assert min(values) <= lo < np.mean(values) < hi <= max(values)
    assert np.allclose(bootstrap_interval([0.7, 0.7, 0.7]), (0.7, 0.7))
    table = seed_table({"a": [{"x": v} for v in values]}, ["x", "y"])
    lo, hi = bootstrap_interval(values)
    assert f"| a | 4 | 0.500 +- {np.std(values, ddof=1):.3f} [{lo:.3f}, {hi:.3f}] (0.200, 0.500, 0.900, 0.400) | - |" in table


def test_judge_agreement_on_the_policy_samples():
    """evaluate.judge_agreement: AUC against each binary ground-truth metric with both classes (hand-counted), the
    accuracy at the scale's middle for a rubric judge, none for a pairwise one; non-binary or one-class metrics
    are skipped."""
    import numpy as np

    from rlaif_jax.evaluate import judge_agreement
    scores = np.asarray([0.9, 0.2, 0.6, 0.4])
    gt = {"pass_rate": np.asarray([1.0, 0.0, 0.0, 1.0]), "all_pass": np.ones(4), "graded": np.asarray([0.5, 1, 0, 1])}
    out = judge_agreement(scores, gt, "rubric")
    # positives 0.9, 0.4 vs negatives 0.2, 0.6: pairs won 0.9>0.2, 0.9>0.6, 0.4>0.2; lost 0.4<0.6 -> 3/4
    assert out == {"judge_gt_auc/pass_rate": 0.75, "judge_gt_accuracy/pass_rate": 0.5}
    assert judge_agreement(scores, gt, "pairwise") == {"judge_gt_auc/pass_rate": 0.75}


def test_hierarchical_bootstrap():
    """Builds resampled, then seeds within each drawn build (a loop written out with the same draws); constant data
    gives a point; with the seeds of a build alike, the interval is the spread of the build means."""
    import numpy as np

    from rlaif_jax.stats import hierarchical_bootstrap
    groups = [[0.1, 0.3], [0.5, 0.4, 0.9], [0.2]]
    rng, means = np.random.default_rng(5), []
    for _ in range(500):
        picked = rng.integers(0, 3, 3)
        inner = []
        for g in picked:
            values = groups[g]
            inner.append(np.mean([values[i] for i in rng.integers(0, len(values), len(values))]))
        means.append(np.mean(inner))
    assert hierarchical_bootstrap(groups, resamples=500, seed=5) == (float(np.quantile(means, 0.025)),
                                                                    float(np.quantile(means, 0.975)))
    assert np.allclose(hierarchical_bootstrap([[0.3, 0.3], [0.3]]), (0.3, 0.3))
    lo, hi = hierarchical_bootstrap([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    assert 0.0 <= lo < 0.5 < hi <= 1.0


def test_grand_mean_weighs_each_group_once():
    from rlaif_jax.stats import grand_mean
    assert grand_mean([[0.1, 0.3], [0.5, 0.4, 0.9], [0.2]]) == pytest.approx((0.2 + 0.6 + 0.2) / 3)


def test_study_summary_and_table():
    """scripts/study.py's statistics from fake run summaries grouped by build."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "study.py")
    spec = importlib.util.spec_from_file_location("study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)

    def run(sft, rl, auc=0.9):
        return {"sft_pass_rate": sft, "rlaif_pass_rate": rl, "sft_judge_score": 0.5, "rlaif_judge_score": 0.6,
                "kl": 2.0, "judge_auc_vs_ground_truth": auc}

    out = study.summarise({2: [run(0.4, 0.8), run(0.4, 0.6)], 3: [run(0.5, 0.4, 0.8)]})
    assert out["runs"] == 3 and out["builds"] == 2
    assert abs(out["pass_rate_gain"]["mean"] - (0.3 + -0.1) / 2) < 1e-12  # the mean of the build means
    assert out["pass_rate_gain"]["improved"] == 2 / 3 and out["judge_score_gain"]["improved"] == 1.0
    assert out["per_build"][3] == {"judge_auc": 0.8, "pass_rate_gains": [-0.1]}
    text = study.table({"rubric": out})
    assert "| rubric | 3 (2) | +0.100 [" in text and "| rubric | 2 | 0.900 | +0.400, +0.200 |" in text
    assert "gt_score_gain" not in out and out["pass_rate_gain"]["values"] == [0.4, 0.2, -0.1]
    graded = study.summarise({2: [dict(run(0.4, 0.8), sft_gt_score=0.7, rlaif_gt_score=0.9)]})
    assert abs(graded["gt_score_gain"]["mean"] - 0.2) < 1e-12


def test_demo_places_a_run_within_the_reference_study(tmp_path):
    """scripts/demo.py's line on where a run's gain falls among the study's runs of its setting and split."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "demo.py")
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    reference = tmp_path / "study.json"
    reference.write_text(json.dumps({
        "builds": [3, 4], "seeds": [1, 2], "split": "test", "settings": {"rubric": "", "kl0": "kl=0"},
        "results": {"rubric": {"pass_rate_gain": {"mean": 0.05, "interval": [-0.2, 0.3],
                                                  "values": [-0.2, 0.0, 0.1, 0.3]}}}}))
    run = {"sft_pass_rate": 0.5, "rlaif_pass_rate": 0.6}
    line = demo.place_in_study(run, "build=1,seed=2", "test", str(reference))  # draws, not settings
    assert line.startswith("this run's pass-rate gain, +0.100, is above 2 of the 4 runs") and "'rubric'" in line
    assert "no runs of these settings (small)" in demo.place_in_study(run, "small", "test", str(reference))
    assert "no runs of these settings (kl=0)" in demo.place_in_study(run, "kl=0", "test", str(reference))
    assert "this run on validation" in demo.place_in_study(run, "", "validation", str(reference))
    assert "missing" in demo.place_in_study(run, "", "test", str(tmp_path / "none.json"))
