"""Plots and a summary table over runs' metrics.jsonl (scripts/report.py, the sweep and the demo use it).

For every known curve that at least one run logged (train `judge/score`, `kl/k1`, `response/length`; eval
`eval/judge_score`, `eval/gt/pass_rate`, `eval/kl`, `eval/win_rate`, `eval/response_length`), `make_report`
writes <key>.png with the runs overlaid, and summary.md: a markdown table with each run's final value of every
key and, for keys with a direction, its best value and the step it was reached at.

`seed_table` summarises repeats of one setting (runs that differ only in their RL seed): for each quantity, the
mean, the standard deviation, a 95% percentile-bootstrap interval of the mean over the runs, and the runs' values.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from rlaif_jax import metrics
from rlaif_jax.stats import bootstrap_interval

# (key, title, direction): +1 higher is better, -1 lower is better, 0 no "best"
CURVES: tuple[tuple[str, str, int], ...] = (
    ("judge/score", "judge score (train)", +1),
    ("kl/k1", "KL to reference (train)", 0),
    ("response/length", "response length (train)", 0),
    ("eval/judge_score", "judge score (eval)", +1),
    ("eval/gt/pass_rate", "ground-truth pass rate (eval)", +1),
    ("eval/kl", "KL to reference (eval)", 0),
    ("eval/win_rate", "win rate vs reference (eval)", +1),
    ("eval/judge_gt_auc/pass_rate", "judge's ROC AUC vs the ground truth, on the policy's samples (eval)", +1),
    ("eval/response_length", "response length (eval)", 0),
)


def read_run(workdir: str) -> list[dict[str, Any]]:
    """The complete records of workdir/metrics.jsonl (a torn last line is skipped)."""
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; is {workdir!r} a run's workdir?")
    return metrics.read_metrics(path)


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order; the last record wins when a step repeats."""
    by_step: dict[int, float] = {}
    for r in records:
        if key in r and r[key] is not None and "step" in r:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Debiased exponential moving average: m_t = a m_{t-1} + (1-a) x_t, reported as m_t / (1 - a^t)."""
    out, m = [], 0.0
    for t, x in enumerate(values, 1):
        m = alpha * m + (1 - alpha) * x
        out.append(m / (1 - alpha ** t))
    return out


def best(steps: Sequence[int], values: Sequence[float], direction: int) -> tuple[float, int] | None:
    """(best value, its first step) ignoring NaNs; None without a direction or without finite values."""
    pairs = [(v, s) for s, v in zip(steps, values) if not math.isnan(v)]
    if direction == 0 or not pairs:
        return None
    value = max(v for v, _ in pairs) if direction > 0 else min(v for v, _ in pairs)
    return value, min(s for v, s in pairs if v == value)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def summary_table(runs: dict[str, list[dict[str, Any]]], keys: Sequence[str]) -> str:
    """Markdown: one row per run; per key a 'final' column and, for keys with a direction, a 'best' one."""
    directions = {k: d for k, _, d in CURVES}
    header, align = ["run", "last step"], ["---", "---:"]
    for k in keys:
        header.append(f"{k} final")
        align.append("---:")
        if directions.get(k, 0):
            header.append(f"{k} best (step)")
            align.append("---:")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for label, records in runs.items():
        last = max((int(r["step"]) for r in records if "step" in r), default=None)
        row = [label, "-" if last is None else str(last)]
        for k in keys:
            steps, values = series(records, k)
            row.append(_fmt(values[-1]) if values else "-")
            if directions.get(k, 0):
                b = best(steps, values, directions[k])
                row.append(f"{_fmt(b[0])} ({b[1]})" if b else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict[str, Any]]], key: str, title: str, path: str, smooth: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in runs.items():
        steps, values = series(records, key)
        if not steps:
            continue
        shown = ema(values, smooth) if smooth > 0 and not key.startswith("eval/") else values
        ax.plot(steps, shown, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def labels_for(workdirs: Sequence[str]) -> list[str]:
    """Base names, or the full paths when two base names collide."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def make_report(workdirs: Sequence[str], out_dir: str, labels: Sequence[str] | None = None,
                smooth: float = 0.0) -> tuple[list[str], str]:
    """Writes the PNGs and summary.md into `out_dir`; returns (png paths, markdown table)."""
    labels = list(labels) if labels else labels_for(workdirs)
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} runs")
    runs = {label: read_run(w) for label, w in zip(labels, workdirs)}
    os.makedirs(out_dir, exist_ok=True)
    present = [(k, t) for k, t, _ in CURVES if any(series(r, k)[0] for r in runs.values())]
    pngs = []
    for key, title in present:
        path = os.path.join(out_dir, key.replace("/", "_") + ".png")
        plot(runs, key, title, path, smooth)
        pngs.append(path)
    table = summary_table(runs, [k for k, _ in present])
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("# Runs\n\n" + table)
    return pngs, table


def seed_table(settings: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str]) -> str:
    """A markdown table: one row per setting (its runs' summaries, e.g. the demo's summary.json), one column per
    key: "mean +- std [95% bootstrap interval]" and, below, the runs' values in order."""
    lines = ["| setting | runs | " + " | ".join(keys) + " |", "| --- | ---: |" + " ---: |" * len(keys)]
    for name, runs in settings.items():
        cells = []
        for key in keys:
            values = [float(r[key]) for r in runs if key in r]
            if not values:
                cells.append("-")
                continue
            lo, hi = bootstrap_interval(values)
            cells.append(f"{np.mean(values):.3f} +- {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f} "
                         f"[{lo:.3f}, {hi:.3f}] ({', '.join(f'{v:.3f}' for v in values)})")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
