"""Advantage estimators and losses: GAE + PPO, GRPO, RLOO, REINFORCE with a learned baseline (phases 5-6).

Shapes: per-token arrays are `(B, R)` over the response tokens only, `response_mask_br` is 1.0 up to and including
the stop token; per-sequence arrays are `(B,)`. Critic-free estimators see n samples per prompt laid out as
consecutive rows (B = num_prompts * n). All functions are pure, jittable and float32; `cfg` (the `algo` config
section) and `n_samples` are static Python values, closed over by the caller before jit.

The scan over epochs x minibatches lives in train_step.py; `epochs` and `minibatches` are only held here.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax.ops import (LOSS_AGGS, aggregate, kl_estimate, masked_mean, masked_sum, masked_var,
                           masked_whiten)

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `algo` config section."""
    c = ml_collections.ConfigDict()
    c.estimator = "gae"          # "gae" (PPO with critic) | "grpo" | "rloo" | "reinforce" (learned baseline)
    c.gamma = 1.0                # discount over response tokens
    c.lam = 0.95                 # GAE lambda
    c.whiten_advantages = True   # whiten advantages over the valid tokens of the batch (after estimation)
    c.whiten_shift_mean = True   # whitening subtracts the mean (False: rescale only, keep the mean)
    c.grpo_scale_std = True      # GRPO divides by the group std; False = Dr. GRPO (mean-centring only)
    c.adv_eps = 1e-6             # GRPO: (r - mean) / (std + adv_eps)
    c.clip_low = 0.2             # PPO ratio clipped to [1 - clip_low, 1 + clip_high]
    c.clip_high = 0.2            #   (clip_high > clip_low: DAPO's "clip-higher")
    c.vf_clip = 0.2              # value clipped to old +- vf_clip; <= 0 turns clipping off
    c.vf_coef = 0.1              # weight of the value loss
    c.ent_coef = 0.0             # weight of the entropy bonus (loss -= ent_coef * entropy)
    c.loss_agg = "token_mean"    # "token_mean" (all valid tokens weigh the same) | "seq_mean" (sequences do)
    c.epochs = 4                 # passes over each rollout batch (used by train_step)
    c.minibatches = 1            # minibatches per epoch (used by train_step); they hold whole groups of samples
    # Forwards over whole groups (n_samples > 1) run each prompt once (tfm.forward_shared_prefix), which shortens
    # the update phase (README, "Performance"). False: every row runs its prompt (the reference the shared path is
    # tested against).
    c.share_prompt_forward = True
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
    if cfg.epochs < 1 or cfg.minibatches < 1:
        raise ValueError(f"algo.epochs={cfg.epochs} and algo.minibatches={cfg.minibatches} must be >= 1")


class Advantages(NamedTuple):
    advantages_br: jax.Array  # (B, R) float32, 0 at padding
    returns_br: jax.Array     # (B, R) float32, value targets (A + V for GAE, the sequence return otherwise)


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


