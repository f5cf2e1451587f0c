"""Plots and a summary table for one or more runs (rlaif_jax.report): DIR/<key>.png per curve with the runs
overlaid, and DIR/summary.md with each run's final and best values; the table is also printed.

    python scripts/report.py WORKDIR [WORKDIR ...] [--out DIR] [--labels a,b] [--smooth 0.9]
    python scripts/report.py --seeds NAME=GLOB [NAME=GLOB ...] [--keys k1,k2]   # repeats over RL seeds

--seeds: each NAME=GLOB names a setting and the workdirs of its seeds (their summary.json, as the demo writes);
prints `rlaif_jax.report.seed_table`: mean +- std [95% bootstrap interval] (each seed's value) per key.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Sequence

from rlaif_jax.report import make_report, seed_table

SEED_KEYS = "sft_pass_rate,rlaif_pass_rate,rlaif_coherence,rlaif_relevance,sft_judge_score,rlaif_judge_score,win_rate,kl"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="*", help="run folders holding metrics.jsonl")
    parser.add_argument("--seeds", nargs="+", default=[], help="NAME=GLOB: a setting and its seeds' workdirs")
    parser.add_argument("--keys", default=SEED_KEYS, help="--seeds: summary.json keys, comma-separated")
    parser.add_argument("--out", default="report", help="folder for the PNGs and summary.md")
    parser.add_argument("--labels", default="", help="comma-separated run names (default: folder names)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA factor for train curves, e.g. 0.9")
    args = parser.parse_args(argv)
    if args.seeds:
        settings = {}
        for item in args.seeds:
            name, _, pattern = item.partition("=")
            folders = sorted(glob.glob(pattern))
            settings[name] = [json.load(open(os.path.join(f, "summary.json"))) for f in folders
                              if os.path.exists(os.path.join(f, "summary.json"))]
            if not settings[name]:
                parser.error(f"--seeds {item}: no workdir with a summary.json matches {pattern!r}")
        print(seed_table(settings, args.keys.split(",")))
        return 0
    if not args.workdirs:
        parser.error("give run folders, or --seeds NAME=GLOB")
    labels = args.labels.split(",") if args.labels else None
    pngs, table = make_report(args.workdirs, args.out, labels, args.smooth)
    print(table)
    print(f"wrote {len(pngs)} plots and summary.md to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
