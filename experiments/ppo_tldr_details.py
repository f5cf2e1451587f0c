"""PPO on TL;DR with the implementation details of the summarize-from-feedback reproductions.

    python -m rlaif_jax.train --config experiments/ppo_tldr_details.py:policy=SFT_DIR,rm=RM_DIR,fsdp=8 --workdir DIR

Arguments (comma-separated): policy=SFT checkpoint, rm=reward-model folder, evaluator=HF id or folder (the
independent evaluator), fsdp=N (mesh), steps=N, runlocal.

Follows Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization"
(arXiv:2403.17031), a reproduction of Stiennon et al. 2020, value by value from its code
(github.com/vwxyzjn/summarize_from_feedback_details: `ppo_left_padding.py` at commit bed5a4d, and
`sbatches/ppo_left_padding.sbatch` for the batch, learning rate and seeds). The table at the end lists every
setting it gives, ours beside it; `tests/test_experiments.py` holds the config to it. Its details, in words:
  EOS trick            responses are cut after their first EOS, which ends the reward model's row, and the reward
                       is read there (`judge.include_stop_token = True`; train the reward model with it,
                       `--rm.include_stop_token=True` below, so its training responses end with the EOS too); a
                       response without EOS within the 53 tokens gets the score -1 instead
  KL in the reward     per-token k1 (log pi - log pi_ref) times a fixed 0.05, the score added at the EOS token
  reward whitening     the per-token rewards (score + KL) whitened over all response tokens of the batch without
                       shifting their mean (`reward.whiten_token_rewards`); `ppo_left_padding.py` whitens all 53
                       sampled tokens, `ppo.py`'s mask ends one token past the EOS and puts the score there, ours
                       ends at the EOS, which carries the score and its own KL
  PPO                  GAE gamma 1, lambda 0.95, 4 epochs of 1 minibatch per batch of 512 prompts, ratio and value
                       clip 0.2, vf_coef 0.1, advantages whitened; AdamW lr 3e-6, eps 1e-5, torch's default weight
                       decay 0.01, linear decay to 0, no gradient clipping in the script; 1M episodes = 1953 updates
  critic               a separate value model initialised from the reward model
  temperature          0.7 for sampling and for the log-probabilities of the update; 0.01 when evaluating
Prompts: OpenAI's "SUBREDDIT / TITLE / POST / TL;DR:" format over the reproduction's own dataset
(`recipes.TLDR_DATASET`, filtered TL;DR), max 512 prompt tokens.

Models. The reproduction trains Pythia 1B / 2.8B / 6.9B (deduped; GPT-NeoX): its SFT policy (`sft.py`) and reward
model (`reward.py`) per seed. GPT-NeoX folders load directly (`rlaif_jax.models.hf`), as do the other families:
  policy  an SFT summariser of TL;DR in that prompt format (`policy=`; e.g. the reproduction's SFT checkpoint, or
          TRL's `trl sft` on "trl-lib/tldr");
  rm      a reward model on OpenAI's human comparisons (RLHF, as in the paper), or AI-labelled ones (RLAIF):
          python scripts/export_dataset.py --dataset vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144 \\
              --kind preferences --out comparisons.jsonl
          python scripts/export_dataset.py --dataset vwxyzjn/summarize_from_feedback_tldr_3_filtered \\
              --kind sft --out references.jsonl
          python -m rlaif_jax.reward_model_stage --config experiments/rm_stage.py:rl=ppo_tldr_details,\\
              policy=SFT_DIR,data=comparisons.jsonl,references=references.jsonl --workdir RM_RUN
          (comparisons.jsonl: one {"prompt", "response_a", "response_b", "p_a_better"} per comparison, p_a_better 1
          for the human's choice; the rows are this config's judge rows, max_len 640 with the EOS included;
          references= shifts the RM so the dataset's reference summaries score 0 on average, as the reproduction's
          reward.py does). The RM folder, RM_DIR = RM_RUN/reward_model, is both the reward
          (`judge.mode = "reward_model"`) and the critic's init. The reproduction's own reward models (its
          `ScalarModel` folders) load as they are: pass one as rm= with --config.judge.template='{prompt}{response}'
          (they read the query and the response concatenated).

Evaluation (the reproduction's protocol): every `eval.every` steps the policy samples at temperature 0.01 on the
validation split and the reward model scores its summaries and the dataset's reference summaries
(`eval/judge_score`); the paper's headline is GPT-3.5's preference of the policy's summaries over the reference
summaries. Seeds: the reproduction runs 4 (`PAPER_SEEDS`; `scripts/sweep.py --paper_seeds` runs them).

Target (paper, Section 7.1, PPO scaling figure): the preference over the reference summaries rises with model
size; the 2.8B and 6.9B PPO models outperform OpenAI's released 1.3B PPO checkpoint, the 6.9B well above 50% (read
the per-size values from that figure).
"""
from rlaif_jax import config as config_lib
from rlaif_jax.recipes import (TLDR_PAIRWISE_TEMPLATE, PaperValue, apply_runlocal, paper_table,
                               parse_arg, set_tldr_data)


