"""The demo: a complete RLAIF run on the built-in testbed, on a laptop CPU (run through scripts/demo.sh).

    python scripts/demo.py [--workdir runs/demo] [--seed 0] [--config_arg ...]

1 builds (or reuses) the testbed's SFT policy and judge
2 measures the judge against the ground truth it never sees (scripts/judge_eval.py on fresh labelled examples)
3 runs RLAIF with the training program (experiments/testbed.py); a rerun resumes or reuses a finished run
4 prints SFT vs RLAIF (ground-truth pass rate, judge score, KL to the reference) from the held-out evaluations
  (the test split's instructions, unseen in training, unless --config_arg eval=validation), writes
  WORKDIR/summary.json and the plots (rlaif_jax.report) in WORKDIR/report, and says where the run's gain falls
  within the reference study's runs of the same setting (experiments/testbed_study.json, scripts/study.py's output)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTBED_CONFIG = os.path.join(ROOT, "experiments", "testbed.py")
# The headline study's output (scripts/study.py's study.json): the distribution one demo run is a draw from.
REFERENCE_STUDY = os.path.join(ROOT, "experiments", "testbed_study.json")
# Arguments that pick a draw or the evaluation split, not a setting: left out when matching a study's setting.
DRAW_ARGS = ("build", "seed", "eval")


def summarize(workdir: str) -> dict:
    """SFT = the evaluation at step 0 (the initial policy), RLAIF = the last evaluation."""
    from rlaif_jax import metrics
    evals = [r for r in metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE)) if "eval/gt/pass_rate" in r]
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise SystemExit(f"{workdir} has no complete run to summarise (evaluations: {[r['step'] for r in evals]})")
    sft, final = evals[0], evals[-1]
    out = {"steps": final["step"],
           "sft_pass_rate": sft["eval/gt/pass_rate"], "rlaif_pass_rate": final["eval/gt/pass_rate"],
           "sft_judge_score": sft["eval/judge_score"], "rlaif_judge_score": final["eval/judge_score"],
           "kl": final["eval/kl"]}
    if "eval/win_rate" in final:  # the judge's pairwise preference for the trained policy over the initial one
        out["win_rate"] = final["eval/win_rate"]
    for name in ("relevance", "coherence", "harmlessness"):
        out[f"sft_{name}"], out[f"rlaif_{name}"] = sft[f"eval/gt/{name}"], final[f"eval/gt/{name}"]
    if "eval/gt/score" in final:  # the graded ground truth in [0, 1] (grader.graded_score)
        out["sft_gt_score"], out["rlaif_gt_score"] = sft["eval/gt/score"], final["eval/gt/score"]
    return out


def place_in_study(summary: dict, config_arg: str, split: str, path: str = REFERENCE_STUDY) -> str:
    """Where this run's pass-rate gain falls among the reference study's runs of the same setting (the same
    experiments/testbed.py arguments, apart from DRAW_ARGS, and the same evaluation split)."""
    if not os.path.exists(path):
        return f"no reference study ({path} is missing)"
    with open(path) as f:
        study = json.load(f)
    setting = sorted(a for a in config_arg.split(",") if a and a.split("=")[0] not in DRAW_ARGS)
    names = [n for n, args in study["settings"].items() if sorted(a for a in args.split(",") if a) == setting]
    if not names or names[0] not in study["results"]:
        return f"the reference study has no runs of these settings ({','.join(setting) or 'defaults'})"
    if study.get("split", "test") != split:
        return f"the reference study evaluates on the {study.get('split', 'test')} split, this run on {split}"
    r = study["results"][names[0]]["pass_rate_gain"]
    gain = summary["rlaif_pass_rate"] - summary["sft_pass_rate"]
    below = sum(v < gain for v in r["values"])
    return (f"this run's pass-rate gain, {gain:+.3f}, is above {below} of the {len(r['values'])} runs of the "
            f"reference study (setting {names[0]!r}: builds {study['builds']} x RL seeds {study['seeds']}, "
            f"{study.get('split', 'test')} split; their mean gain {r['mean']:+.3f}, 95% interval "
            f"[{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}])")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config_arg", default="", help="extra experiments/testbed.py arguments, e.g. judge=relevance")
    args = p.parse_args()
    t0 = time.time()

    # ---- 1 the testbed (built once, then cached)
    from rlaif_jax.testbed import build
    # The config file loaded by path, as the training program's --config flag loads it; then the testbed is built
    # (or reused) as the program does before it loads the models.
    spec = importlib.util.spec_from_file_location("testbed_config", TESTBED_CONFIG)
    testbed_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testbed_config)
    config = testbed_config.get_config(",".join(a for a in (f"seed={args.seed}", args.config_arg) if a))
    build.ensure_built(config)

    # ---- 2 the judge against the ground truth
    import judge_eval  # scripts/judge_eval.py, next to this file
    from rlaif_jax import judging
    from rlaif_jax.testbed import task
    pairwise = config.judge.mode == "pairwise"
    # Fresh responses to the test split's instructions, which the judge never trained on.
    labelled = task.write_judge_eval_file(os.path.join(
        os.path.dirname(config.data.path), f"judge_eval{'_pairwise' if pairwise else ''}_test.jsonl"),
        pairwise=pairwise, split="test")
    judges = judging.load_ensemble(config.judge)  # one judge, or each judge of an ensemble (ensemble=)
    agreements = [judge_eval.evaluate(judge, judge_eval.read_labelled(labelled, pairwise=pairwise), batch_size=64)
                  for judge in judges]
    for k, agreement in enumerate(agreements):
        name = "judge" if len(judges) == 1 else f"ensemble judge {k}"
        if pairwise:
            print(f"\n{name} vs ground truth on {int(agreement['examples'])} fresh response pairs: accuracy "
                  f"{agreement['agreement_accuracy']:.3f}, position consistency "
                  f"{agreement['position_consistency']:.3f}", flush=True)
        else:
            print(f"\n{name} vs ground truth on {int(agreement['examples'])} fresh responses: ROC AUC "
                  f"{agreement['agreement_auc']:.3f}, Spearman {agreement['agreement_spearman']:.3f}, length bias "
                  f"{agreement['length_bias_corr']:+.3f}", flush=True)
    agreement = agreements[0]  # the summary's: the run's own build's judge

    # ---- 3 RLAIF
    from rlaif_jax import train
    train.configure_logging()
    code = train.launch(config, args.workdir)  # a user error: one FATAL line, exit 2; a signal: its exit code
    if code:
        sys.exit(code)

    # ---- 4 the summary
    from rlaif_jax import report
    summary = summarize(args.workdir)
    if pairwise:
        summary["judge_accuracy_vs_ground_truth"] = agreement["agreement_accuracy"]
    else:
        summary["judge_auc_vs_ground_truth"] = agreement["agreement_auc"]
    art = build.locate(build.seeded_config(config.testbed.seed))
    split = "validation" if config.data.eval_path == art.validation_prompts_file else "test"
    summary["eval_split"] = split
    summary["minutes"] = round((time.time() - t0) / 60, 2)
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    pngs, _ = report.make_report([args.workdir], os.path.join(args.workdir, "report"), ["demo"], 0.0)
    s = summary
    judge_row = f"judge score ({config.judge.mode})"
    print(f"""
