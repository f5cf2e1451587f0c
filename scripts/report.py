"""Plots and a summary table for one or more runs (rlaif_jax.report): DIR/<key>.png per curve with the runs
overlaid, and DIR/summary.md with each run's final and best values; the table is also printed.

    python scripts/report.py WORKDIR [WORKDIR ...] [--out DIR] [--labels a,b] [--smooth 0.9]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rlaif_jax.report import make_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default="report", help="folder for the PNGs and summary.md")
    parser.add_argument("--labels", default="", help="comma-separated run names (default: folder names)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA factor for train curves, e.g. 0.9")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    pngs, table = make_report(args.workdirs, args.out, labels, args.smooth)
    print(table)
    print(f"wrote {len(pngs)} plots and summary.md to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
