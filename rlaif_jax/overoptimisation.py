"""Over-optimisation measurement (Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization").

A policy optimised against a proxy reward (here the LLM judge) moves away from its initial policy; the "gold"
reward (here the testbed's graded ground truth, `testbed.grader.graded_score`) first rises, then falls. Gao et al.
plot the gold gain R over the initial policy against d = sqrt(KL(pi || pi_init)) and fit

    best-of-n   R_bon(d) = d (alpha - beta d)
    RL          R_RL(d)  = d (alpha - beta log d)

Best-of-n is the baseline with no training: draw n samples from the initial policy, keep the one the proxy scores
highest. Its KL is known in closed form and its expected gold is estimated without bias from N >= n samples per
prompt, so one set of N samples gives the whole curve n = 1 .. N. A best-of-n baseline at matched KL belongs next
to every RL result: an RL run that does not beat best-of-n at its own KL has not used its KL budget well.

Shapes: P prompts, N samples per prompt; `_pn` arrays are (P, N).

    best_of_n_kl(n)                                      the analytic KL of best-of-n
    best_of_n_expectation(proxy_pn, value_pn, n)         unbiased E[value of the proxy-best of n], per prompt
    fit_best_of_n(d, gain) / fit_rl(d, gain) -> Fit      the functional forms by least squares, their argmax
    best_of_n_at_kl(kl, fit, d, gain) -> Baseline        best-of-n's gain at an RL run's KL
    sample_policy(c, samples_per_prompt) -> Samples      N samples per held-out prompt, judged and graded by the
                                                         run's own evaluation code (evaluate.Evaluator)
    best_of_n_table(samples, ns)                         KL, d, judge, gold and pass rate of best-of-n for each n
    read_run(workdir) -> RunCurve                        an RL run's evaluations (metrics.jsonl) as (d, gain) points
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import NamedTuple, Sequence

import jax
import numpy as np

from rlaif_jax import builder, evaluate
from rlaif_jax import data as data_lib
from rlaif_jax import metrics as metrics_lib
from rlaif_jax import sharding as shd
from rlaif_jax import workdir as workdir_lib
from rlaif_jax.models import hf


# ---------------------------------------------------------------------------------------------- best-of-n
def best_of_n_kl(n: int | Sequence[int] | np.ndarray) -> np.ndarray | float:
    """KL(pi_bon || pi) = log n - (n - 1) / n, in nats (Stiennon et al. 2020, as Gao et al. 2022 use it). Exact
    when no two samples can be equal (a continuous distribution of responses); for a policy that can repeat a
    response it is an upper bound (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
    policy"). n = 1 -> 0, n = 2 -> log 2 - 1/2."""
    n_arr = np.asarray(n, np.float64)
    if np.any(n_arr < 1):
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    kl = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(kl) if kl.ndim == 0 else kl


def order_statistic_weights(N: int, n: int) -> np.ndarray:
    """w_i = C(i - 1, n - 1) / C(N, n), i = 1 .. N: the probability that the i-th smallest of N distinct values is
    the largest of a uniformly random n-subset (the other n - 1 members come from the i - 1 below it). Exact
    integer binomials, then one float division each: no overflow for any N. The weights sum to 1."""
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n needs 1 <= n <= N (samples per prompt); got n={n}, N={N}")
    total = math.comb(N, n)
    return np.asarray([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)], np.float64)


