"""Over-optimisation curves on the testbed (Gao, Schulman, Hilton 2022): best-of-n against the judge, graded by the
ground truth, and RL runs next to it at matched KL.

    python scripts/overoptimisation.py --build 1 --split validation --n_max 64 --samples 128 --out runs/overopt \\
        [--rl_runs 'runs/study/rubric/b1_s*' ...] [--config_arg judge=relevance] [--seed 0]

1 draws --samples responses to every instruction of the split from the build's SFT policy at temperature 1 and
  scores them with the run's judge (experiments/testbed.py's, rubric by default) and the graded ground truth
  (`rlaif_jax.overoptimisation.sample_policy`: the training run's own evaluation code)
2 for n = 1, 2, 4, ..., n_max: best-of-n's KL (log n - (n - 1) / n), d = sqrt(KL), and the unbiased estimates of
  the judge score, the graded ground truth ("gold") and the pass rate of the judge's best of n
3 fits R_bon(d) = d (alpha - beta d) to the gains over n = 1 of the gold score and of the judge score
4 with --rl_runs (workdirs of experiments/testbed.py runs): each evaluation of each run is a point (sqrt(eval/kl),
  eval/gt/score - its step 0's); fits R_RL(d) = d (alpha - beta log d) to them, and prints for every run's last
  evaluation the best-of-n gain at its KL (from the fitted curve, and interpolated between the measured n)
Writes OUT/overoptimisation.json, OUT/overoptimisation.md and, with matplotlib, OUT/overoptimisation.png.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTBED_CONFIG = os.path.join(ROOT, "experiments", "testbed.py")


def write_atomic(path: str, write) -> None:
    """`write(tmp_path)`, then the file renamed into place: an interrupted run leaves no half-written output."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def fmt(x: float, spec: str = "+.3f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def fit_line(name: str, fit) -> str:
    return (f"| {name} | {fit.form} | {fit.alpha:+.4f} | {fit.beta:+.4f} | {fmt(fit.r2, '.3f')} | {fit.points} | "
            f"{fmt(fit.d_star, '.2f')} | {fmt(fit.d_star ** 2 if math.isfinite(fit.d_star) else math.nan, '.2f')} | "
            f"{fmt(fit.r_star)} |")


