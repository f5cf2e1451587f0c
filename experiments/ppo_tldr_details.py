"""PPO on TL;DR with the implementation details of the summarize-from-feedback reproductions.

    python -m rlaif_jax.train --config experiments/ppo_tldr_details.py:policy=SFT_DIR,rm=RM_DIR,fsdp=8 --workdir DIR

Arguments (comma-separated): policy=SFT checkpoint, rm=reward-model folder, fsdp=N (mesh), steps=N, runlocal.

Follows Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization"
(arXiv:2403.17031; code github.com/vwxyzjn/summarize_from_feedback_details, `ppo.py`, `ppo_left_padding.py`), itself a
reproduction of Stiennon et al. 2020. The details carried over, with their values in that code:
  EOS trick            the reward model scores the response truncated after its first EOS, with that EOS as the
                       last token of its row, and the reward is read there (`judge.include_stop_token = True`;
                       the reward model must be trained with it, `--rm.include_stop_token=True` below, which
                       ends every training response with the EOS too)
  missing-EOS penalty  a response without EOS within the 53-token budget gets the score -1 instead of the RM's
                       (`reward.missing_stop_mode = "replace"`, `reward.missing_stop_penalty = -1`)
  temperature 0.7      for sampling and for the log-probabilities of the update
  critic from the RM   a separate value model initialised from the reward model (`critic.init = "reward_model"`)
  KL in the reward     per-token k1 penalty, fixed beta = 0.05
  reward whitening     the per-token rewards (score on the EOS token + KL penalty on every token) are whitened
                       over all response tokens of the batch, scale only (`reward.whiten_token_rewards = True`,
                       `token_whiten_shift_mean = False`; the reproduction's `whiten_rewards`, ppo.py). One
                       difference: its mask runs one token past the EOS and puts the score there; ours ends at
                       the EOS, which carries the score and its own KL (`rewards.py`, step 8)
  PPO                  GAE gamma 1, lambda 0.95, 4 epochs of 1 minibatch per batch of 512 prompts, ratio clip 0.2,
                       value clip 0.2, vf_coef 0.1, advantages whitened; Adam lr 3e-6, eps 1e-5, linear decay to 0;
                       1M episodes = 1953 updates
Prompts: OpenAI's "SUBREDDIT / TITLE / POST / TL;DR:" format over the reproduction's own dataset
(`recipes.TLDR_DATASET`, filtered TL;DR), max 512 prompt tokens.

Models. The paper trains Pythia 1B / 2.8B / 6.9B (GPT-NeoX, not a family this codebase loads). Name your own of
a supported family (llama, mistral, qwen2, qwen3, gemma):
  policy  an SFT summariser of TL;DR in that prompt format, e.g. trained with TRL's `trl sft` on "trl-lib/tldr"
          (prompt / completion columns in the same format);
  rm      a reward model on OpenAI's human comparisons (RLHF, as in the paper), or AI-labelled ones (RLAIF):
          python scripts/export_dataset.py --dataset vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144 \\
              --kind preferences --out comparisons.jsonl
          python scripts/export_dataset.py --dataset vwxyzjn/summarize_from_feedback_tldr_3_filtered \\
              --kind sft --out references.jsonl
          python scripts/train_reward_model.py --model SFT_DIR --data comparisons.jsonl --out RM_DIR \\
              --rm.max_len=640 --rm.include_stop_token=True --normalize_to=references.jsonl
          (comparisons.jsonl: one {"prompt", "response_a", "response_b", "p_a_better"} per comparison, p_a_better 1
          for the human's choice; `--normalize_to` shifts the RM so the dataset's reference summaries score 0 on
          average, as the reproduction's reward.py does). The RM folder is both the reward
          (`judge.mode = "reward_model"`) and the critic's init.

Target (paper, Section 7.1, PPO scaling figure): GPT-3.5's preference of the PPO policy's summaries over the
dataset's reference summaries rises with model size; the 2.8B and 6.9B PPO models outperform OpenAI's released
1.3B PPO checkpoint, the 6.9B well above 50% (read the per-size values from that figure). The run reports the
RM score (`judge_score`, `eval/judge_score`), KL and response length; the EOS rate shows as the share of responses
not hit by the missing-EOS penalty. Matching the paper's preference rate needs a pairwise judge against the
"summary" column of the validation split (e.g. scripts/judge_eval.py on exported samples).
"""
from rlaif_jax import config as config_lib
from rlaif_jax.recipes import apply_runlocal, parse_arg, set_tldr_data


EPISODES = 1_000_000  # total sampled responses of the reproduction


def get_config(arg: str = ""):
    a = parse_arg(arg, policy="Qwen/Qwen2.5-1.5B", rm="checkpoints/tldr_rm", fsdp=1, steps=0, runlocal=False)
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

    # ---- data
    set_tldr_data(c.data)

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
