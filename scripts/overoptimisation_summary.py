"""RL against best-of-n at matched KL, over builds: pools several scripts/overoptimisation.py outputs (one per
testbed build, each with --rl_runs of that build's study runs) and reports, per RL setting, the runs' final gains
next to best-of-n's at each run's own KL, with hierarchical bootstrap intervals (builds, then seeds), and the
fitted over-optimisation coefficients per build.

    for b in 3 4 5 6 7; do python scripts/overoptimisation.py --build $b --split test --samples 256 --n_max 256 \\
        --out runs/overopt/b$b --rl_runs "runs/study/*/b${b}_s*"; done
    python scripts/overoptimisation_summary.py runs/overopt/b*/overoptimisation.json --out runs/overopt

A run's setting is the name of the folder above its workdir (scripts/study.py's OUT/SETTING/bB_sS layout), its
build the --build of the file that holds it. Best-of-n's gain at a run's KL is read from the measured n
(interpolated between them) where the KL is within them, else from the fitted d (alpha - beta d) curve (counted
in the "extrapolated" column). Writes OUT/overoptimisation_summary.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

from rlaif_jax.stats import grand_mean, hierarchical_bootstrap


def bon_gain(run: dict, field: str) -> float:
    measured = run[f"bon_{field}_gain_measured"]
    return measured if measured is not None and math.isfinite(measured) else run[f"bon_{field}_gain_fitted"]


def cell(groups: list[list[float]]) -> str:
    lo, hi = hierarchical_bootstrap(groups)
    return f"{grand_mean(groups):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="overoptimisation.json files, one per build")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    results = []
    for path in args.files:
        with open(path) as f:
            results.append(json.load(f))
    if len({(r["split"], r["judge"], r.get("config_arg", "")) for r in results}) != 1:
        raise SystemExit("the files mix splits or judges: " + ", ".join(
            f"{r['split']}/{r['judge']}/{r.get('config_arg', '')}" for r in results))

    # setting -> build -> the runs' finals
    runs: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for run in r["rl_runs"]:
            runs[os.path.basename(os.path.dirname(os.path.normpath(run["workdir"])))][r["build"]].append(run)
    if not runs:
        raise SystemExit("no RL runs in these files: run scripts/overoptimisation.py with --rl_runs")

    judge = results[0]["judge"] + (f" ({results[0]['config_arg']})" if results[0].get("config_arg") else "")
    lines = [f"RL against best-of-n at the run's own KL: {len(results)} builds "
             f"({', '.join(str(r['build']) for r in results)}), {results[0]['split']} split, {judge} judge; "
             "means over builds of the means over seeds, 95% hierarchical intervals", "",
             "| setting | runs | KL | RL gold gain | best-of-n gold gain | RL - best-of-n | RL ahead | "
             "RL judge gain | best-of-n judge gain | extrapolated |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary = {}
    for setting, by_build in sorted(runs.items()):
        groups = lambda fn: [[fn(x) for x in rs] for rs in by_build.values()]  # noqa: E731
        flat = [x for rs in by_build.values() for x in rs]
        diff = groups(lambda x: x["gold_gain"] - bon_gain(x, "gold"))
        summary[setting] = {
            "runs": len(flat), "builds": sorted(by_build),
            "kl": grand_mean(groups(lambda x: x["kl"])),
            "rl_gold_gain": cell(groups(lambda x: x["gold_gain"])),
            "bon_gold_gain": cell(groups(lambda x: bon_gain(x, "gold"))),
            "rl_minus_bon_gold": cell(diff),
            "rl_ahead": float(np.mean([d > 0 for g in diff for d in g])),
            "rl_judge_gain": cell(groups(lambda x: x["judge_gain"])),
            "bon_judge_gain": cell(groups(lambda x: bon_gain(x, "judge"))),
            "extrapolated": sum(bool(x["extrapolated"]) for x in flat)}
        s = summary[setting]
        lines.append(f"| {setting} | {s['runs']} | {s['kl']:.2f} | {s['rl_gold_gain']} | {s['bon_gold_gain']} | "
                     f"{s['rl_minus_bon_gold']} | {s['rl_ahead']:.2f} | {s['rl_judge_gain']} | {s['bon_judge_gain']} | "
                     f"{s['extrapolated']} |")

    lines += ["", "Fitted coefficients per build (gains over the initial policy; best-of-n: d (alpha - beta d), "
              "RL: d (alpha - beta log d) over every evaluation of the build's runs; d* the argmax):", "",
              "| build | fit | alpha | beta | R^2 | d* | KL* |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(results, key=lambda r: r["build"]):
        for name, fit in r["fits"].items():
            d_star = fit["d_star"]
            kl_star = d_star ** 2 if d_star is not None and math.isfinite(d_star) else math.nan
            lines.append(f"| {r['build']} | {name} | {fit['alpha']:+.4f} | {fit['beta']:+.4f} | {fit['r2']:.3f} | "
                         f"{d_star:.2f} | {kl_star:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overoptimisation_summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "overoptimisation_summary.json"), "w") as f:
        json.dump({"files": args.files, "settings": summary,
                   "fits": {r["build"]: r["fits"] for r in results}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