def plot(path: str, rows, fits: dict, runs, rl_fits: dict) -> bool:
    """Gold and judge gains against d, best-of-n points and curve, RL points and curve; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    d_max = max([r.d for r in rows] + [float(run.d.max()) for run in runs])
    grid = np.linspace(0.0, d_max * 1.05, 200)
    panels = ((axes[0], "gold", "graded ground truth (gold)"), (axes[1], "judge", "judge score (proxy)"))
    for ax, field, title in panels:
        base = getattr(rows[0], field)
        ax.plot([r.d for r in rows], [getattr(r, field) - base for r in rows], "o", color="C0", label="best-of-n")
        ax.plot(grid, fits[field](grid), "-", color="C0", alpha=0.7, label="best-of-n fit")
        for k, run in enumerate(runs):
            ax.plot(run.d, run.gain(field), ".-", color="C1", alpha=0.35, label="RL runs" if k == 0 else None)
        if field in rl_fits:
            ax.plot(grid, rl_fits[field](grid), "--", color="C1", label="RL fit")
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_xlabel("d = sqrt(KL to the initial policy)")
        ax.set_ylabel("gain over the initial policy")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=int, default=1, help="the testbed's build seed")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--n_max", type=int, default=64, help="the largest n (powers of two up to it)")
    p.add_argument("--samples", type=int, default=128, help="samples per prompt (N >= n_max)")
    p.add_argument("--out", required=True)
    p.add_argument("--rl_runs", nargs="*", default=[], help="globs of experiments/testbed.py workdirs")
    p.add_argument("--config_arg", default="", help="extra experiments/testbed.py arguments, e.g. judge=relevance")
    p.add_argument("--seed", type=int, default=0, help="the sampling key")
    args = p.parse_args()
    if not 1 <= args.n_max <= args.samples:
        p.error(f"--n_max {args.n_max} must be between 1 and --samples {args.samples}")
    t0 = time.time()

    from rlaif_jax import overoptimisation as oo
    from rlaif_jax.testbed import build

    workdirs = sorted({w for pattern in args.rl_runs for w in glob.glob(pattern)})
    if args.rl_runs and not workdirs:
        raise SystemExit(f"--rl_runs {args.rl_runs} match no folder")
    runs = []
    for w in workdirs:
        try:
            runs.append(oo.read_run(w))
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr)

    # ---- 1 the samples (the testbed built or reused first, as the training program does)
    spec = importlib.util.spec_from_file_location("testbed_config", TESTBED_CONFIG)
    testbed_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testbed_config)
    config = testbed_config.get_config(",".join(a for a in (f"build={args.build}", f"eval={args.split}",
                                                            args.config_arg) if a))
    build.ensure_built(config)
    for run in runs:
        if run.eval_path and os.path.realpath(run.eval_path) != os.path.realpath(config.data.eval_path):
            print(f"note: {run.workdir} evaluated on {run.eval_path}, not on this {args.split} split "
                  f"({config.data.eval_path}): its gains are over its own step 0 on its prompts", file=sys.stderr)
    print(f"sampling {args.samples} responses to each {args.split} instruction of build {args.build} "
          f"(judge: {config.judge.mode}) ...", flush=True)
    samples = oo.sample_policy(config, args.samples, seed=args.seed)
    t_sample = time.time() - t0
    print(f"  {len(samples.prompts)} prompts x {args.samples} samples in {t_sample:.0f}s; judge score "
          f"{samples.judge_pn.mean():.3f}, gold {samples.gold_pn.mean():.3f}, pass rate {samples.pass_pn.mean():.3f}",
          flush=True)

    # ---- 2, 3 best-of-n and its fits
    rows = oo.best_of_n_table(samples, oo.powers_of_two(args.n_max))
    d = [r.d for r in rows]
    fits = {field: oo.fit_best_of_n(d, [getattr(r, field) - getattr(rows[0], field) for r in rows])
            for field in ("gold", "judge")}

    # ---- 4 RL runs at matched KL
    rl_fits, finals = {}, []
    if runs:
        import numpy as np
        rl_d = np.concatenate([run.d for run in runs])
        for field in ("gold", "judge"):
            try:
                rl_fits[field] = oo.fit_rl(rl_d, np.concatenate([run.gain(field) for run in runs]))
            except ValueError as e:
                print(f"no RL fit of the {field} gain: {e}", file=sys.stderr)
        for run in runs:
            gold_bon = oo.best_of_n_at_kl(run.kl[-1], fits["gold"], d, [r.gold - rows[0].gold for r in rows])
            judge_bon = oo.best_of_n_at_kl(run.kl[-1], fits["judge"], d, [r.judge - rows[0].judge for r in rows])
            finals.append({"workdir": run.workdir, "step": int(run.steps[-1]), "kl": float(run.kl[-1]),
                           "d": gold_bon.d, "gold_gain": float(run.gain("gold")[-1]),
                           "judge_gain": float(run.gain("judge")[-1]),
                           "pass_rate": float(run.pass_rate[-1]), "pass_rate_gain": float(run.gain("pass_rate")[-1]),
                           "bon_gold_gain_fitted": gold_bon.fitted, "bon_gold_gain_measured": gold_bon.measured,
                           "bon_judge_gain_fitted": judge_bon.fitted, "bon_judge_gain_measured": judge_bon.measured,
                           "extrapolated": gold_bon.extrapolated})

    # ---- the report
    title = (f"Best-of-n against the {config.judge.mode} judge, build {args.build}, {args.split} split: "
             f"{len(samples.prompts)} instructions x {args.samples} samples of the SFT policy at temperature "
             f"{config.rollout.temperature:g} (unbiased estimates from all {args.samples}), seed {args.seed}")
    lines = [title, "",
             "| n | KL | d = sqrt(KL) | judge score | gold (graded) | pass rate | gold gain | judge gain |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.n} | {r.kl:.3f} | {r.d:.3f} | {r.judge:.3f} | {r.gold:.3f} | {r.pass_rate:.3f} | "
                     f"{r.gold - rows[0].gold:+.3f} | {r.judge - rows[0].judge:+.3f} |")
    lines += ["", ("Fits (gain over the initial policy; R^2 about the mean gain, d = 0 left out; d* the argmax, "
                   "KL* = d*^2, R* the fitted gain there):"), "",
              "| gain | form | alpha | beta | R^2 | points | d* | KL* | R* |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
              fit_line("gold, best-of-n", fits["gold"]), fit_line("judge, best-of-n", fits["judge"])]
    lines += [fit_line(f"{field}, RL ({len(runs)} runs)", fit) for field, fit in rl_fits.items()]
    if finals:
        lines += ["", ("RL runs' last evaluations next to best-of-n at the same KL (gains over each one's initial "
                       "policy; best-of-n: the fitted curve, * = extrapolated beyond the largest n, and interpolated "
                       "between the measured n, — beyond them):"), "",
                  ("| run | step | KL | gold gain | best-of-n gold gain (fit / measured) | judge gain | "
                   "best-of-n judge gain (fit / measured) | pass rate |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for f in finals:
            star = "*" if f["extrapolated"] else ""
            lines.append(f"| {f['workdir']} | {f['step']} | {f['kl']:.2f} | {f['gold_gain']:+.3f} | "
                         f"{f['bon_gold_gain_fitted']:+.3f}{star} / {fmt(f['bon_gold_gain_measured'])} | "
                         f"{f['judge_gain']:+.3f} | {f['bon_judge_gain_fitted']:+.3f}{star} / "
                         f"{fmt(f['bon_judge_gain_measured'])} | {f['pass_rate']:.3f} |")
    seconds = time.time() - t0
    lines += ["", f"{seconds:.0f} s ({t_sample:.0f} s of it start-up, sampling, judging and grading)"]
    text = "\n".join(lines)
    print("\n" + text)

    os.makedirs(args.out, exist_ok=True)
    result = {"build": args.build, "split": args.split, "judge": config.judge.mode, "samples": args.samples,
              "prompts": len(samples.prompts), "seed": args.seed, "config_arg": args.config_arg,
              "rows": [r._asdict() for r in rows],
              "fits": {f"bon_{k}": v._asdict() for k, v in fits.items()} | {f"rl_{k}": v._asdict()
                                                                            for k, v in rl_fits.items()},
              "rl_runs": finals, "seconds": seconds, "sampling_seconds": t_sample}

    def dump_json(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, allow_nan=True)

    def dump_md(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    write_atomic(os.path.join(args.out, "overoptimisation.json"), dump_json)
    write_atomic(os.path.join(args.out, "overoptimisation.md"), dump_md)
    png = os.path.join(args.out, "overoptimisation.png")
    wrote = plot(png, rows, fits, runs, rl_fits)
    print(f"\nwritten: {os.path.join(args.out, 'overoptimisation.json')}, .md" + (f", {png}" if wrote else
                                                                                   " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
