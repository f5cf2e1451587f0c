"""The reward model of an RL experiment that reads one (`judge.mode = "reward_model"`), trained by the reward-model
stage before it (rlaif_jax/reward_model_stage.py):

    python -m rlaif_jax.reward_model_stage --config experiments/rm_stage.py:rl=ppo_tldr_details,policy=SFT_DIR,\\
        data=comparisons.jsonl,eval=validation.jsonl,references=references.jsonl --workdir runs/rm_tldr
    python -m rlaif_jax.train --config experiments/ppo_tldr_details.py:policy=SFT_DIR,rm=runs/rm_tldr/reward_model ...

Arguments (comma-separated): rl=the RL experiment that will read the reward model (ppo_tldr_details, rlaif_tldr,
rlaif_harmless), policy=the SFT policy it starts from (HF folder or hub id), data= / eval= the training and
held-out preference JSONL (`reward_model.read_preferences`; eval= may be empty), references= the reference
responses to score 0 on average (empty: no normalisation), label_judge=a pairwise judge that labels the pairs
without p_a_better (empty: every pair must carry one), fsdp=N (mesh), steps=N (default: `STEPS`),
runlocal (two steps of a small batch, the same setup otherwise).

The rows are the RL experiment's: `config.judge`'s row settings (template, max_len, truncation,
include_stop_token, chat settings; `reward_model_stage.ROW_SETTINGS`) are copied from that experiment's
reward_model judge section (with runlocal, from its runlocal variant), so the folder this run exports is the one
its RL run accepts (the RL judge refuses a reward model trained on other rows).

Training settings, per RL experiment:
  ppo_tldr_details  as the summarize-from-feedback reproduction's reward.py trains its reward model (Huang et al.
                    2024): one epoch of OpenAI's human comparisons (`scripts/export_dataset.py --kind preferences`),
                    the reward read at the EOS token (the RL config's include_stop_token=True), then normalised so
                    the dataset's reference summaries score 0 on average (references=, `--kind sft`). The
                    optimiser values are ours (AdamW at 1e-5, batch 64, cosine decay), not the reproduction's.
  rlaif_tldr,       as Lee et al. 2023 train theirs (appendix 'Model training details'): initialised from the SFT
  rlaif_harmless    (or instruction-tuned) policy, Adafactor at 1e-5, batches of 128 (TL;DR) / 32 (harmless),
                    until the loss plateaus (2-3 epochs: set steps=); AI labels (label_judge=, the labelling
                    template of the RL experiment where it has one). Their 1152 input tokens are not ours: the rows
                    are as long as the RL judge's (its max_len), since the reward model must read the RL run's rows.
"""
import importlib.util
import os

from rlaif_jax import reward_model_stage
from rlaif_jax.recipes import parse_arg

# RL experiment -> (optimizer, learning rate, batch size, default steps). The steps are ours: ppo_tldr_details' 1450
# is one epoch of 92,858 comparisons (OpenAI's training comparisons) at batch 64; the others are placeholders for
# "until the loss plateaus": set steps= to 2-3 epochs of your pairs.
STEPS = {"ppo_tldr_details": ("adamw", 1e-5, 64, 1450), "rlaif_tldr": ("adafactor", 1e-5, 128, 1000),
         "rlaif_harmless": ("adafactor", 1e-5, 32, 3000)}


def _rl_config(name: str, runlocal: bool):
    """The RL experiment's config (loaded by path, as the --config flag loads it), reading a reward model."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arg = "rm=unused" + (",variant=canonical" if name == "rlaif_tldr" else "") + (",runlocal" if runlocal else "")
    return module, module.get_config(arg)


def get_config(arg: str = ""):
    a = parse_arg(arg, rl="ppo_tldr_details", policy="runs/sft_tldr/final_policy", data="pairs.jsonl", eval="",
                  references="", label_judge="", fsdp=1, steps=0, runlocal=False)
    if a.rl not in STEPS:
        raise ValueError(f"rl={a.rl!r}; use one of {sorted(STEPS)}")
    module, rl = _rl_config(a.rl, a.runlocal)
    optimizer, learning_rate, batch_size, steps = STEPS[a.rl]
    c = reward_model_stage.base_config()
    c.policy.path = a.policy
    c.policy.dtype = "bfloat16"
    c.policy.param_dtype = "float32"
    reward_model_stage.copy_row_settings(c.judge, rl.judge)

    c.data.path, c.data.eval_path, c.data.normalize_to = a.data, a.eval, a.references
    if a.label_judge:
        c.label_judge.path = a.label_judge
        c.label_judge.dtype = c.label_judge.param_dtype = "bfloat16"
        c.label_judge.chat_template = True
        c.label_judge.max_len = rl.judge.max_len * 2  # the labeller's question holds two responses, not one
        c.label_judge.template = getattr(module, "LABEL_TEMPLATE", "") or getattr(module, "TLDR_PAIRWISE_TEMPLATE",
                                                                                    "")

    c.optim.name = optimizer
    c.optim.learning_rate = learning_rate
    if optimizer == "adamw":
        c.optim.schedule = "cosine"
    c.train.batch_size = batch_size
    c.train.steps = a.steps or steps
    c.mesh.fsdp = a.fsdp
    c.eval.every = 100
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 200
    c.logging.wandb_project = "rlaif_reward_models"

    if a.runlocal:
        c.train.batch_size = 8
        c.train.steps = 2
        c.eval.batch_size = 8
        c.checkpoint.every_steps = 1000
        c.logging.progress_bar = False
    c.lock()
    return c
