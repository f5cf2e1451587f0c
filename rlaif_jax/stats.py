"""Statistics of results, shared by the evaluation, the judge's agreement report (scripts/judge_eval.py) and the
tables over seeds (rlaif_jax/report.py): correlations, ROC AUC, the bootstrap interval of a mean. NumPy, float64.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """cov(x, y) / (std x std y); nan when either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def roc_auc(score: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2 (Mann-Whitney U / n+ n-)."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return float("nan")
    ranks = average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 10000, seed: int = 0
                       ) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean: resample the values with replacement `resamples` times and
    take the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means. With few values (3-6 seeds) it
    is narrower than a t interval: read it as a description of the spread of the runs, not a guarantee."""
    x = np.asarray(values, np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def grand_mean(groups: Sequence[Sequence[float]]) -> float:
    """The mean over the groups of each group's mean (e.g. of the RL seeds within each testbed build): each build
    weighs the same whatever its number of seeds. The statistic `hierarchical_bootstrap` resamples."""
    return float(np.mean([np.mean(np.asarray(g, np.float64)) for g in groups]))


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 10000,
                           seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the grand mean of two-level data (e.g. RL seeds within testbed builds):
    each resample draws the groups with replacement, then within each drawn group its values with replacement,
    and takes the mean over the groups of the group means. Both sources of variation (which build, which seed)
    enter the interval, where resampling the pooled runs would treat seeds of one build as independent draws."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, np.float64) for g in groups]
    means = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(0, len(groups), len(groups))
        means[r] = np.mean([groups[g][rng.integers(0, len(groups[g]), len(groups[g]))].mean() for g in picked])
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))
