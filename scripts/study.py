"""A study on the testbed: settings x testbed builds x RL seeds, each run once (scripts/demo.py), then per setting
the mean gain with a hierarchical bootstrap interval over builds and seeds.

    python scripts/study.py --out runs/study --builds 3,4,5,6,7 --seeds 1,2,3 --split test \\
        --setting rubric= --setting pairwise=judge=pairwise [--setting NAME=TESTBED_ARGS ...]

Each run is `scripts/demo.py --seed S --config_arg build=B,eval=SPLIT,ARGS --workdir OUT/NAME/bB_sS` in its own
process (a build that is not cached yet is built first, about 2.5 minutes); a run whose summary.json exists is
skipped, so a stopped study continues where it stopped. `--split validation` is for choosing settings (on builds
set aside for tuning), `--split test` for reporting them (on other builds): the held-out instructions of each
split are unseen compositions (rlaif_jax.testbed.world.SPLITS). Per setting it reports, over the (build, seed) runs:
  - the mean gain (RLAIF - SFT) of the ground-truth pass rate, of the graded ground truth (grader.graded_score)
    and of the judge score, each with its 95% hierarchical bootstrap interval
    (`rlaif_jax.stats.hierarchical_bootstrap`: builds resampled, then seeds within them), and the share of runs
    that improve;
  - the mean KL to the reference with its interval;
  - each build's judge ROC AUC against the ground truth and its runs' pass-rate gains.
The table is printed and written to OUT/study.md, the numbers to OUT/study.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from rlaif_jax.stats import grand_mean, hierarchical_bootstrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(out: str, name: str, args: str, build: int, seed: int, split: str = "test") -> dict | None:
    """One demo run (skipped when finished): its summary, or None when it failed (its log names why)."""
    workdir = os.path.join(out, name, f"b{build}_s{seed}")
    summary = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary):
        os.makedirs(os.path.dirname(workdir), exist_ok=True)
        config_arg = ",".join(a for a in (f"build={build}", f"eval={split}", args) if a)
        t0 = time.time()
        with open(workdir + ".log", "w") as log:
            rc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--seed", str(seed),
                                 "--config_arg", config_arg, "--workdir", workdir], stdout=log, stderr=log).returncode
        print(f"  {name} build {build} seed {seed}: {'done' if rc == 0 else f'FAILED ({rc})'} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            return None
    with open(summary) as f:
        return json.load(f)


def summarise(runs: dict[int, list[dict]]) -> dict:
    """The statistics of one setting from its runs, grouped by build."""
    out: dict = {"runs": sum(len(v) for v in runs.values()), "builds": len(runs)}
    quantities = {"pass_rate_gain": lambda r: r["rlaif_pass_rate"] - r["sft_pass_rate"],
                  "judge_score_gain": lambda r: r["rlaif_judge_score"] - r["sft_judge_score"],
                  "kl": lambda r: r["kl"]}
    if all("sft_gt_score" in r for rs in runs.values() for r in rs):  # the graded ground truth (newer summaries)
        quantities["gt_score_gain"] = lambda r: r["rlaif_gt_score"] - r["sft_gt_score"]
    for key, value in quantities.items():
        groups = [[value(r) for r in rs] for rs in runs.values() if rs]
        flat = [v for g in groups for v in g]
        lo, hi = hierarchical_bootstrap(groups)
        out[key] = {"mean": grand_mean(groups), "interval": [lo, hi],
                    "improved": float(np.mean([v > 0 for v in flat])), "values": [round(v, 4) for v in flat]}
    out["per_build"] = {b: {"judge_auc": rs[0].get("judge_auc_vs_ground_truth"),
                            "pass_rate_gains": [round(r["rlaif_pass_rate"] - r["sft_pass_rate"], 3) for r in rs]}
                        for b, rs in runs.items() if rs}
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| setting | runs (builds) | pass-rate gain [95% CI] | improved | graded gain [95% CI] | "
             "judge-score gain [95% CI] | KL [95% CI] |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        cell = lambda q: (f"{r[q]['mean']:+.3f} [{r[q]['interval'][0]:+.3f}, {r[q]['interval'][1]:+.3f}]"  # noqa: E731
                          if q in r else "-")
        lines.append(f"| {name} | {r['runs']} ({r['builds']}) | {cell('pass_rate_gain')} | "
                     f"{r['pass_rate_gain']['improved']:.2f} | {cell('gt_score_gain')} | {cell('judge_score_gain')} | "
                     f"{r['kl']['mean']:.2f} [{r['kl']['interval'][0]:.2f}, {r['kl']['interval'][1]:.2f}] |")
    lines += ["", "| setting | build | judge ROC AUC | pass-rate gain per seed |", "| --- | ---: | ---: | --- |"]
    for name, r in results.items():
        for b, pb in r["per_build"].items():
            auc = "-" if pb["judge_auc"] is None else f"{pb['judge_auc']:.3f}"
            lines.append(f"| {name} | {b} | {auc} | {', '.join(f'{g:+.3f}' for g in pb['pass_rate_gains'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--builds", default="3,4,5,6,7", help="testbed build seeds, comma-separated (README: builds 1 and "
                   "2 are set aside for tuning, 3-7 report)")
    p.add_argument("--seeds", default="1,2,3", help="RL seeds, comma-separated")
    p.add_argument("--split", default="test", choices=("validation", "test"),
                   help="the held-out split the runs evaluate on: validation to choose settings, test to report")
    p.add_argument("--setting", action="append", default=[],
                   help="NAME=TESTBED_ARGS (experiments/testbed.py arguments, e.g. pairwise=judge=pairwise)")
    args = p.parse_args(argv)
    settings = dict(s.partition("=")[::2] for s in (args.setting or ["rubric="]))
    builds = [int(b) for b in args.builds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    total = len(settings) * len(builds) * len(seeds)
    print(f"study: {len(settings)} settings x {len(builds)} builds x {len(seeds)} seeds = {total} runs in {args.out} "
          f"(evaluated on the {args.split} split)", flush=True)
    results = {}
    for name, setting_args in settings.items():
        runs = {b: [s for s in (run_one(args.out, name, setting_args, b, seed, args.split) for seed in seeds)
                    if s is not None]
                for b in builds}
        if not any(runs.values()):
            print(f"{name}: every run failed; see the logs in {os.path.join(args.out, name)}", file=sys.stderr)
            continue
        results[name] = summarise({b: rs for b, rs in runs.items() if rs})
    text = table(results)
    print(text)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump({"builds": builds, "seeds": seeds, "split": args.split, "settings": settings, "results": results},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
