"""Train a reward model on the judge's pairwise preferences (canonical, "distilled" RLAIF).

Input: a JSONL file of AI-labelled preferences over policy samples, one pair per line:
    {"prompt": str, "response_a": str, "response_b": str, "p_a_better": float in [0, 1]}
`p_a_better` is the pairwise judge's debiased P(a better) (a soft label). Lines without it are labelled here by
the pairwise LLM judge given with --label_judge.path (`judging.label_preferences`), so the same judge can drive
direct RLAIF (config.judge.mode=pairwise/pointwise) and this reward model (config.judge.mode=reward_model) on one
run.

The reward model is an HF checkpoint (--model) plus a scalar value head, trained with a soft Bradley-Terry loss
(`rlaif_jax.reward_model`). Output: a folder that `judging.load_judge` reads in reward_model mode.

--normalize_to=refs.jsonl ({"prompt", "completion"} per line, as `scripts/export_dataset.py --kind sft` writes
a dataset's reference responses) shifts the trained model so those references score 0 on average (the
reproduction of Huang et al. 2024 does this after training; `reward_model.normalize_to_references`).

    python scripts/train_reward_model.py --model PATH --data prefs.jsonl --eval_data held.jsonl --out OUT \\
        [--rm.template='Prompt : {prompt}\\nResponse : {response}' --rm.max_len=512] \\
        [--label_judge.path=JUDGE]   # only when some lines lack p_a_better
        [--normalize_to=refs.jsonl]  # reference responses that should score 0 on average
"""
from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from rlaif_jax import data, judging, reward_model
from rlaif_jax.models import hf

log = logging.getLogger("train_reward_model")

flags.DEFINE_string("model", None, "HF checkpoint folder (or hub id) of the reward model's backbone", required=True)
flags.DEFINE_string("data", None, "preference JSONL (prompt, response_a, response_b, p_a_better)", required=True)
flags.DEFINE_string("eval_data", "", "held-out preference JSONL for ranking accuracy")
flags.DEFINE_string("out", None, "output folder", required=True)
flags.DEFINE_integer("steps", 200, "optimizer steps")
flags.DEFINE_integer("batch_size", 16, "pairs per step")
flags.DEFINE_float("lr", 1e-4, "AdamW learning rate")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay")
flags.DEFINE_string("normalize_to", "", "JSONL of (prompt, completion) reference responses: after training, shift "
                    "the value head's bias so that they score 0 on average")
flags.DEFINE_integer("seed", 0, "seed (value-head init, data order, labelling)")
config_flags.DEFINE_config_dict("rm", judging.default_config("reward_model"), "template settings of the reward model")
config_flags.DEFINE_config_dict("label_judge", judging.default_config("pairwise"),
                                "pairwise LLM judge that labels the pairs that lack p_a_better")


def main(argv):
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    records = reward_model.read_preferences(F.data)
    eval_records = reward_model.read_preferences(F.eval_data) if F.eval_data else None
    unlabelled = [r for r in records + (eval_records or []) if r.get("p_a_better") is None]
    if unlabelled:
        if not F.label_judge.path:
            raise SystemExit(f"{len(unlabelled)} pairs lack p_a_better; pass --label_judge.path=JUDGE to label them")
        judge = judging.load_judge(F.label_judge)
        records = judging.label_preferences(records, judge, F.batch_size, F.seed)
        if eval_records:
            eval_records = judging.label_preferences(eval_records, judge, F.batch_size, F.seed + 1)
    rm_config = F.rm
    rm_config.mode = "reward_model"
    cfg, backbone = hf.load_model(F.model, dtype=rm_config.dtype, param_dtype=rm_config.param_dtype)
    tok = hf.load_tokenizer(F.model)
    spec = judging.make_spec(rm_config, tok)
    result = reward_model.train(
        cfg, backbone, judging.encode_pairs(spec, tok, records), steps=F.steps, batch_size=F.batch_size,
        learning_rate=F.lr, weight_decay=F.weight_decay, seed=F.seed,
        eval_data=judging.encode_pairs(spec, tok, eval_records) if eval_records else None)
    params = result.params
    if F.normalize_to:
        references = [r for _, r in data.read_jsonl(F.normalize_to, {"prompt", "completion"}, "reference responses")]
        tokens, mask = judging.encode_responses(spec, tok, [r["prompt"] for r in references],
                                                [r["completion"] for r in references])
        params, mean = reward_model.normalize_to_references(params, cfg, tokens, mask, F.batch_size)
        log.info("normalised: the %d references of %s scored %.4f on average; the bias now subtracts it",
                 len(references), F.normalize_to, mean)
    reward_model.save_reward_model(F.out, cfg, params.model, params.value_head, tok, spec)
    log.info("saved the reward model to %s (use config.judge.mode=reward_model, config.judge.path=%s)", F.out, F.out)


if __name__ == "__main__":
    app.run(main)