def best_of_n_expectation(proxy_pn: np.ndarray, value_pn: np.ndarray, n: int) -> np.ndarray:
    """The unbiased estimate, per prompt, of E[value of the best of n samples], best by the proxy, from N >= n
    samples of each prompt (Nakano et al. 2021, WebGPT; Gao et al. 2022, appendix on best-of-n): the
    mean over all C(N, n) subsets of the N samples, in closed form. With the samples sorted by proxy ascending,

        E[value_bon] = sum_i  C(i - 1, n - 1) / C(N, n)  value_(i)          (order_statistic_weights)

    Ties in the proxy: a subset whose best proxy value is shared by several of its members picks one of them
    uniformly at random. In expectation that is the same formula with each sample's value replaced by the mean
    value of all the samples that tie with it in proxy (given which tie group holds a subset's maximum, each of
    the group's members is equally likely to be among the tied picks). So the estimate is deterministic and
    does not depend on the samples' order. Returns (P,) float64; n = 1 gives the mean over the N samples."""
    proxy_pn, value_pn = np.asarray(proxy_pn, np.float64), np.asarray(value_pn, np.float64)
    if proxy_pn.shape != value_pn.shape or proxy_pn.ndim != 2:
        raise ValueError(f"proxy and value must both be (prompts, samples); got {proxy_pn.shape}, {value_pn.shape}")
    P, N = proxy_pn.shape
    weights_n = order_statistic_weights(N, n)
    order_pn = np.argsort(proxy_pn, axis=1, kind="stable")
    proxy_sorted = np.take_along_axis(proxy_pn, order_pn, axis=1)
    value_sorted = np.take_along_axis(value_pn, order_pn, axis=1)
    # Tie groups: runs of equal proxy values in each sorted row, numbered across rows so one bincount serves all.
    starts_pn = np.concatenate([np.ones((P, 1), bool), proxy_sorted[:, 1:] != proxy_sorted[:, :-1]], axis=1)
    group_pn = np.cumsum(starts_pn, axis=1) - 1 + (np.arange(P) * N)[:, None]
    sums = np.bincount(group_pn.ravel(), weights=value_sorted.ravel(), minlength=P * N)
    counts = np.bincount(group_pn.ravel(), minlength=P * N)
    tied_mean_pn = (sums / np.maximum(counts, 1))[group_pn]
    return tied_mean_pn @ weights_n


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ..., up to n_max (n_max itself included when it is not a power of two)."""
    ns = [1 << k for k in range(int(math.log2(n_max)) + 1)] if n_max >= 1 else []
    return ns + ([n_max] if ns and ns[-1] != n_max else [])


# ---------------------------------------------------------------------------------------------- the fits
class Fit(NamedTuple):
    """A functional form fitted to (d, R) points. `d_star` is the argmax of the fitted curve and `r_star` its
    value there (nan when the curve has no interior maximum: beta <= 0, or a bon argmax at d < 0)."""
    form: str  # "best_of_n" or "rl"
    alpha: float
    beta: float
    r2: float
    points: int
    d_star: float
    r_star: float

    def __call__(self, d) -> np.ndarray:
        """The fitted gain at d = sqrt(KL)."""
        return FORMS[self.form](np.asarray(d, np.float64), self.alpha, self.beta)


def bon_form(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Gao et al. 2022's best-of-n form: R_bon(d) = d (alpha_bon - beta_bon d)."""
    return d * (alpha - beta * d)


