"""Supervised fine-tuning (SFT) of a base model on Reddit TL;DR summaries: the policy the TL;DR RL recipes start from.

    python -m rlaif_jax.sft --config experiments/sft_tldr.py:fsdp=8 --workdir runs/sft_tldr
    python -m rlaif_jax.sft --config experiments/sft_tldr.py:runlocal --workdir /tmp/sft   # a smoke run
    python -m rlaif_jax.train --config experiments/rlaif_tldr.py:policy=runs/sft_tldr/final_policy --workdir ...

Arguments (comma-separated): policy=HF id or folder of the base model, fsdp=N (mesh), steps=N (default: one
epoch of the filtered training posts), runlocal (a few steps of a small batch, the same setup otherwise).

Data: the filtered TL;DR of Stiennon et al. 2020 as published by Huang et al. 2024 (`recipes.TLDR_DATASET`), read by
its schema: the prompt in OpenAI's "SUBREDDIT / TITLE / POST / TL;DR:" format (`recipes.set_tldr_data`, exactly as
the RL recipes render it), the completion its human-written summary (" " + summary, then EOS). The loss is the
token mean of the completions' cross-entropy (rlaif_jax/sft.py). No held-out split is read: SFT has no held-out
evaluation yet.

The settings are ours, not a paper's: AdamW at 1e-5 with 5% warm-up and cosine decay, batches of 64 posts, bf16
compute with f32 master weights, 512 prompt tokens and 64 completion tokens (the reproduction's summaries are at
most 53 tokens of Pythia's tokenizer). The default model is a base (not instruction-tuned) Llama of a family the
codebase reads; any llama / mistral / qwen2 / qwen3 / gemma checkpoint works.
"""
from rlaif_jax import sft
from rlaif_jax.recipes import TLDR_TRAIN_PROMPTS, parse_arg, set_tldr_data


def get_config(arg: str = ""):
    a = parse_arg(arg, policy="meta-llama/Llama-3.2-1B", fsdp=1, steps=0, runlocal=False)
    c = sft.base_config()
    c.policy.path = a.policy
    c.policy.dtype = "bfloat16"
    c.policy.param_dtype = "float32"

    set_tldr_data(c.data)
    c.data.eval_split, c.data.eval_max_prompts = "", 0  # no held-out evaluation in SFT
    c.data.reference_field = "reference"  # the schema's column: the summary
    c.data.max_reference_len = 64

    c.train.batch_size = 64
    c.train.steps = a.steps or TLDR_TRAIN_PROMPTS // c.train.batch_size  # one epoch
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = c.train.steps // 20
    c.optim.weight_decay = 0.0
    c.mesh.fsdp = a.fsdp
    c.checkpoint.every_steps = 200
    c.logging.wandb_project = "rlaif_tldr_sft"

    if a.runlocal:
        c.train.batch_size = 8
        c.train.steps = 2
        c.optim.warmup_steps = 0
        c.data.max_prompt_len = 128
        c.checkpoint.every_steps = 1000
        c.logging.progress_bar = False
    c.lock()
    return c
