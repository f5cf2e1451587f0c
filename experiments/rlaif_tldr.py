"""RLAIF on Reddit TL;DR summarisation, after Lee et al. 2023, "RLAIF vs. RLHF" (arXiv:2309.00267).

    python -m rlaif_jax.train --config experiments/rlaif_tldr.py:variant=direct,fsdp=8 --workdir DIR
    python -m rlaif_jax.train --config experiments/rlaif_tldr.py:variant=canonical,rm=RM_DIR --workdir DIR

Arguments (comma-separated): variant=direct|canonical, policy=HF id or folder, judge=HF id or folder (direct),
rm=reward-model folder (canonical), evaluator=HF id or folder (the independent evaluator), fsdp=N (mesh),
steps=N (default: the paper's 8 epochs), runlocal (a 2-step smoke run of the same setup).

Variants
  direct     d-RLAIF (the paper's Section on direct RLAIF): during RL the off-the-shelf judge LLM is asked for a
             1-10 score of each sampled summary; the reward is the expected score under the judge's probabilities of
             the ten score tokens, rescaled to [-1, 1] (`judging.scoring.pointwise_scores`). No reward model.
  canonical  the judge's pairwise preferences are distilled into a reward model first, and RL optimises that reward
             model (`judge.mode = "reward_model"`). Pipeline:
               1. pairs of summaries per post as JSONL {"prompt", "response_a", "response_b"} (the paper relabels
                  the pairs of OpenAI's TL;DR comparison set; or sample two summaries per post from the SFT policy);
               2. python -m rlaif_jax.reward_model_stage --config experiments/rm_stage.py:rl=rlaif_tldr,\\
                      policy=SFT_DIR,data=pairs.jsonl,label_judge=JUDGE --workdir RM_RUN
                  (labels the pairs with AI preferences, trains on this config's judge rows);
               3. this config with rm=RM_RUN/reward_model.
Both variants use the paper's RL settings (`recipes.set_lee2023`, table at the end): REINFORCE with a learned
baseline, the objective (1 - beta) r - beta KL with beta = 0.05, sampling temperature 0.9, Adafactor at 1e-5 on
batches of 128 prompts for 8 epochs, 1024 prompt and 128 response tokens, and the paper's checkpoint selection:
the 4 policies of highest validation reward are kept (workdir/best_policies), and the final one is the candidate
an evaluator that is not the reward prefers most against the SFT policy (the paper adds manual inspection).
Canonical RLAIF's reward model, as the paper trains it (same appendix): initialised from the SFT policy, Adafactor
at learning rate 1e-5, batch 128, until the loss plateaus (2-3 epochs: steps=), 1152 input tokens (ours: this
config's judge.max_len of 1536, the rows the RL run reads); experiments/rm_stage.py:rl=rlaif_tldr holds these.

Models. The paper's policy is a PaLM 2 XS fine-tuned (SFT) on TL;DR and its labeler PaLM 2 L. Here the user names
open models of a supported family (llama, mistral, qwen2, qwen3, gemma); for a faithful run the policy should be
an SFT summariser of TL;DR in OpenAI's prompt format. The default pair is Llama 3 because its tokenizer writes
"1".."10" as single tokens, which the 1-10 pointwise scale needs (Qwen, Gemma and Mistral split "10" into two
digits: with those judges set --config.judge.num_scores=9 and the template's scale follows). Policy and judge share
a tokenizer, so the judge reads the policy's tokens directly (the token-space path, one compiled step).

Data: the filtered TL;DR of Stiennon et al. 2020, as published by Huang et al. 2024 (`recipes.TLDR_DATASET`,
columns subreddit / title / post / summary), prompts in OpenAI's "SUBREDDIT / TITLE / POST / TL;DR:" format; the
paper trains on this filtered set. Held-out: its validation split.

Target (paper, Table 1 / Figure 1; human evaluators, win rate against the SFT policy):
  canonical RLAIF vs SFT 71%, RLHF vs SFT 73%, RLAIF vs RLHF head-to-head 50%;
  d-RLAIF vs SFT about 74% (above canonical RLAIF; see the d-RLAIF results table of arXiv v3 for the exact value).
What this run reports instead: `eval/evaluator_win_rate` (with its bootstrap interval and the length-controlled
`eval/evaluator_lc_win_rate`) is an evaluator LLM's pairwise preference of the trained policy's summaries over the
initial (SFT) policy's, both presentation orders averaged; the evaluator (evaluator=, default Qwen2.5-72B-Instruct)
is not the reward, so it is an AI proxy of the paper's human raters: expect it well above 0.5 when training works,
not equal to 0.71-0.74. `eval/win_rate` (variant=direct) is the reward judge's own opinion of the same comparison,
which a policy optimised against that judge inflates.
"""
from rlaif_jax import config as config_lib
from rlaif_jax.recipes import (LEE2023_ROWS, LEE2023_SEEDS, NOT_GIVEN, TLDR_DATASET, TLDR_PAIRWISE_TEMPLATE,
                               TLDR_TRAIN_PROMPTS, PaperValue,
                               apply_runlocal, lee2023_steps_row, paper_table, parse_arg, set_lee2023, set_tldr_data)


