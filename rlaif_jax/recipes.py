"""What the experiment configs share: their argument parser, the `runlocal` shrink, and published recipes.

An experiment is one file in experiments/ with `get_config(arg)` returning a locked ConfigDict, a pure
description of the run (it builds, downloads and writes nothing):

    python -m rlaif_jax.train --config experiments/rlaif_tldr.py:variant=direct,fsdp=8 --workdir DIR

The argument after the colon is a short comma-separated string (big_vision style) read by `parse_arg`; any
field can still be overridden with `--config.a.b=value`. Every file has a `runlocal` switch (`apply_runlocal`)
that shrinks the same experiment (batch, lengths, steps) to a one-host smoke run, so the real config and the
smoke test cannot drift apart. The configs load by path, so they import what they share from this module.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """"a=1,b=x,flag" over `defaults` -> ConfigDict(a=1, b="x", flag=True).

    Each value takes the type of its default: bool (a bare `flag` means True, or flag=true/false/1/0), int,
    float or str. Keys not in `defaults` are an error that lists the known ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if not sep:
                value = True
            elif raw.lower() in ("true", "1", "yes"):
                value = True
            elif raw.lower() in ("false", "0", "no"):
                value = False
            else:
                raise ValueError(f"config argument {key}={raw!r} is not a boolean (true/false)")
        elif not sep:
            raise ValueError(f"config argument {key!r} needs a value: {key}=...")
        elif isinstance(default, int):
            value = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        else:
            value = raw
        out[key] = value
    return out


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
    """Shrinks an experiment to a few steps of a small batch with short prompts and responses (a smoke run on
    one host with small models); everything else (models, judge, algorithm, data source) stays the same."""
    c.train.batch_size = 8
    c.train.steps = 2
    c.optim.grad_accum = 1
    c.algo.minibatches = 1
    c.data.max_prompt_len = 128
    c.data.eval_max_prompts = 8
    c.rollout.max_new_tokens = 16
    c.judge.max_len = 384
    c.eval.every = 2
    c.eval.max_prompts = 8
    c.checkpoint.every_steps = 1000
    c.logging.progress_bar = False


def set_lee2023_rl(c: ml_collections.ConfigDict) -> None:
    """The RL recipe of Lee et al. 2023 (RLAIF vs RLHF), shared by its TL;DR and harmless-dialogue configs:
    sampling temperature 0.9, a KL penalty of 0.05 (k1) in the reward, the score as sampled (no extra penalty or
    normalisation), and REINFORCE with a learned baseline: one on-policy gradient step per batch, A = R - V(prompt),
    no advantage whitening (the baseline centres the return; nothing rescales it)."""
    c.rollout.temperature = 0.9
    c.reward.kl_coef = 0.05
    c.reward.kl_estimator = "k1"
    c.reward.kl_in_reward = True
    c.reward.adaptive_kl = False
    c.reward.missing_stop_mode = "none"
    c.reward.score_norm = "none"
    c.algo.estimator = "reinforce"
    c.algo.epochs = 1
    c.algo.minibatches = 1
    c.algo.whiten_advantages = False
    c.critic.kind = "separate"  # a value model next to the policy (--config.critic.kind=value_head shares its trunk)
    c.critic.init = "policy"


def set_lee2023_loop(c: ml_collections.ConfigDict, *, batch_size: int, steps: int, fsdp: int,
                     wandb_project: str) -> None:
    """The training loop of the Lee et al. 2023 configs (this codebase's choices; the paper does not give
    them): `batch_size` prompts per step over 2 gradient-accumulation micro-batches, learning rate 1e-6 after 10
    warm-up steps, evaluation on 256 prompts every 50 steps, a checkpoint every 100."""
    c.train.batch_size = batch_size
    c.optim.grad_accum = 2
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.train.steps = steps
    c.mesh.fsdp = fsdp
    c.eval.every = 50
    c.eval.max_prompts = 256
    c.checkpoint.every_steps = 100
    c.logging.wandb_project = wandb_project


# ---------------------------------------------------------------------------------------------- Reddit TL;DR
# The filtered Reddit TL;DR of Stiennon et al. 2020 (OpenAI's `tldr_3_filtered`: 116,722 / 6,447 / 6,553 posts),
# as published by the PPO-details reproduction (Huang et al. 2024). Its raw columns are id, subreddit, title,
# post, summary (+ the reproduction's pre-tokenised query / reference columns, which we do not use); its schema
# in data.DATASETS builds OpenAI's query format (data.TLDR_PROMPT_FORMAT) from the raw columns.
TLDR_DATASET = "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144"


def set_tldr_data(d: ml_collections.ConfigDict) -> None:
    """`config.data` for TL;DR: the hub dataset read by its schema (OpenAI's prompt format over its columns, the
    summary as the reference response), held-out validation.

    OpenAI truncates long posts inside the POST field; our loader cuts prompts longer than max_prompt_len from
    the left instead (keeping "TL;DR:"). The filtered posts are short enough that at 512 tokens this is rare; the
    loader logs how many prompts it cut.
    """
    d.path = TLDR_DATASET
    d.schema = TLDR_DATASET
    d.split = "train"
    d.eval_split = "validation"
    d.eval_max_prompts = 512
    d.use_chat_template = False  # the policy is an SFT summariser continuing after "TL;DR:"
    d.max_prompt_len = 512