RLAIF on the testbed ({s['steps']} steps, build {config.testbed.seed}, RL seed {args.seed}; the {split} split's
{config.eval.max_prompts} unseen instructions, {config.eval.samples_per_prompt} samples each at temperature 1)

|                          | SFT policy | RLAIF policy |
|--------------------------|-----------:|-------------:|
| ground-truth pass rate   | {s['sft_pass_rate']:10.3f} | {s['rlaif_pass_rate']:12.3f} |
| graded ground truth      | {s.get('sft_gt_score', float('nan')):10.3f} | {s.get('rlaif_gt_score', float('nan')):12.3f} |
|   relevance              | {s['sft_relevance']:10.3f} | {s['rlaif_relevance']:12.3f} |
|   coherence              | {s['sft_coherence']:10.3f} | {s['rlaif_coherence']:12.3f} |
|   harmlessness           | {s['sft_harmlessness']:10.3f} | {s['rlaif_harmlessness']:12.3f} |
| {judge_row:<24s} | {s['sft_judge_score']:10.3f} | {s['rlaif_judge_score']:12.3f} |
| win rate vs SFT (judge)  | {0.5:10.3f} | {s.get('win_rate', float('nan')):12.3f} |
| KL to the reference      | {0.0:10.3f} | {s['kl']:12.3f} |

Within the study: {place_in_study(s, ",".join(a for a in (args.config_arg,) if a), split)}

summary:  {os.path.join(args.workdir, 'summary.json')}
plots:    {os.path.join(args.workdir, 'report')} ({len(pngs)} PNGs)
samples:  {os.path.join(args.workdir, 'samples')}
total time: {s['minutes']} min""")


if __name__ == "__main__":
    main()
