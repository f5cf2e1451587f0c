"""Advantage estimators and losses: GAE + PPO, GRPO, RLOO, REINFORCE with a learned baseline (phases 5-6), and
online DPO's pair choice and loss.

Shapes: per-token arrays are `(B, R)` over the response tokens only, `response_mask_br` is 1.0 up to and including
the stop token; per-sequence arrays are `(B,)`. Critic-free estimators see n samples per prompt laid out as
consecutive rows (B = num_prompts * n). All functions are pure, jittable and float32; `cfg` (the `algo` config
section) and `n_samples` are static Python values, closed over by the caller before jit.

The scan over epochs x minibatches lives in train_step.py; `epochs` and `minibatches` are only held here. The
losses reduce per-token terms with `ops.aggregate` (`cfg.loss_agg`); given the whole minibatch's counts
(`ops.LossNorm`), a loss of one micro-batch is its share of the minibatch's, so gradient accumulation sums them.

Online DPO (`estimator = "online_dpo"`) replaces phases 4-6's shaping, advantages and PPO loss: the pairwise judge's
preferences between the samples of a prompt pick a chosen and a rejected response (`win_rates`, `choose_pairs`),
and the DPO loss (`dpo_loss`) against the frozen reference updates the policy.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax.ops import LOSS_AGGS, LossNorm, aggregate, kl_estimate, masked_var, masked_whiten

# The PPO family's advantage estimators, and online DPO, which needs none (it replaces the PPO loss).
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce", "online_dpo")
# Settings of the advantages and the PPO losses, which online_dpo refuses to take away from their defaults.
PPO_FAMILY_SETTINGS = ("lam", "whiten_advantages", "whiten_shift_mean", "grpo_scale_std", "grpo_std_eps", "clip_low",
                       "clip_high", "vf_clip", "vf_coef", "ent_coef", "loss_agg")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `algo` config section."""
    c = ml_collections.ConfigDict()
    c.estimator = "gae"          # "gae" (PPO with critic) | "grpo" | "rloo" | "reinforce" (learned baseline) |
    #                              "online_dpo" (DPO on pairs the pairwise judge ranks; Guo et al. 2024)
    c.gamma = 1.0                # GAE's discount over response tokens (the sequence-level estimators need 1)
    c.lam = 0.95                 # GAE lambda
    # Whitening after estimation is an extra normalisation, part of no estimator: PPO recipes apply it to GAE's
    # advantages (over the valid tokens); for the sequence-level estimators it runs over the sequences.
    c.whiten_advantages = False
    c.whiten_shift_mean = True   # whitening subtracts the mean (False: rescale only, keep the mean)
    c.grpo_scale_std = True      # GRPO divides by the group std; False = Dr. GRPO (mean-centring only)
    c.grpo_std_eps = 1e-4        # GRPO: (r - mean) / (std + grpo_std_eps); 1e-4 as TRL's GRPOTrainer
    c.clip_low = 0.2             # PPO ratio clipped to [1 - clip_low, 1 + clip_high]
    c.clip_high = 0.2            #   (clip_high > clip_low: DAPO's "clip-higher")
    c.vf_clip = 0.2              # value clipped to old +- vf_clip; <= 0 turns clipping off
    c.vf_coef = 0.1              # weight of the value loss
    c.ent_coef = 0.0             # weight of the entropy bonus (loss -= ent_coef * entropy)
    c.loss_agg = "token_mean"    # one of ops.LOSS_AGGS: "token_mean" (DAPO) | "seq_mean_token_mean" (GRPO) |
    #                              "seq_mean_token_sum_norm" (Dr. GRPO); every loss term uses it
    c.epochs = 4                 # passes over each rollout batch (used by train_step)
    c.minibatches = 1            # minibatches per epoch (used by train_step); they hold whole groups of samples
    #                              (online_dpo: whole (chosen, rejected) pairs)
    c.dpo_beta = 0.1             # online_dpo: beta of the DPO loss, the strength of its pull to the reference
    #                              (TRL OnlineDPOConfig's default 0.1)
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError with what to change when the `algo` section is inconsistent."""
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"algo.estimator={cfg.estimator!r}; choose one of {ESTIMATORS}")
    if cfg.loss_agg not in LOSS_AGGS:
        raise ValueError(f"algo.loss_agg={cfg.loss_agg!r}; choose one of {LOSS_AGGS}")
    if not (0.0 <= cfg.clip_low < 1.0) or cfg.clip_high < 0.0:
        raise ValueError(f"algo.clip_low={cfg.clip_low} must be in [0, 1) and algo.clip_high={cfg.clip_high} >= 0")
    if not (0.0 <= cfg.gamma <= 1.0 and 0.0 <= cfg.lam <= 1.0):
        raise ValueError(f"algo.gamma={cfg.gamma} and algo.lam={cfg.lam} must lie in [0, 1]")
    if cfg.estimator != "gae" and cfg.gamma != 1.0:
        raise ValueError(f"algo.gamma={cfg.gamma} discounts only GAE; {cfg.estimator!r} does not discount: set "
                         "algo.gamma=1.0")
    if cfg.dpo_beta <= 0:
        raise ValueError(f"algo.dpo_beta={cfg.dpo_beta} must be > 0")
    defaults = default_config()
    if cfg.estimator != "online_dpo" and cfg.dpo_beta != defaults.dpo_beta:
        raise ValueError(f"algo.dpo_beta={cfg.dpo_beta} applies to online_dpo only, not {cfg.estimator!r}: leave it "
                         f"at its default {defaults.dpo_beta}")
    if cfg.estimator == "online_dpo":
        for name in PPO_FAMILY_SETTINGS:
            if cfg[name] != defaults[name]:
                raise ValueError(f"algo.{name}={cfg[name]!r} is a PPO-family setting that online_dpo does not use: "
                                 f"leave it at its default {defaults[name]!r}")
    if cfg.epochs < 1 or cfg.minibatches < 1:
        raise ValueError(f"algo.epochs={cfg.epochs} and algo.minibatches={cfg.minibatches} must be >= 1")


class Advantages(NamedTuple):
    advantages_br: jax.Array  # (B, R) float32, 0 at padding
    returns_br: jax.Array     # (B, R) float32, value targets (A + V for GAE, the reward-to-go otherwise)


# ---------------------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------------------

def gae(rewards_br: jax.Array, values_br: jax.Array, response_mask_br: jax.Array, gamma: float,
        lam: float) -> Advantages:
    """Generalised advantage estimation over the valid response tokens (Schulman et al. 2016):

      delta_t = r_t + gamma * V_{t+1} - V_t
      A_t     = delta_t + gamma * lam * A_{t+1}
      R_t     = A_t + V_t

    with V and A taken as 0 after the last valid token (the episode ends at the stop token). Computed with a
    reverse lax.scan over the response axis; outputs are 0 at padding.
    """
    valid_br = response_mask_br > 0
    rewards_br = jnp.where(valid_br, rewards_br.astype(jnp.float32), 0.0)
    values_br = jnp.where(valid_br, values_br.astype(jnp.float32), 0.0)
    next_values_br = jnp.concatenate([values_br[:, 1:], jnp.zeros_like(values_br[:, :1])], axis=1)
    deltas_br = rewards_br + gamma * next_values_br - values_br

    def step(adv_next_b, inputs):
        delta_b, valid_b = inputs
        # Zeroing at padding makes A_{t+1} = 0 for the last valid token, which ends the recursion there.
        adv_b = jnp.where(valid_b, delta_b + gamma * lam * adv_next_b, 0.0)
        return adv_b, adv_b

    _, adv_rb = jax.lax.scan(step, jnp.zeros_like(deltas_br[:, 0]), (deltas_br.T, valid_br.T), reverse=True)
    advantages_br = adv_rb.T
    return Advantages(advantages_br, jnp.where(valid_br, advantages_br + values_br, 0.0))


def reward_to_go(token_rewards_br: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """(B, R) undiscounted return from each token on, G_t = sum_{t' >= t} r_t' over valid tokens, 0 at padding.

    G_0 is the sequence return: the shaped score plus any per-token KL penalty. It is the Monte-Carlo value
    target of V(s_t) (gradient Monte Carlo, Sutton & Barto 2018, section 9.3).
    """
    valid_br = response_mask_br > 0
    rewards_br = jnp.where(valid_br, token_rewards_br.astype(jnp.float32), 0.0)
    to_go_br = jnp.flip(jnp.cumsum(jnp.flip(rewards_br, axis=-1), axis=-1), axis=-1)
    return jnp.where(valid_br, to_go_br, 0.0)


def _groups(scores_b: jax.Array, n_samples: int) -> jax.Array:
    if n_samples < 2:
        raise ValueError(f"critic-free group estimators need n_samples >= 2 per prompt, got {n_samples}")
    if scores_b.shape[0] % n_samples:
        raise ValueError(f"batch of {scores_b.shape[0]} rows is not a whole number of groups of {n_samples}")
    return scores_b.astype(jnp.float32).reshape(-1, n_samples)


def grpo_advantages(scores_b: jax.Array, n_samples: int, scale_std: bool = True, eps: float = 1e-4) -> jax.Array:
    """GRPO (Shao et al. 2024), per sequence: A_i = (r_i - mean_g r) / (std_g r + eps) over the group of the
    i-th prompt, std with Bessel's correction (ddof=1) and eps = 1e-4 as TRL's GRPOTrainer
    (trl/trainer/grpo_trainer.py, `_generate_and_score_completions`: `advantages / (std_rewards + 1e-4)`,
    std_rewards = trl.trainer.utils.nanstd, which applies count / (count - 1)).
    scale_std=False gives Dr. GRPO (Liu et al. 2025; TRL scale_rewards="none"): A_i = r_i - mean_g r."""
    groups_pn = _groups(scores_b, n_samples)
    adv_pn = groups_pn - jnp.mean(groups_pn, axis=1, keepdims=True)
    if scale_std:
        adv_pn = adv_pn / (jnp.std(groups_pn, axis=1, ddof=1, keepdims=True) + eps)
    return adv_pn.reshape(-1)


def rloo_advantages(scores_b: jax.Array, n_samples: int) -> jax.Array:
    """RLOO (Ahmadian et al. 2024), per sequence: A_i = r_i - (1/(n-1)) sum_{j != i} r_j within the group; the
    leave-one-out baseline alone, as TRL's RLOOTrainer with its default normalize_advantages=False
    (trl/trainer/rloo_trainer.py: `baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)`)."""
    groups_pn = _groups(scores_b, n_samples)
    others_mean_pn = (jnp.sum(groups_pn, axis=1, keepdims=True) - groups_pn) / (n_samples - 1)
    return (groups_pn - others_mean_pn).reshape(-1)


def reinforce_advantages(returns_b: jax.Array, values_br: jax.Array) -> jax.Array:
    """REINFORCE with a learned baseline (Williams 1992), per sequence: A = G_0 - b, b = V(s_0) = values_br[:, 0].

    G_0 is the sequence return. The baseline is the value head's output at the first response token, i.e. its
    prediction from the prompt alone: one baseline per sequence that does not depend on the sampled tokens, so
    the estimator stays unbiased. The baseline is a constant for the policy gradient (stop_gradient). The value
    head is trained at every valid token towards the reward-to-go G_t (`compute_advantages` returns it as
    `returns_br`; use `value_loss`), the Monte-Carlo target of V(s_t), whose value at t = 0 is the baseline.
    """
    return returns_b.astype(jnp.float32) - jax.lax.stop_gradient(values_br[:, 0].astype(jnp.float32))


def broadcast_to_tokens(x_b: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """(B,) -> (B, R): the per-sequence value on every valid token, 0 at padding."""
    return jnp.where(response_mask_br > 0, x_b[:, None].astype(jnp.float32), 0.0)


def compute_advantages(cfg: ml_collections.ConfigDict, token_rewards_br: jax.Array, values_br: jax.Array | None,
                       response_mask_br: jax.Array, n_samples: int) -> Advantages:
    """Advantages and value targets with the estimator `cfg.estimator`, then whitening if cfg.whiten_advantages.

    gae        per token, from token_rewards_br and the critic's values_br; returns A + V; whitening runs over
               the valid tokens of the batch (the PPO recipes, e.g. the N+ implementation details reproduction)
    grpo/rloo  per sequence, from the sequence returns G_0 of n_samples consecutive rows per prompt
    reinforce  per sequence, G_0 minus the baseline V(s_0) read from values_br
    The sequence-level advantages are the same on every valid token of their row, their value targets the
    reward-to-go G_t; whitening, when asked for, runs over the sequences (each counts once, whatever its length).
    """
    if cfg.estimator == "gae":
        out = gae(token_rewards_br, values_br, response_mask_br, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            out = out._replace(advantages_br=masked_whiten(out.advantages_br, response_mask_br, cfg.whiten_shift_mean))
        return out
    returns_br = reward_to_go(token_rewards_br, response_mask_br)
    returns_b = returns_br[:, 0]
    if cfg.estimator == "grpo":
        adv_b = grpo_advantages(returns_b, n_samples, cfg.grpo_scale_std, cfg.grpo_std_eps)
    elif cfg.estimator == "rloo":
        adv_b = rloo_advantages(returns_b, n_samples)
    elif cfg.estimator == "reinforce":
        adv_b = reinforce_advantages(returns_b, values_br)
    else:
        raise ValueError(f"algo.estimator={cfg.estimator!r}; choose one of {ESTIMATORS}")
    if cfg.whiten_advantages:
        has_tokens_b = jnp.sum(response_mask_br, axis=-1) > 0
        adv_b = masked_whiten(adv_b, has_tokens_b, cfg.whiten_shift_mean)
    return Advantages(broadcast_to_tokens(adv_b, response_mask_br), returns_br)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def ppo_policy_loss(logp_new_br: jax.Array, logp_old_br: jax.Array, advantages_br: jax.Array,
                    response_mask_br: jax.Array, cfg: ml_collections.ConfigDict, norm: LossNorm | None = None,
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with separate clip ranges (Schulman et al. 2017; DAPO's clip-higher, Yu et al. 2025):

      rho_t  = exp(logp_new - logp_old)
      l_t    = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
      loss   = aggregate(l_t)  (cfg.loss_agg)

    which is TRL GRPOTrainer's `-min(coef_1 * A, coef_2 * A)`, coef_2 = clamp(coef_1, 1 - epsilon_low,
    1 + epsilon_high). Metrics (token means): clipfrac = fraction where the clipped term is strictly larger
    (active), approx_kl_k3 / approx_kl_k2 = KL(old || new) estimated from the old policy's samples.
    `norm`: the whole minibatch's counts when this is one micro-batch of it (ops.LossNorm); the loss and every
    metric are then this micro-batch's share, and the shares add up to the minibatch's value.
    """
    valid_br = response_mask_br > 0
    # Padding may hold any log-prob; zero the log-ratio there so exp() cannot overflow into a NaN gradient.
    log_ratio_br = jnp.where(valid_br, logp_new_br.astype(jnp.float32) - logp_old_br.astype(jnp.float32), 0.0)
    ratio_br = jnp.exp(log_ratio_br)
    advantages_br = jax.lax.stop_gradient(advantages_br.astype(jnp.float32))
    unclipped_br = -advantages_br * ratio_br
    clipped_br = -advantages_br * jnp.clip(ratio_br, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = aggregate(jnp.maximum(unclipped_br, clipped_br), response_mask_br, cfg.loss_agg, norm)

    # The tokens were sampled from pi_old, so KL(old || new) is kl_estimate(logp=old, logp_ref=new); only the
    # log-ratio matters, and the sanitised one keeps padding at exactly 0.
    old_minus_new_br = -jax.lax.stop_gradient(log_ratio_br)
    zeros_br = jnp.zeros_like(old_minus_new_br)
    metrics = {
        "policy/loss": loss,
        "policy/clipfrac": aggregate((clipped_br > unclipped_br).astype(jnp.float32), response_mask_br,
                                     "token_mean", norm),
        "policy/approx_kl_k3": aggregate(kl_estimate("k3", old_minus_new_br, zeros_br), response_mask_br,
                                         "token_mean", norm),
        "policy/approx_kl_k2": aggregate(kl_estimate("k2", old_minus_new_br, zeros_br), response_mask_br,
                                         "token_mean", norm),
        "policy/ratio": aggregate(jnp.exp(-old_minus_new_br), response_mask_br, "token_mean", norm),
    }
    return loss, metrics


def value_loss(values_new_br: jax.Array, values_old_br: jax.Array, returns_br: jax.Array,
               response_mask_br: jax.Array, cfg: ml_collections.ConfigDict, norm: LossNorm | None = None,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (PPO2; the N+ implementation details reproduction, Huang et al. 2024), already
    multiplied by vf_coef:

      V_clip = V_old + clip(V_new - V_old, -vf_clip, vf_clip)
      l_t    = 0.5 * max((V_new - R)^2, (V_clip - R)^2)     (0.5 * (V_new - R)^2 when vf_clip <= 0)
      loss   = vf_coef * aggregate(l_t)

    `norm` as in `ppo_policy_loss`. The explained variance is not a mean, so the caller computes it on the
    whole minibatch (`explained_variance`).
    """
    valid_br = response_mask_br > 0
    values_new_br = jnp.where(valid_br, values_new_br.astype(jnp.float32), 0.0)
    values_old_br = jnp.where(valid_br, values_old_br.astype(jnp.float32), 0.0)
    returns_br = jax.lax.stop_gradient(jnp.where(valid_br, returns_br.astype(jnp.float32), 0.0))
    unclipped_br = jnp.square(values_new_br - returns_br)
    if cfg.vf_clip > 0:
        values_clipped_br = values_old_br + jnp.clip(values_new_br - values_old_br, -cfg.vf_clip, cfg.vf_clip)
        clipped_br = jnp.square(values_clipped_br - returns_br)
        per_token_br = 0.5 * jnp.maximum(unclipped_br, clipped_br)
        clipfrac = aggregate((clipped_br > unclipped_br).astype(jnp.float32), response_mask_br, "token_mean", norm)
    else:
        per_token_br = 0.5 * unclipped_br
        clipfrac = jnp.zeros((), jnp.float32)
    unscaled = aggregate(per_token_br, response_mask_br, cfg.loss_agg, norm)
    return cfg.vf_coef * unscaled, {"value/loss": unscaled, "value/clipfrac": clipfrac}


def entropy_from_logits(logits_brv: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """Per-token entropy H_t = -sum_v p_v log p_v of softmax(logits), (B, R) float32, 0 at padding."""
    logp_brv = jax.nn.log_softmax(logits_brv.astype(jnp.float32), axis=-1)
    entropy_br = -jnp.sum(jnp.exp(logp_brv) * logp_brv, axis=-1)
    return jnp.where(response_mask_br > 0, entropy_br, 0.0)


def entropy_loss(entropy_br: jax.Array, response_mask_br: jax.Array, cfg: ml_collections.ConfigDict,
                 norm: LossNorm | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Entropy bonus as a loss: -ent_coef * aggregate(H_t), from the per-token entropies H_t (`entropy_from_logits`,
    which the learn phase computes block by block with the log-probs). Returns (loss, {"policy/entropy":
    aggregate(H_t)}); `norm` as in `ppo_policy_loss`."""
    entropy = aggregate(entropy_br, response_mask_br, cfg.loss_agg, norm)
    return -cfg.ent_coef * entropy, {"policy/entropy": entropy}


def explained_variance(values_br: jax.Array, returns_br: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """1 - Var[R - V] / Var[R] over valid tokens (population variances); NaN when Var[R] = 0 (undefined)."""
    var_returns = masked_var(returns_br, response_mask_br)
    var_residual = masked_var(returns_br.astype(jnp.float32) - values_br.astype(jnp.float32), response_mask_br)
    return jnp.where(var_returns > 0, 1.0 - var_residual / jnp.where(var_returns > 0, var_returns, 1.0), jnp.nan)


# ---------------------------------------------------------------------------------------------------------------
# Online DPO
# ---------------------------------------------------------------------------------------------------------------

def sample_pairs(n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The K = n (n - 1) / 2 pairs (i, j), i < j, of a prompt's n samples: (first (K,), second (K,)), static."""
    first, second = np.triu_indices(n_samples, k=1)
    return first.astype(np.int32), second.astype(np.int32)


def win_rates(p_first_better_k: jax.Array, n_samples: int) -> jax.Array:
    """(B,) each sample's mean preference over the other samples of its prompt, from the pairwise judge's
    P(i better than j) of every pair of `sample_pairs` (G prompts x K pairs, prompt-major):

      w_i = 1/(n-1) sum_{j != i} P(i > j),   P(j > i) = 1 - P(i > j)

    (the judge asks both orders and averages them, so its preference is antisymmetric). A soft Borda count; with
    n = 2 the two samples get P(0 > 1) and 1 - P(0 > 1)."""
    first, second = sample_pairs(n_samples)
    p_gk = p_first_better_k.astype(jnp.float32).reshape(-1, len(first))
    pref_gnn = jnp.zeros((p_gk.shape[0], n_samples, n_samples), jnp.float32)
    pref_gnn = pref_gnn.at[:, first, second].set(p_gk).at[:, second, first].set(1.0 - p_gk)
    return (pref_gnn.sum(-1) / (n_samples - 1)).reshape(-1)


def choose_pairs(win_rates_b: jax.Array, n_samples: int) -> tuple[jax.Array, jax.Array]:
    """The rows of each prompt's chosen and rejected response, (G,) int32 each, from `win_rates` (B = G * n rows,
    prompt-major): chosen = the sample with the highest win rate, rejected = the one with the lowest among the
    others (ties go to the lower sample index).

    With n = 2 this is TRL's online DPO with a pairwise judge: the judge ranks the two completions and the first
    is chosen unless the second is preferred (TRL 0.x's trl/trainer/online_dpo_trainer.py, `training_step`:
    `mask = rank == 0`; with a reward, `first_half >= second_half`, ties to the first). With n > 2, the best and
    the worst of the n samples, the pair iterative DPO recipes build from a reward model's ranking (Dong et al.
    2024, "RLHF Workflow"), here ranked by the judge's mean preference."""
    w_gn = win_rates_b.reshape(-1, n_samples)
    chosen_g = jnp.argmax(w_gn, axis=-1)
    others_gn = jnp.where(jnp.arange(n_samples) == chosen_g[:, None], jnp.inf, w_gn)
    rejected_g = jnp.argmin(others_gn, axis=-1)
    offset_g = jnp.arange(w_gn.shape[0]) * n_samples
    return (offset_g + chosen_g).astype(jnp.int32), (offset_g + rejected_g).astype(jnp.int32)


def dpo_loss(logp_chosen_p: jax.Array, logp_rejected_p: jax.Array, ref_logp_chosen_p: jax.Array,
             ref_logp_rejected_p: jax.Array, beta: float, pairs: int | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO's sigmoid loss (Rafailov et al. 2023) on P pairs, from sequence log-probs (summed over each response's
    valid tokens) of the policy and the frozen reference:

      r_c = beta (log pi(y_c) - log pi_ref(y_c)),  r_r = beta (log pi(y_r) - log pi_ref(y_r))   implicit rewards
      loss = (1/P) sum_pairs -log sigmoid(r_c - r_r)

    as TRL's OnlineDPOTrainer, loss_type="sigmoid" (trl/experimental/online_dpo/online_dpo_trainer.py,
    `training_step`: `logits = pi_logratios - ref_logratios`, `-F.logsigmoid(self.beta * logits)`, `.mean()`;
    its metrics rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies = margin > 0).
    `pairs`: the whole minibatch's pair count when these are one micro-batch of it; the loss and metrics are then
    this micro-batch's share (as `ops.LossNorm` for the token losses). Metrics: dpo/loss, dpo/chosen_reward,
    dpo/rejected_reward, dpo/reward_margin, dpo/accuracy.
    """
    pairs = logp_chosen_p.shape[0] if pairs is None else pairs
    chosen_reward_p = beta * (logp_chosen_p.astype(jnp.float32) - jax.lax.stop_gradient(ref_logp_chosen_p))
    rejected_reward_p = beta * (logp_rejected_p.astype(jnp.float32) - jax.lax.stop_gradient(ref_logp_rejected_p))
    margin_p = chosen_reward_p - rejected_reward_p
    loss = jnp.sum(jax.nn.softplus(-margin_p)) / pairs  # -log sigmoid(x) = softplus(-x), stable for any x

    def share(x_p):
        return jnp.sum(jax.lax.stop_gradient(x_p)) / pairs

    return loss, {"dpo/loss": loss, "dpo/chosen_reward": share(chosen_reward_p),
                  "dpo/rejected_reward": share(rejected_reward_p), "dpo/reward_margin": share(margin_p),
                  "dpo/accuracy": share((margin_p > 0).astype(jnp.float32))}
