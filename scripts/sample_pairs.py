"""Sample two responses per prompt from a run's policy and write them as preference pairs to label.

Canonical (distilled) RLAIF, end to end on one experiment config:

    python scripts/sample_pairs.py --config experiments/X.py --out pairs.jsonl --num_prompts 2048
    python -m rlaif_jax.reward_model_stage --config experiments/rm_stage.py:rl=X,policy=SFT_DIR,data=pairs.jsonl,\\
        label_judge=JUDGE --workdir runs/rm
    python -m rlaif_jax.train --config experiments/X.py --config.judge.mode=reward_model \\
        --config.judge.path=runs/rm/reward_model --workdir ...

Each line: {"prompt", "response_a", "response_b"}; the pairwise judge adds "p_a_better" when the reward-model
stage labels them. Responses come from the same sampler and settings (config.rollout) as training, with
n_samples = 2 sharing one prefill, from the config's policy.path (`labelling.sample_pairs`).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from rlaif_jax import labelling


def sample_pairs(c, out_path: str, num_prompts: int, seed: int) -> int:
    """`labelling.sample_pairs` written to `out_path` (whole, then renamed: a killed run leaves no half file under
    the real name); returns the number of pairs."""
    records = labelling.sample_pairs(c, num_prompts, seed)
    with open(out_path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(out_path + ".tmp", out_path)
    return len(records)


def main(argv):
    del argv
    F = flags.FLAGS
    if F.config is None or not F.out:
        raise app.UsageError("--config and --out are required")
    n = sample_pairs(F.config, F.out, F.num_prompts, F.seed)
    print(f"wrote {n} pairs to {F.out}")


if __name__ == "__main__":
    # Flags are defined only when run as a script, so importing sample_pairs (tests) defines none.
    config_flags.DEFINE_config_file("config", None, "experiment config", lock_config=True)
    flags.DEFINE_string("out", None, "output JSONL")
    flags.DEFINE_integer("num_prompts", 256, "prompts to sample pairs for")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    app.run(main)
