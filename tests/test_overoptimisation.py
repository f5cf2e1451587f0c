"""Over-optimisation measurement (rlaif_jax/overoptimisation.py): best-of-n's KL and its unbiased estimator against
hand values and brute-force enumeration, the fits of Gao et al. 2022's forms against known curves and a grid
search, and N samples per prompt drawn, judged and graded by the evaluation's code on the tiny world."""
import itertools
import os

import jax
import numpy as np
import pytest

from rlaif_jax import overoptimisation as oo
from rlaif_jax import sharding as shd
from tests import tiny, tiny_config


def test_best_of_n_kl_hand_values():
    assert oo.best_of_n_kl(1) == 0.0
    assert oo.best_of_n_kl(2) == pytest.approx(np.log(2) - 0.5, abs=1e-15)
    np.testing.assert_allclose(oo.best_of_n_kl([4, 64]), [np.log(4) - 3 / 4, np.log(64) - 63 / 64], rtol=1e-15)


def brute_force_best_of_n(proxy, value, n):
    """The mean over every n-subset of the value of its proxy-best member; a subset whose best proxy is shared by
    several members takes their mean value (a uniformly random pick among them, in expectation)."""
    out = []
    for proxy_row, value_row in zip(proxy, value):
        per_subset = []
        for subset in itertools.combinations(range(len(proxy_row)), n):
            best = max(proxy_row[i] for i in subset)
            per_subset.append(np.mean([value_row[i] for i in subset if proxy_row[i] == best]))
        out.append(np.mean(per_subset))
    return np.asarray(out)


def test_unbiased_estimator_equals_enumeration_of_all_subsets_with_ties():
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, 4, size=(5, 8)).astype(float)  # 4 values over 8 samples: many ties
    proxy[0] = np.arange(8)[::-1]  # a row without ties, in descending order
    proxy[1] = 2.0  # a row that is one tie group
    value = rng.random((5, 8))
    for n in range(1, 9):
        np.testing.assert_allclose(oo.best_of_n_expectation(proxy, value, n), brute_force_best_of_n(proxy, value, n),
                                   rtol=1e-12, err_msg=f"n={n}")
    np.testing.assert_allclose(oo.best_of_n_expectation(proxy, value, 1), value.mean(1), rtol=1e-12)
    np.testing.assert_allclose(oo.best_of_n_expectation(proxy, value, 8)[1], value[1].mean(), rtol=1e-12)
    # The estimate does not depend on the samples' order.
    perm = rng.permutation(8)
    np.testing.assert_allclose(oo.best_of_n_expectation(proxy[:, perm], value[:, perm], 3),
                               oo.best_of_n_expectation(proxy, value, 3), rtol=1e-12)
    with pytest.raises(ValueError):
        oo.best_of_n_expectation(proxy, value, 9)


def test_order_statistic_weights_do_not_overflow():
    w = oo.order_statistic_weights(1024, 512)
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0, abs=1e-12) and w[:511].sum() == 0.0


@pytest.mark.parametrize("form,alpha,beta", [("best_of_n", 0.8, 0.25), ("rl", 0.5, 0.3)])
def test_fits_recover_known_coefficients_and_their_argmax(form, alpha, beta):
    fit_fn = {"best_of_n": oo.fit_best_of_n, "rl": oo.fit_rl}[form]
    d = np.concatenate([[0.0], np.linspace(0.1, 3.0, 12)])
    if form == "best_of_n":
        gain = d * (alpha - beta * d)
    else:
        gain = d * (alpha - beta * np.log(np.where(d > 0, d, 1.0)))
    exact = fit_fn(d, gain)
    assert (exact.alpha, exact.beta) == (pytest.approx(alpha, rel=1e-10), pytest.approx(beta, rel=1e-10))
    assert exact.r2 == pytest.approx(1.0, abs=1e-12) and exact.points == 12  # d = 0 left out
    noisy = fit_fn(d, gain + np.random.default_rng(1).normal(0.0, 0.01, d.shape))
    assert abs(noisy.alpha - alpha) < 0.05 and abs(noisy.beta - beta) < 0.05 and 0.95 < noisy.r2 < 1.0
    # The argmax formulas against a grid search of the fitted curve.
    grid = np.linspace(1e-4, 20.0, 400_001)
    assert exact.d_star == pytest.approx(grid[np.argmax(exact(grid))], abs=1e-3)
    assert exact.r_star == pytest.approx(exact(grid).max(), rel=1e-6)


def test_no_maximum_without_a_positive_beta():
    assert np.isnan(oo.best_of_n_argmax(1.0, -0.1)) and np.isnan(oo.rl_argmax(1.0, 0.0))
    d = np.asarray([0.5, 1.0, 1.5])
    fit = oo.fit_best_of_n(d, d + 0.1 * d ** 2)  # a gain that keeps accelerating: beta = -0.1
    assert fit.beta == pytest.approx(-0.1) and np.isnan(fit.d_star) and np.isnan(fit.r_star)


def test_best_of_n_at_a_matched_kl():
    d, gain = np.asarray([0.0, 0.44, 0.77, 1.2]), np.asarray([0.0, 0.1, 0.15, 0.17])
    fit = oo.fit_best_of_n(d, gain)
    inside = oo.best_of_n_at_kl(0.6 ** 2, fit, d, gain)
    assert inside.fitted == pytest.approx(0.6 * (fit.alpha - fit.beta * 0.6))
    assert inside.measured == pytest.approx(0.1 + (0.6 - 0.44) / (0.77 - 0.44) * 0.05)
    assert not inside.extrapolated
    beyond = oo.best_of_n_at_kl(4.0, fit, d, gain)
    assert beyond.d == 2.0 and beyond.extrapolated and np.isnan(beyond.measured)
    assert oo.best_of_n_at_kl(-0.01, fit, d, gain).measured == 0.0  # a slightly negative sampled KL reads as 0


