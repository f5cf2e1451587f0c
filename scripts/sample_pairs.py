"""Sample two responses per prompt from a run's policy and write them as preference pairs to label.

Canonical (distilled) RLAIF, end to end on one experiment config:

    python scripts/sample_pairs.py --config experiments/X.py --out pairs.jsonl --num_prompts 2048
    python -m rlaif_jax.reward_model_stage --config experiments/rm_stage.py:rl=X,policy=SFT_DIR,data=pairs.jsonl,\\
        label_judge=JUDGE --workdir runs/rm
    python -m rlaif_jax.train --config experiments/X.py --config.judge.mode=reward_model \\
        --config.judge.path=runs/rm/reward_model --workdir ...

Each line: {"prompt", "response_a", "response_b"}; the pairwise judge adds "p_a_better" when the reward-model
stage labels them. Responses come from the same sampler and settings (config.rollout) as training, with
n_samples = 2 sharing one prefill; `--checkpoint_step` samples from a run's checkpoint instead of the initial
policy (policy params are read from WORKDIR/checkpoints).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from rlaif_jax import data as data_lib
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax.models import hf


def sample_pairs(c, out_path: str, num_prompts: int, seed: int) -> int:
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        tokenizer = hf.load_tokenizer(c.policy.path)
        cfg, params = hf.load_model(c.policy.path, mesh, c.policy.dtype, c.policy.param_dtype, rules)
        sampling = dataclasses.replace(rollout_lib.SamplingConfig.from_config(c.rollout, cfg), n_samples=2)
        loader, _ = data_lib.load_prompts(c.data, tokenizer, c.train.batch_size)
        generate = jax.jit(rollout_lib.rollout, static_argnums=(1, 5))
        key, written = jax.random.key(seed), 0
        with open(out_path + ".tmp", "w") as f, tqdm(total=num_prompts, unit="prompt") as bar:
            while written < num_prompts:
                batch = data_lib.to_global(next(loader), shd.batch_sharding(mesh, 1))
                key, k = jax.random.split(key)
                roll = generate(params, cfg, batch.tokens_bp, batch.mask_bp, k, sampling)
                tokens, mask = np.asarray(roll.response_tokens_br), np.asarray(roll.response_mask_br)
                texts = [tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]
                prompts = tokenizer.batch_decode(np.asarray(batch.tokens_bp), skip_special_tokens=True)
                for i, prompt in enumerate(prompts[:num_prompts - written]):
                    f.write(json.dumps({"prompt": prompt, "response_a": texts[2 * i],
                                        "response_b": texts[2 * i + 1]}) + "\n")
                    written += 1
                    bar.update(1)
        os.replace(out_path + ".tmp", out_path)  # a killed run leaves no half file under the real name
    return written


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