def sequence_returns(token_rewards_br: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """(B,) undiscounted return sum_t r_t over valid tokens: the shaped score plus any per-token KL penalty."""
    return masked_sum(token_rewards_br, response_mask_br, axis=-1)


def _groups(scores_b: jax.Array, n_samples: int) -> jax.Array:
    if n_samples < 2:
        raise ValueError(f"critic-free group estimators need n_samples >= 2 per prompt, got {n_samples}")
    if scores_b.shape[0] % n_samples:
        raise ValueError(f"batch of {scores_b.shape[0]} rows is not a whole number of groups of {n_samples}")
    return scores_b.astype(jnp.float32).reshape(-1, n_samples)


def grpo_advantages(scores_b: jax.Array, n_samples: int, scale_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """GRPO (Shao et al. 2024), per sequence: A_i = (r_i - mean_g r) / (std_g r + eps), std with ddof=1 over the
    group of the i-th prompt. scale_std=False gives Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g r."""
    groups_pn = _groups(scores_b, n_samples)
    adv_pn = groups_pn - jnp.mean(groups_pn, axis=1, keepdims=True)
    if scale_std:
        adv_pn = adv_pn / (jnp.std(groups_pn, axis=1, ddof=1, keepdims=True) + eps)
    return adv_pn.reshape(-1)


def rloo_advantages(scores_b: jax.Array, n_samples: int) -> jax.Array:
    """RLOO (Ahmadian et al. 2024), per sequence: A_i = r_i - (1/(n-1)) sum_{j != i} r_j within the group."""
    groups_pn = _groups(scores_b, n_samples)
    others_mean_pn = (jnp.sum(groups_pn, axis=1, keepdims=True) - groups_pn) / (n_samples - 1)
    return (groups_pn - others_mean_pn).reshape(-1)


def reinforce_advantages(scores_b: jax.Array, values_br: jax.Array) -> jax.Array:
    """REINFORCE with a learned baseline, per sequence: A = R - b, b = V(prompt) = values_br[:, 0].

    The baseline is the value head's output at the first response token, i.e. its prediction from the prompt
    alone: one baseline per sequence that does not depend on the sampled tokens, so the estimator stays
    unbiased. The value head is trained with MSE towards R on every valid token (`compute_advantages` returns
    R broadcast as `returns_br`; use `value_loss`), which is the Monte-Carlo target for V(s_t) when gamma = 1.
    The baseline is a constant for the policy gradient (stop_gradient).
    """
    return scores_b.astype(jnp.float32) - jax.lax.stop_gradient(values_br[:, 0].astype(jnp.float32))


def broadcast_to_tokens(x_b: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """(B,) -> (B, R): the per-sequence value on every valid token, 0 at padding."""
    return jnp.where(response_mask_br > 0, x_b[:, None].astype(jnp.float32), 0.0)


def compute_advantages(cfg: ml_collections.ConfigDict, token_rewards_br: jax.Array, values_br: jax.Array | None,
                       scores_b: jax.Array | None, response_mask_br: jax.Array, n_samples: int) -> Advantages:
    """Advantages and value targets with the estimator `cfg.estimator`, then optional masked whitening.

    gae        token_rewards_br and values_br (critic)
    grpo/rloo  scores_b per sequence, n_samples consecutive rows per prompt
    reinforce  scores_b and values_br (baseline read at the first response token)
    For the critic-free estimators `scores_b=None` means the sequence return `sequence_returns(token_rewards_br)`
    (the shaped score, minus the summed KL penalty when the KL is in the reward), which is normally what you want.
    """
    if cfg.estimator != "gae" and scores_b is None:
        scores_b = sequence_returns(token_rewards_br, response_mask_br)
    if cfg.estimator == "gae":
        out = gae(token_rewards_br, values_br, response_mask_br, cfg.gamma, cfg.lam)
    elif cfg.estimator == "grpo":
        adv_b = grpo_advantages(scores_b, n_samples, cfg.grpo_scale_std, cfg.adv_eps)
        out = Advantages(broadcast_to_tokens(adv_b, response_mask_br), broadcast_to_tokens(scores_b, response_mask_br))
    elif cfg.estimator == "rloo":
        adv_b = rloo_advantages(scores_b, n_samples)
        out = Advantages(broadcast_to_tokens(adv_b, response_mask_br), broadcast_to_tokens(scores_b, response_mask_br))
    elif cfg.estimator == "reinforce":
        adv_b = reinforce_advantages(scores_b, values_br)
        out = Advantages(broadcast_to_tokens(adv_b, response_mask_br), broadcast_to_tokens(scores_b, response_mask_br))
    else:
        raise ValueError(f"algo.estimator={cfg.estimator!r}; choose one of {ESTIMATORS}")
    if cfg.whiten_advantages:
        out = out._replace(advantages_br=masked_whiten(out.advantages_br, response_mask_br, cfg.whiten_shift_mean))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def ppo_policy_loss(logp_new_br: jax.Array, logp_old_br: jax.Array, advantages_br: jax.Array,
                    response_mask_br: jax.Array, cfg: ml_collections.ConfigDict,
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with separate clip ranges (Schulman et al. 2017; DAPO's clip-higher):

      rho_t  = exp(logp_new - logp_old)
      l_t    = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
      loss   = aggregate(l_t)  (cfg.loss_agg)

    Metrics (over valid tokens): clipfrac = fraction where the clipped term is strictly larger (active),
    approx_kl_k3 / approx_kl_k2 = KL(old || new) estimated from the old policy's samples.
    """
    valid_br = response_mask_br > 0
    # Padding may hold any log-prob; zero the log-ratio there so exp() cannot overflow into a NaN gradient.
    log_ratio_br = jnp.where(valid_br, logp_new_br.astype(jnp.float32) - logp_old_br.astype(jnp.float32), 0.0)
    ratio_br = jnp.exp(log_ratio_br)
    advantages_br = jax.lax.stop_gradient(advantages_br.astype(jnp.float32))
    unclipped_br = -advantages_br * ratio_br
    clipped_br = -advantages_br * jnp.clip(ratio_br, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = aggregate(jnp.maximum(unclipped_br, clipped_br), response_mask_br, cfg.loss_agg)

    # The tokens were sampled from pi_old, so KL(old || new) is kl_estimate(logp=old, logp_ref=new); only the
    # log-ratio matters, and the sanitised one keeps padding at exactly 0.
    old_minus_new_br = -jax.lax.stop_gradient(log_ratio_br)
    zeros_br = jnp.zeros_like(old_minus_new_br)
    metrics = {
        "policy/loss": loss,
        "policy/clipfrac": masked_mean((clipped_br > unclipped_br).astype(jnp.float32), response_mask_br),
        "policy/approx_kl_k3": masked_mean(kl_estimate("k3", old_minus_new_br, zeros_br), response_mask_br),
        "policy/approx_kl_k2": masked_mean(kl_estimate("k2", old_minus_new_br, zeros_br), response_mask_br),
        "policy/ratio": masked_mean(jnp.exp(-old_minus_new_br), response_mask_br),
    }
    return loss, metrics


def value_loss(values_new_br: jax.Array, values_old_br: jax.Array, returns_br: jax.Array,
               response_mask_br: jax.Array, cfg: ml_collections.ConfigDict,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (PPO2 / summarize-from-feedback style), already multiplied by vf_coef:

      V_clip = V_old + clip(V_new - V_old, -vf_clip, vf_clip)
      l_t    = 0.5 * max((V_new - R)^2, (V_clip - R)^2)     (0.5 * (V_new - R)^2 when vf_clip <= 0)
      loss   = vf_coef * aggregate(l_t)
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
        clipfrac = masked_mean((clipped_br > unclipped_br).astype(jnp.float32), response_mask_br)
    else:
        per_token_br = 0.5 * unclipped_br
        clipfrac = jnp.zeros((), jnp.float32)
    unscaled = aggregate(per_token_br, response_mask_br, cfg.loss_agg)
    metrics = {
        "value/loss": unscaled,
        "value/clipfrac": clipfrac,
        "value/explained_variance": explained_variance(jax.lax.stop_gradient(values_new_br), returns_br,
                                                       response_mask_br),
    }
    return cfg.vf_coef * unscaled, metrics


def entropy_from_logits(logits_brv: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """Per-token entropy H_t = -sum_v p_v log p_v of softmax(logits), (B, R) float32, 0 at padding."""
    logp_brv = jax.nn.log_softmax(logits_brv.astype(jnp.float32), axis=-1)
    entropy_br = -jnp.sum(jnp.exp(logp_brv) * logp_brv, axis=-1)
    return jnp.where(response_mask_br > 0, entropy_br, 0.0)


def entropy_loss(logits_brv: jax.Array, response_mask_br: jax.Array, cfg: ml_collections.ConfigDict,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Entropy bonus as a loss: -ent_coef * aggregate(H_t). Returns (loss, {"policy/entropy": aggregate(H_t)})."""
    entropy = aggregate(entropy_from_logits(logits_brv, response_mask_br), response_mask_br, cfg.loss_agg)
    return -cfg.ent_coef * entropy, {"policy/entropy": entropy}


def explained_variance(values_br: jax.Array, returns_br: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """1 - Var[R - V] / Var[R] over valid tokens (population variances); NaN when Var[R] = 0 (undefined)."""
    var_returns = masked_var(returns_br, response_mask_br)
    var_residual = masked_var(returns_br.astype(jnp.float32) - values_br.astype(jnp.float32), response_mask_br)
    return jnp.where(var_returns > 0, 1.0 - var_residual / jnp.where(var_returns > 0, var_returns, 1.0), jnp.nan)