def tiny_ground_truth(prompt_texts, response_texts, stopped):
    """The tiny world's graded ground truth for the test below: the share of the response's words that are
    TARGET (what the counting judge rewards), passing at one half."""
    score = [sum(w == tiny.TARGET for w in r.split()) / max(len(r.split()), 1) for r in response_texts]
    return {"score": score, "pass_rate": [float(s >= 0.5) for s in score]}


def test_sample_policy_draws_judges_and_grades_n_samples_per_prompt(tmp_path):
    world = tiny.make_world(str(tmp_path / "world"))
    c = tiny_config.get_config(os.path.dirname(world["policy"]))
    c.judge.mode = "pointwise"
    c.rollout.cache_phases = 1  # one decode loop to compile
    c.eval.ground_truth = "tests.test_overoptimisation:tiny_ground_truth"
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    n = 8
    samples = oo.sample_policy(c, n, seed=3, mesh=mesh)
    P = len(samples.prompts)
    assert P == 16  # the held-out quarter of the 64 prompts
    assert samples.judge_pn.shape == samples.gold_pn.shape == samples.pass_pn.shape == (P, n)
    assert [len(r) for r in samples.responses] == [n] * P
    assert samples.judge_pn.std() > 0 and samples.gold_pn.std() > 0
    # Best-of-1 is the mean of the samples; best-of-N is the judge's argmax sample (the mean over tied maxima).
    np.testing.assert_allclose(oo.best_of_n_expectation(samples.judge_pn, samples.judge_pn, 1),
                               samples.judge_pn.mean(1), rtol=1e-12)
    top = samples.judge_pn == samples.judge_pn.max(1, keepdims=True)
    np.testing.assert_allclose(oo.best_of_n_expectation(samples.judge_pn, samples.gold_pn, n),
                               (samples.gold_pn * top).sum(1) / top.sum(1), rtol=1e-12)
    # The arrays line up with the texts: the grades recomputed from the texts (the judge's scores come from the same
    # rows of the same evaluation pass).
    texts = [r for row in samples.responses for r in row]
    prompts = [p for p in samples.prompts for _ in range(n)]
    np.testing.assert_allclose(samples.gold_pn.ravel(), tiny_ground_truth(prompts, texts, None)["score"])
    table = oo.best_of_n_table(samples, [1, 2, n])
    assert [r.n for r in table] == [1, 2, n] and table[0].kl == 0.0
    assert table[0].gold == pytest.approx(samples.gold_pn.mean()) and table[-1].judge == samples.judge_pn.max(1).mean()


def test_summary_pools_builds_by_setting_and_prefers_the_measured_best_of_n(tmp_path):
    """scripts/overoptimisation_summary.py: a run's setting is its workdir's parent folder, best-of-n's gain at
    its KL the measured (interpolated) one where there is one, else the fitted one; means are over builds of the
    means over seeds."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location(
        "overoptimisation_summary", os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts",
                                                 "overoptimisation_summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def run(setting, build, seed, gold, bon_measured, bon_fitted=0.5):
        return {"workdir": f"runs/study/{setting}/b{build}_s{seed}", "kl": 1.0 + seed, "gold_gain": gold,
                "judge_gain": 0.1, "bon_gold_gain_measured": bon_measured, "bon_gold_gain_fitted": bon_fitted,
                "bon_judge_gain_measured": 0.2, "bon_judge_gain_fitted": 0.2, "extrapolated": bon_measured is None}

    fit = {"alpha": 0.1, "beta": 0.05, "r2": 0.9, "d_star": 1.0}
    files = []
    for build, runs in ((3, [run("a", 3, 1, 0.3, 0.1), run("a", 3, 2, 0.5, 0.1)]),
                        (4, [run("a", 4, 1, 0.1, None), run("b", 4, 1, 0.0, 0.2)])):
        path = str(tmp_path / f"b{build}.json")
        with open(path, "w") as f:
            json.dump({"build": build, "split": "test", "judge": "rubric", "rl_runs": runs, "fits": {"bon_gold": fit}},
                      f)
        files.append(path)
    summary.main(files + ["--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "overoptimisation_summary.json") as f:
        s = json.load(f)["settings"]
    assert s["a"]["runs"] == 3 and s["a"]["builds"] == [3, 4] and s["b"]["builds"] == [4]
    # a: build 3 mean 0.4, build 4 0.1 -> 0.25; best-of-n: build 3 measured 0.1, build 4 fitted 0.5 -> 0.3
    assert s["a"]["rl_gold_gain"].startswith("+0.250 [") and s["a"]["bon_gold_gain"].startswith("+0.300 [")
    assert s["a"]["rl_minus_bon_gold"].startswith("-0.050 [") and s["a"]["extrapolated"] == 1
    assert s["a"]["rl_ahead"] == pytest.approx(2 / 3) and s["a"]["kl"] == pytest.approx((2.5 + 2.0) / 2)
    assert s["b"]["rl_minus_bon_gold"].startswith("-0.200 [") and s["b"]["rl_ahead"] == 0.0