# The d-RLAIF scoring prompt, adapted from the paper's appendix; {num_scores} becomes the top of the scale.
DIRECT_TEMPLATE = (
    "You are an expert summary rater. Given a TEXT (a Reddit post with its SUBREDDIT and TITLE) and a SUMMARY, "
    "rate the quality of the SUMMARY given the TEXT with a SCORE from 1 to {num_scores}, where 1 is an awful "
    "summary and {num_scores} a perfect one. A good summary is short, accurate, covers the most important points "
    "of the TEXT and adds nothing that is not in it.\n\n"
    "TEXT:\n{prompt}\n\nSUMMARY:\n{response}\n\nReply with the SCORE only."
)
PAPER_SEEDS = LEE2023_SEEDS
PAPER = LEE2023_ROWS + [
    lee2023_steps_row(TLDR_TRAIN_PROMPTS, "filtered TL;DR"),
    PaperValue("policy model", "PaLM 2 XS fine-tuned on TL;DR", "Lee et al. 2023, Sec. 3 and training appendix",
               "PaLM 2 is not released: an open SFT summariser you name", ours="policy="),
    PaperValue("judge.path", "PaLM 2 L", "Lee et al. 2023, Sec. 3 (the AI labeler)",
               "PaLM 2 is not released: an open instruct LLM", ours="meta-llama/Llama-3.1-8B-Instruct"),
    PaperValue("judge.mode", "pointwise", "Lee et al. 2023, d-RLAIF: a 1-10 score from the judge"),
    PaperValue("judge.num_scores", 10, "Lee et al. 2023, d-RLAIF (scores 1 to 10)"),
    PaperValue("data.path", TLDR_DATASET, "Stiennon et al. 2020's filtered TL;DR, which Lee et al. 2023 use "
               "(here as Huang et al. 2024 publish it)"),
    PaperValue("evaluation", "human raters' win rate against the SFT policy", "Lee et al. 2023, Sec. 3.3 and Table 1",
               "raters are not available: an evaluator LLM that is not the reward (eval.evaluator)",
               ours="an evaluator LLM's win rate against the initial (SFT) policy, both orders"),
    PaperValue("eval.evaluator.baseline", "initial_policy", "Lee et al. 2023, Table 1 (win rate vs SFT)"),
    PaperValue("eval.evaluator.temperature", NOT_GIVEN, "Lee et al. 2023", "not stated where we read: greedy",
               ours=0.0),
]


def get_config(arg: str = ""):
    a = parse_arg(arg, variant="direct", policy="meta-llama/Llama-3.2-1B-Instruct",
                  judge="meta-llama/Llama-3.1-8B-Instruct", rm="checkpoints/tldr_rlaif_rm",
                  evaluator="Qwen/Qwen2.5-72B-Instruct", fsdp=1, steps=0, runlocal=False)
    if a.variant not in ("direct", "canonical"):
        raise ValueError(f"variant={a.variant!r}; use variant=direct (d-RLAIF) or variant=canonical (distilled RM)")
    c = config_lib.base_config()

    # ---- models: a trained policy (its initial copy is the frozen reference), bf16 compute, f32 master weights
    c.policy.path = a.policy
    c.policy.dtype = "bfloat16"
    c.policy.param_dtype = "float32"

    # ---- the judge
    c.judge.dtype = c.judge.param_dtype = "bfloat16"  # frozen: no f32 master copy needed
    c.judge.chat_template = True  # instruct judges answer inside their chat format; the score is the first token
    c.judge.max_len = 1536  # template + 1024-token prompt + 128-token response (+ a second one for a pairwise eval)
    if a.variant == "direct":
        c.judge.path = a.judge
        c.judge.mode = "pointwise"
        c.judge.num_scores = 10
        c.judge.template = DIRECT_TEMPLATE
    else:
        c.judge.path = a.rm  # written by rlaif_jax.reward_model_stage; its template is read back and checked
        c.judge.mode = "reward_model"
        c.judge.chat_template = False
    if a.variant == "direct":
        c.eval.pairwise_template = TLDR_PAIRWISE_TEMPLATE
    else:  # the judge is the reward model, which cannot compare two summaries: no win rate (validation refuses one)
        c.eval.win_rate = False

    # ---- evaluation by a model that is not the reward (the paper's human raters): its pairwise preference of the
    # policy's summaries over the SFT policy's, both orders, greedy decoding; it also ranks the kept candidates
    # (python -m rlaif_jax.independent_eval --policy=WORKDIR --select_best ...)
    c.eval.evaluator.path = a.evaluator
    c.eval.evaluator.dtype = c.eval.evaluator.param_dtype = "bfloat16"
    c.eval.evaluator.template = TLDR_PAIRWISE_TEMPLATE
    c.eval.evaluator.chat_template = True
    c.eval.evaluator.max_len = 1536
    c.eval.evaluator.baseline = "initial_policy"
    c.eval.evaluator.temperature = 0.0
    c.eval.evaluator.max_new_tokens = 128

    # ---- data
    set_tldr_data(c.data)

    # ---- sampling, reward (the judge's score in [-1, 1]), REINFORCE with a learned baseline, optimisation, loop
    set_lee2023(c, train_prompts=TLDR_TRAIN_PROMPTS, steps=a.steps, fsdp=a.fsdp, wandb_project="rlaif_tldr")

    if a.runlocal:
        apply_runlocal(c)
    c.lock()
    return c


__doc__ += paper_table(get_config(), PAPER, "Settings against Lee et al. 2023 (variant=direct; recipes.PaperValue, "
                       "pinned by tests/test_experiments.py):")