def rl_form(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Gao et al. 2022's RL form: R_RL(d) = d (alpha_RL - beta_RL log d); R_RL(0) = 0 (the limit of d log d)."""
    d = np.asarray(d, np.float64)
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return alpha * d - beta * d_log_d


FORMS = {"best_of_n": bon_form, "rl": rl_form}


def _least_squares(form: str, d, gain) -> Fit:
    """(alpha, beta) minimising sum (R_i - f(d_i))^2 for f linear in them, f = alpha * x1(d) - beta * x2(d), without
    an intercept (both forms pass through R(0) = 0), by np.linalg.lstsq. Points at d = 0 are left out: both forms
    are 0 there whatever alpha and beta, so they carry no information (and best-of-1 is 0 by construction).

    R^2 = 1 - SS_res / SS_tot with SS_tot = sum (R_i - mean R)^2 over the fitted points: the share of the gain's
    variance about its mean that the curve explains. Without an intercept it is not bounded below by 0 (a
    negative value: the curve fits worse than the constant mean gain). It is not the "uncentred" R^2 that
    regression software reports for a fit through the origin (SS_tot = sum R_i^2), which looks good whenever the
    gains are far from 0, whatever their shape."""
    d, gain = np.asarray(d, np.float64).ravel(), np.asarray(gain, np.float64).ravel()
    if d.shape != gain.shape:
        raise ValueError(f"d and gain differ in length: {d.shape}, {gain.shape}")
    keep = d > 0
    d, gain = d[keep], gain[keep]
    if len(d) < 2:
        raise ValueError(f"a {form} fit needs at least 2 points with d > 0, got {len(d)}")
    second = d * d if form == "best_of_n" else d * np.log(d)
    x = np.stack([d, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(x, gain, rcond=None)
    residual = gain - x @ np.asarray([alpha, beta])
    ss_tot = float(np.sum((gain - gain.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    d_star = (best_of_n_argmax if form == "best_of_n" else rl_argmax)(alpha, beta)
    r_star = float(FORMS[form](np.asarray(d_star), alpha, beta)) if np.isfinite(d_star) else float("nan")
    return Fit(form, float(alpha), float(beta), r2, len(d), d_star, r_star)


def fit_best_of_n(d, gain) -> Fit:
    """R_bon(d) = d (alpha - beta d) fitted to the points (d_i, R_i) (see _least_squares)."""
    return _least_squares("best_of_n", d, gain)


def fit_rl(d, gain) -> Fit:
    """R_RL(d) = d (alpha - beta log d) fitted to the points (d_i, R_i) (see _least_squares)."""
    return _least_squares("rl", d, gain)


def best_of_n_argmax(alpha: float, beta: float) -> float:
    """argmax_d d (alpha - beta d) = alpha / (2 beta) (R' = alpha - 2 beta d = 0, R'' = -2 beta); nan unless
    beta > 0 and alpha > 0 (otherwise the curve has no maximum at d > 0)."""
    return float(alpha / (2 * beta)) if beta > 0 and alpha > 0 else float("nan")


def rl_argmax(alpha: float, beta: float) -> float:
    """argmax_d d (alpha - beta log d) = exp(alpha / beta - 1) (R' = alpha - beta log d - beta = 0,
    R'' = -beta / d); nan unless beta > 0. The maximum value is beta d*."""
    if not beta > 0:
        return float("nan")
    exponent = alpha / beta - 1.0
    return float(math.exp(exponent)) if exponent < 700 else float("inf")


# ---------------------------------------------------------------------------------------------- matched KL
class Baseline(NamedTuple):
    """Best-of-n's gain at an RL run's KL: `fitted` from its fitted curve (`extrapolated` when beyond the
    largest measured KL), `measured` interpolated linearly in d between the measured n (nan beyond them)."""
    d: float
    fitted: float
    measured: float
    extrapolated: bool


def best_of_n_at_kl(kl: float, fit: Fit, measured_d: Sequence[float], measured_gain: Sequence[float]) -> Baseline:
    """The best-of-n baseline at a matched KL (an RL run's KL, in the same nats): d = sqrt(max(kl, 0)) (a sampled
    k1 KL can come out slightly negative)."""
    d = math.sqrt(max(float(kl), 0.0))
    measured_d, measured_gain = np.asarray(measured_d, np.float64), np.asarray(measured_gain, np.float64)
    order = np.argsort(measured_d)
    inside = measured_d.min() <= d <= measured_d.max()
    measured = float(np.interp(d, measured_d[order], measured_gain[order])) if inside else float("nan")
    return Baseline(d, float(fit(d)), measured, bool(d > measured_d.max()))


# ---------------------------------------------------------------------------------------------- sampling
class Samples(NamedTuple):
    """N samples of each of P prompts, row p holding prompt p's samples in sampling order."""
    prompts: list[str]  # (P,)
    responses: list[list[str]]  # (P, N)
    judge_pn: np.ndarray  # the run's reward judge's score (its `eval/judge_score`)
    gold_pn: np.ndarray  # the graded ground truth (`gt/score`, in [0, 1] on the testbed)
    pass_pn: np.ndarray  # the ground truth's pass / fail (`gt/pass_rate`)


def sample_policy(c, samples_per_prompt: int, *, seed: int = 0, prompts_per_call: int | None = None,
                  mesh=None) -> Samples:
    """Draws N = samples_per_prompt samples of every held-out prompt (`c.data.eval_path`) from the run's initial
    policy (`c.policy.path`) at `c.rollout.temperature`, scores them with the run's reward judge and grades them
    with its ground truth (`c.eval.ground_truth`, which must return "score" and "pass_rate"): through the
    evaluation's own code (`evaluate.Evaluator.score_samples`), so the sampler, the judge's path (token space or
    host) and the grader are those the run trains and evaluates with. The win rate and any independent evaluator
    are switched off. `prompts_per_call` prompts are sampled per compiled call (default: as many as keep a call
    at about 4096 rows, at most c.train.batch_size); `mesh` defaults to the config's."""
    c = copy.deepcopy(c)
    if not c.eval.ground_truth:
        raise ValueError("sample_policy grades with config.eval.ground_truth; this config has none")
    if not c.data.eval_path and not c.data.eval_fraction:
        raise ValueError("sample_policy samples the held-out prompts: set config.data.eval_path")
    c.eval.samples_per_prompt = int(samples_per_prompt)
    c.eval.win_rate = False
    c.eval.evaluator.path = ""
    c.eval.every = max(int(c.eval.every), 1)
    c.eval.max_prompts = 1 << 30  # every held-out prompt
    c.train.batch_size = int(prompts_per_call or max(1, min(c.train.batch_size, 4096 // samples_per_prompt)))
    if mesh is None:
        mesh, rules = shd.mesh_from_config(c.mesh)
    else:
        rules = [tuple(r) for r in c.mesh.rules]
    _, eval_loader = data_lib.load_prompts(c.data, hf.load_tokenizer(c.policy.path), c.train.batch_size)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        parts = builder.build(c, mesh, rules)
        evaluator = evaluate.Evaluator(c, parts, eval_loader, mesh)
        scored = evaluator.score_samples(parts.frozen.reference, parts.frozen, jax.random.key(seed))
    v, n = scored.values, int(samples_per_prompt)
    missing = {"gt/score", "gt/pass_rate"} - set(v)
    if missing:
        raise ValueError(f"config.eval.ground_truth={c.eval.ground_truth!r} returned no "
                         f"{sorted(k[3:] for k in missing)}")
    as_pn = lambda x: np.asarray(x, np.float64).reshape(-1, n)  # prompt-major rows
    return Samples(scored.prompts[::n], [scored.responses[i:i + n] for i in range(0, len(scored.responses), n)],
                   as_pn(v["score"]), as_pn(v["gt/score"]), as_pn(v["gt/pass_rate"]))


class BestOfNRow(NamedTuple):
    """Best-of-n over the prompts: the mean over prompts of the per-prompt unbiased estimates."""
    n: int
    kl: float
    d: float
    judge: float  # the proxy's own best-of-n score
    gold: float  # the graded ground truth of the proxy-best sample
    pass_rate: float  # the ground truth's pass rate of the proxy-best sample


def best_of_n_table(samples: Samples, ns: Sequence[int]) -> list[BestOfNRow]:
    """One row per n (each n <= the samples per prompt): the judge picks, the ground truth grades."""
    rows = []
    for n in ns:
        kl = best_of_n_kl(n)
        rows.append(BestOfNRow(int(n), kl, math.sqrt(kl), *(
            float(best_of_n_expectation(samples.judge_pn, value_pn, n).mean())
            for value_pn in (samples.judge_pn, samples.gold_pn, samples.pass_pn))))
    return rows


class RunCurve(NamedTuple):
    """An RL run's held-out evaluations (metrics.jsonl), step 0 (the initial policy) first."""
    workdir: str
    eval_path: str  # the run's config.data.eval_path ("" when its config.json is missing)
    steps: np.ndarray
    kl: np.ndarray  # eval/kl: the summed per-response k1 KL to the reference, nats
    judge: np.ndarray  # eval/judge_score
    gold: np.ndarray  # eval/gt/score
    pass_rate: np.ndarray  # eval/gt/pass_rate

    @property
    def d(self) -> np.ndarray:
        """sqrt(KL), a sampled k1 KL below 0 read as 0."""
        return np.sqrt(np.maximum(self.kl, 0.0))

    def gain(self, field: str) -> np.ndarray:
        """The gain over the run's own step-0 evaluation (its initial policy), for "judge", "gold" or "pass_rate"."""
        values = getattr(self, field)
        return values - values[0]


def read_run(workdir: str) -> RunCurve:
    """The evaluations of a training run's workdir that carry the graded ground truth (eval/gt/score); raises
    ValueError when there are none, or when the first is not step 0 (the gain is measured from the initial policy)."""
    records = [r for r in metrics_lib.read_metrics(os.path.join(workdir, metrics_lib.METRICS_FILE))
               if "eval/gt/score" in r and "eval/kl" in r]
    if not records or records[0]["step"] != 0:
        raise ValueError(f"{workdir}: no evaluations with eval/gt/score from step 0 on (steps "
                         f"{[r['step'] for r in records]}); runs from before the graded ground truth do not have it")
    eval_path = ""
    config_file = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if os.path.exists(config_file):
        with open(config_file) as f:
            eval_path = json.load(f).get("data", {}).get("eval_path", "")
    col = lambda name: np.asarray([r[name] for r in records], np.float64)
    return RunCurve(workdir, eval_path, col("step").astype(int), col("eval/kl"), col("eval/judge_score"),
                    col("eval/gt/score"), col("eval/gt/pass_rate"))