EPISODES = 1_000_000  # total sampled responses of the reproduction (`total_episodes`)
PAPER_SEEDS = (44413, 55513, 66613, 77713)  # sbatches/ppo_left_padding.sbatch, SEEDS
_CODE = "ppo_left_padding.py"
_SBATCH = "sbatches/ppo_left_padding.sbatch"
PAPER = [
    PaperValue("policy model", "Pythia 1B/2.8B/6.9B-deduped SFT", f"{_SBATCH}, MODELS",
               "a checkpoint you name; the reproduction's Pythia SFT folders load directly (GPT-NeoX)",
               ours="the SFT checkpoint given as policy="),
    PaperValue("data.path", "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
               f"{_CODE}, Args.query_dataset"),
    PaperValue("data.max_prompt_len", 512, "README (OpenAI's preprocessing: 512-token queries)"),
    PaperValue("data.eval_split", "validation", f"{_CODE}, eval_dataloaders (validation first)"),
    PaperValue("rollout.max_new_tokens", 53, f"{_CODE}, Args.response_length"),
    PaperValue("rollout.temperature", 0.7, f"{_CODE}, Args.temperature"),
    PaperValue("tokens after the first EOS", "sampled (min_new_tokens=53); their KL enters the reward",
               f"{_CODE}, generation_config and `kl = logprobs - ref_logprobs`",
               "a row stops at its EOS: nothing after it is sampled, scored or penalised",
               ours="not sampled"),
    PaperValue("judge.include_stop_token", True, f"{_CODE}, get_reward reads the last non-pad token: the kept EOS"),
    PaperValue("reward.whiten_token_rewards", True, f"{_CODE}, PpoHParams.whiten_rewards"),
    PaperValue("reward.token_whiten_shift_mean", False, f"{_CODE}, `whiten(rewards, shift_mean=False)`"),
    PaperValue("reward.score_norm", "none", f"{_CODE} (the score is whitened only with the per-token rewards)"),
    PaperValue("reward model bias", "mean reward of the references subtracted", "reward.py (config.bias)",
               ours="config.data.normalize_to of the reward-model stage (experiments/rm_stage.py references=)",
               deviation="a setting of the reward-model stage (the RL config reads the reward model as saved)"),
    PaperValue("reward.missing_stop_mode", "replace", f"{_CODE}, `scores = torch.where(contain_pad_token, ...)`"),
    PaperValue("reward.missing_stop_penalty", -1.0, f"{_CODE}, Args.penalty_reward_value"),
    PaperValue("reward.kl_coef", 0.05, f"{_CODE}, RewardHParams.kl_coef"),
    PaperValue("reward.adaptive_kl", False, f"{_CODE}, RewardHParams.use_adaptive_kl"),
    PaperValue("reward.kl_estimator", "k1", f"{_CODE}, `kl = logprobs - ref_logprobs`"),
    PaperValue("reward.kl_in_reward", True, f"{_CODE}, `non_score_reward = -kl_ctl.value * kl`"),
    PaperValue("algo.estimator", "gae", f"{_CODE}, section 6 (advantages and returns)"),
    PaperValue("algo.gamma", 1.0, f"{_CODE}, PpoHParams.gamma"),
    PaperValue("algo.lam", 0.95, f"{_CODE}, PpoHParams.lam"),
    PaperValue("algo.epochs", 4, f"{_CODE}, PpoHParams.noptepochs"),
    PaperValue("algo.minibatches", 1, f"{_CODE}, PpoHParams.nminibatches"),
    PaperValue("algo.clip_low", 0.2, f"{_CODE}, PpoHParams.cliprange"),
    PaperValue("algo.clip_high", 0.2, f"{_CODE}, PpoHParams.cliprange"),
    PaperValue("algo.vf_clip", 0.2, f"{_CODE}, PpoHParams.cliprange_value"),
    PaperValue("algo.vf_coef", 0.1, f"{_CODE}, PpoHParams.vf_coef"),
    PaperValue("algo.whiten_advantages", True, f"{_CODE}, `advantages = whiten(advantages)`"),
    PaperValue("algo.ent_coef", 0.0, f"{_CODE} (no entropy term in the loss)"),
    PaperValue("critic.kind", "separate", f"{_CODE}, PolicyAndValueWrapper(policy, critic)"),
    PaperValue("critic.init", "reward_model", f"{_CODE}, `critic = ScalarModel.from_pretrained(reward_model_path)`"),
    PaperValue("optim.name", "adamw", f"{_CODE}, Args.optimizer"),
    PaperValue("optim.learning_rate", 3e-6, f"{_SBATCH}, LR"),
    PaperValue("optim.eps", 1e-5, f"{_CODE}, Args.eps"),
    PaperValue("optim.b1", 0.9, "torch.optim.AdamW default (not overridden)"),
    PaperValue("optim.b2", 0.999, "torch.optim.AdamW default (not overridden)"),
    PaperValue("optim.weight_decay", 0.01, "torch.optim.AdamW default (not overridden)"),
    PaperValue("optim.schedule", "linear", f"{_CODE}, `lrnow = frac * args.lr`"),
    PaperValue("optim.warmup_steps", 0, f"{_CODE}, Args.warm_up_steps"),
    PaperValue("optim.max_grad_norm", 0.0, f"{_CODE} (no clipping call; its DeepSpeed config was not checked)"),
    PaperValue("train.batch_size", 512, f"{_SBATCH}: 8 GPUs x micro-batch x accumulation = 512"),
    PaperValue("train.steps", EPISODES // 512, f"{_CODE}, num_updates = total_episodes // batch_size"),
    PaperValue("eval.evaluator.temperature", 0.01, f"{_CODE}, validation_generation_config (0.01 + 1e-7)"),
    PaperValue("eval.evaluator.max_new_tokens", 53, f"{_CODE}, validation_generation_config"),
    PaperValue("eval.evaluator.baseline", "reference", f"{_CODE}, evaluate() (reference_response_token) and the "
               "paper's preference over the reference summaries"),
    PaperValue("reward-model score in evaluation", "of near-greedy (0.01) samples, beside the references' scores",
               f"{_CODE}, evaluate()", "eval/judge_score scores samples at the rollout's 0.7, where eval/kl is "
               "measured too; the near-greedy samples go to the evaluator", ours="of samples at temperature 0.7"),
    PaperValue("evaluator model", "GPT-3.5 (OpenAI API)", "Huang et al. 2024, Sec. 7.1 (eval/oai.py)",
               "an open LLM you name (evaluator=): the API is not a local model", ours="evaluator="),
    PaperValue("checkpoint.keep_best", 0, f"{_CODE}: the policy after the last update is saved and evaluated "
               "(no selection among checkpoints)"),
    PaperValue("train.export_final", True, f"{_CODE}, `policy.save_pretrained(output_dir)` after training"),
    PaperValue("seeds", list(PAPER_SEEDS), f"{_SBATCH}, SEEDS (4 per model size)"),
]


def get_config(arg: str = ""):
    a = parse_arg(arg, policy="checkpoints/tldr_sft", rm="checkpoints/tldr_rm", evaluator="Qwen/Qwen2.5-72B-Instruct",
                  fsdp=1, steps=0, runlocal=False)
    c = config_lib.base_config()

    # ---- models: SFT policy (its copy is the reference); reward model = judge in reward_model mode = critic init
    c.policy.path = a.policy
    c.policy.dtype = "bfloat16"
    c.policy.param_dtype = "float32"
    c.judge.path = a.rm
    c.judge.mode = "reward_model"
    c.judge.dtype = c.judge.param_dtype = "bfloat16"
    c.judge.max_len = 640  # 512-token query + 53-token response + the RM template
    c.judge.include_stop_token = True  # the EOS ends the RM's row: the reward is read at the EOS token
    c.critic.kind = "separate"
    c.critic.init = "reward_model"
    c.critic.path = a.rm
    c.eval.win_rate = False  # the reward model cannot compare two responses; eval/judge_score tracks its reward

    # ---- data (the summary column is the reference the evaluation compares with)
    set_tldr_data(c.data)
    c.data.reference_field = "reference"

    # ---- evaluation as the reproduction does it: near-greedy samples (temperature 0.01) of the validation prompts,
    # compared with the dataset's reference summaries by a model that is not the reward (its paper: GPT-3.5)
    c.eval.evaluator.path = a.evaluator
    c.eval.evaluator.dtype = c.eval.evaluator.param_dtype = "bfloat16"
    c.eval.evaluator.template = TLDR_PAIRWISE_TEMPLATE
    c.eval.evaluator.chat_template = True
    c.eval.evaluator.max_len = 1024
    c.eval.evaluator.baseline = "reference"
    c.eval.evaluator.temperature = 0.01
    c.eval.evaluator.max_new_tokens = 53

    # ---- sampling: temperature 0.7, 53 response tokens, stop at the policy's EOS
    c.rollout.temperature = 0.7
    c.rollout.max_new_tokens = 53

    # ---- reward: missing-EOS penalty, fixed KL 0.05 in the reward, per-token rewards whitened without mean shift
    c.reward.missing_stop_mode = "replace"
    c.reward.missing_stop_penalty = -1.0
    c.reward.kl_coef = 0.05
    c.reward.kl_estimator = "k1"
    c.reward.kl_in_reward = True
    c.reward.adaptive_kl = False
    c.reward.score_norm = "none"  # the score is whitened with the KL, per token, not on its own
    c.reward.whiten_token_rewards = True
    c.reward.token_whiten_shift_mean = False

    # ---- PPO with GAE
    c.algo.estimator = "gae"
    c.algo.gamma = 1.0
    c.algo.lam = 0.95
    c.algo.epochs = 4
    c.algo.minibatches = 1
    c.algo.clip_low = c.algo.clip_high = 0.2
    c.algo.vf_clip = 0.2
    c.algo.vf_coef = 0.1
    c.algo.whiten_advantages = True  # the reproduction whitens GAE's advantages (its `whiten(advantages)`)
    c.algo.ent_coef = 0.0

    # ---- optimisation: 512 prompts per update, 1M episodes
    c.train.batch_size = 512
    c.optim.grad_accum = 8  # memory only: 8 micro-batches of 64 make one update of 512
    c.optim.learning_rate = 3e-6
    c.optim.eps = 1e-5
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01  # torch.optim.AdamW's default, which the reproduction keeps
    c.optim.max_grad_norm = 0.0  # the reproduction's script does not clip
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 0
    c.train.steps = a.steps or EPISODES // c.train.batch_size
    c.mesh.fsdp = a.fsdp
    c.eval.every = 100
    c.eval.max_prompts = 512
    c.checkpoint.every_steps = 100
    c.logging.wandb_project = "ppo_tldr_details"

    if a.runlocal:
        apply_runlocal(c)
    c.lock()
    return c


__doc__ += paper_table(get_config(), PAPER, "Settings against the reproduction (recipes.PaperValue; pinned by "
                       "tests/test_experiments.py):")
