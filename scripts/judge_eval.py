"""How good is a judge? Agreement with labels, position consistency, length bias, on a labelled JSONL file.

    python scripts/judge_eval.py --data labelled.jsonl --judge.path=JUDGE --judge.mode=pairwise [--out r.json]

One example per line; the judge's config section is `--judge.*` (rlaif_jax.judging.default_config()).
  pairwise:   {"prompt", "response_a", "response_b", "label"}; label 1 = a better, 0 = b better (a probability,
              or "a" / "b", also works; 0.5 = tie, left out of the agreement)
  the others: {"prompt", "response", "label"}; label a number (a human score, or 0 / 1)

Printed:
  agreement            pairwise: accuracy of [P(a better) > 1/2] against the label; else Spearman and Pearson
                       correlation of the score with the label (and ROC AUC when labels are 0 / 1)
  position consistency pairwise: rate at which both presentation orders prefer the same response, and how often
                       a single order picks the response shown first (0.5 = no position bias)
  length bias          Pearson correlation of the score with the response length in judge tokens (pairwise:
                       of P(a better) - 1/2 with len(a) - len(b), and how often the longer one wins); the same
                       for the labels, to tell the judge's bias from the data's
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from rlaif_jax.stats import pearson, roc_auc, spearman


# ---------------------------------------------------------------------------------------------- data
def _label(value: Any) -> float:
    if isinstance(value, str):
        value = {"a": 1.0, "b": 0.0, "tie": 0.5}.get(value.strip().lower(), value)
    return float(value)


def read_labelled(path: str, pairwise: bool) -> list[dict[str, Any]]:
    from rlaif_jax.data import read_jsonl
    keys = {"prompt", "response_a", "response_b", "label"} if pairwise else {"prompt", "response", "label"}
    return [dict(r, label=_label(r["label"])) for _, r in read_jsonl(path, keys, "examples")]


# ---------------------------------------------------------------------------------------------- evaluation
def judge_records(judge, records: list[dict[str, Any]], batch_size: int, seed: int = 0):
    """Scores every record with `judging.score_texts` (host rendering, jitted judge); returns scores and the
    concatenated per-example metrics as NumPy arrays."""
    import jax
    from rlaif_jax import judging
    pairwise = judge.spec.mode == "pairwise"
    rng = jax.random.key(seed)
    scores, agree, p_orders, truncated, neutral = [], [], [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        # Pad the last chunk to the batch size so one compiled shape serves every call.
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        rng, key = jax.random.split(rng)
        kw = dict(responses_b=[r["response_b"] for r in padded]) if pairwise else {}
        s, m = judging.score_texts(judge.params, judge.cfg, judge.spec, judge.tokenizer,
                                   [r["prompt"] for r in padded],
                                   [r["response_a" if pairwise else "response"] for r in padded], key, **kw)
        n = len(chunk)
        scores.append(np.asarray(s)[:n])
        truncated.append(np.asarray(m.truncated_b)[:n])
        neutral.append(np.asarray(m.neutral_count_b)[:n])
        if pairwise:
            agree.append(np.asarray(m.position_agree_b)[:n])
            p_orders.append(np.asarray(m.p_orders_b2)[:n])
    out = dict(score=np.concatenate(scores), truncated=np.concatenate(truncated), neutral=np.concatenate(neutral))
    if pairwise:
        out.update(position_agree=np.concatenate(agree), p_orders=np.concatenate(p_orders))
    return out


def evaluate(judge, records: list[dict[str, Any]], batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """The report's numbers (see the module docstring)."""
    pairwise = judge.spec.mode == "pairwise"
    res = judge_records(judge, records, batch_size, seed)
    score, label = res["score"], np.asarray([r["label"] for r in records])
    n_tokens = lambda text: len(judge.tokenizer(text, add_special_tokens=False)["input_ids"])
    report: dict[str, float] = {"examples": float(len(records)), "truncated": float(res["truncated"].sum()),
                                "neutral_queries": float(res["neutral"].sum())}
    if pairwise:
        decided = label != 0.5
        report["agreement_accuracy"] = float(np.mean((score > 0.5)[decided] == (label > 0.5)[decided]))
        report["position_consistency"] = float(res["position_agree"].mean())
        # Order (a, b) shows a first; order (b, a) shows b first, so P(first) there is 1 - P(a better).
        p_first = np.concatenate([res["p_orders"][:, 0], 1.0 - res["p_orders"][:, 1]])
        report["first_position_rate"] = float(np.mean(p_first > 0.5))
        len_diff = np.asarray([n_tokens(r["response_a"]) - n_tokens(r["response_b"]) for r in records])
        report["length_bias_corr"] = pearson(score - 0.5, len_diff)
        report["label_length_corr"] = pearson(label - 0.5, len_diff)
        unequal = len_diff != 0
        report["longer_preferred_rate"] = (float(np.mean((score > 0.5)[unequal] == (len_diff > 0)[unequal]))
                                           if unequal.any() else float("nan"))
    else:
        report["agreement_spearman"] = spearman(score, label)
        report["agreement_pearson"] = pearson(score, label)
        if set(np.unique(label)) <= {0.0, 1.0}:
            report["agreement_auc"] = roc_auc(score, label == 1.0)
        lengths = np.asarray([n_tokens(r["response"]) for r in records])
        report["length_bias_corr"] = pearson(score, lengths)
        report["label_length_corr"] = pearson(label, lengths)
    return report


def main(argv):
    del argv
    from absl import flags
    from rlaif_jax import judging
    F = flags.FLAGS
    judge = judging.load_judge(F.judge)
    print(f"judge {F.judge.path}: mode {judge.spec.mode}, templating path {judge.spec.path}")
    records = read_labelled(F.data, judge.spec.mode == "pairwise")
    report = evaluate(judge, records, F.batch_size, F.seed)
    width = max(len(k) for k in report)
    for k, v in report.items():
        print(f"{k:<{width}}  {int(v)}" if k in ("examples", "truncated", "neutral_queries") else f"{k:<{width}}  {v:.4f}")
    if F.out:
        with open(F.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    from rlaif_jax import judging

    flags.DEFINE_string("data", None, "labelled JSONL file", required=True)
    flags.DEFINE_integer("batch_size", 16, "examples per judge call")
    flags.DEFINE_integer("seed", 0, "seed (principle sampling)")
    flags.DEFINE_string("out", "", "optional JSON file for the numbers")
    config_flags.DEFINE_config_dict("judge", judging.default_config(), "the judge (config.judge)")
    app.run(main)
