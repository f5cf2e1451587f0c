"""Reward shaping: judge scores -> per-token rewards for the RL update (phase 4 of the train step).

Shapes: per-token arrays are `(B, R)` over the response tokens only; `response_mask_br` is 1.0 up to and including
the first stop token and 0.0 after it (a response that never stopped is all ones). Per-sequence arrays are `(B,)`.
Everything here is pure, jittable, float32, and never lets padding reach a statistic.

`shape_rewards` applies, in this order:

  1 composite     s = judge_weight * judge + sum_k rule_weights[k] * rule_terms[k]
                        + sum_k function_weights[k] * function_terms[k]
                  (the terms of `reward.rules`, computed in the step by rlaif_jax/reward_rules.py; those of
                  `reward.functions`, Python functions on text run on the host, rlaif_jax/reward_functions.py)
  2 missing stop  responses without a stop token: s = missing_stop_penalty ("replace") or s += it ("add")
  3 length        s -= length_penalty * max(length - length_target, 0)   (length_target 0: whole length)
  4 clip          s = clip(s, -clip, clip)                                (clip 0: off)
  5 normalise     "whiten": over the batch; "running": by running std across steps (optionally minus mean)
  6 place         the score goes on the stop token (the last token the mask marks), zeros elsewhere
  7 KL            if kl_in_reward: r_t -= kl_coef * kl_t on every valid token; otherwise the loss owner adds
                  `kl_loss_term(...)` (coef * aggregated kl) to the loss and the rewards carry no KL.
  8 whiten tokens if whiten_token_rewards: the per-token rewards r_t of step 7 (score at its token and KL together)
                  are whitened over every valid token of the batch, r_t <- (r_t - mean) / sqrt(var + norm_eps)
                  (+ mean back unless token_whiten_shift_mean): the `whiten_rewards` of the PPO reproduction
                  (summarize_from_feedback_details/ppo.py, `masked_whiten(rewards, mask=~padding_mask_p1,
                  shift_mean=False)`: population variance, eps 1e-8; `ops.masked_whiten`). Its mask also counts
                  one token past the EOS, where it places the score (KL 0 there); ours ends at the stop token,
                  which carries both the score and that token's KL.

The masked reductions and KL estimators come from `rlaif_jax.ops`, the neutral module algorithms.py imports too:
one definition of "mean over valid tokens" for the whole codebase.
"""
from __future__ import annotations

import math
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax import reward_functions, reward_rules
from rlaif_jax.ops import KL_ESTIMATORS, LossNorm, aggregate, all_kl_estimates, kl_estimate, masked_whiten

SCORE_NORMS = ("none", "whiten", "running")
# What a pairwise judge's reward compares each sample with (the score is P(sample better than it), both orders).
PAIRWISE_BASELINES = ("reference_sample", "dataset_reference")
MISSING_STOP_MODES = ("replace", "add", "none")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `reward` config section."""
    c = ml_collections.ConfigDict()
    # --- composite score ---
    c.judge_weight = 1.0          # weight of the judge's score
    # A pairwise judge (judge.mode="pairwise") as the reward of a PPO-family estimator: the score of a sample is
    # P(it beats a baseline response for its prompt), both presentation orders. "reference_sample": one sample of
    # the frozen reference policy per prompt, generated in the same step; "dataset_reference": the data's
    # reference response (config.data.reference_field). "" for every other judge mode (and for online_dpo).
    c.pairwise_baseline = ""
    c.rules = {}                  # rule name -> its parameters, terms computed in the step (reward_rules.py),
    #                               e.g. {"repeated_ngrams": {"n": 3}, "stop_token": {}}; set the whole dict
    c.rule_weights = {}           # rule name -> weight, one for every rule: {"repeated_ngrams": -1.0, ...}
    # Python reward functions on the decoded text (TRL's signature), run on the host between the step's compiled
    # programs (reward_functions.py): name -> "module:function"; set the whole dict. Each needs a weight.
    c.functions = {}
    c.function_weights = {}       # function name -> weight, one for every function
    c.function_neutral = 0.0      # the value of a function's None ("no opinion") for a row
    # --- penalties ---
    c.missing_stop_penalty = -1.0  # score for a response with no stop token within max new tokens
    c.missing_stop_mode = "replace"  # "replace" the score (summarize-from-feedback reproductions) | "add" | "none"
    c.length_penalty = 0.0        # per token beyond length_target; subtracted from the score
    c.length_target = 0           # tokens that are free of the length penalty (0: every token costs)
    c.clip = 0.0                  # clip the score to [-clip, clip]; 0 = off
    # --- normalisation of the (clipped) score ---
    c.score_norm = "none"         # "none" | "whiten" (batch mean/std) | "running" (running std across steps)
    c.norm_subtract_mean = False  # whiten/running: also subtract the (batch/running) mean; False keeps it
    c.norm_eps = 1e-8             # also the eps of whiten_token_rewards
    # --- whitening of the per-token rewards (score + KL), after the KL penalty (step 8) ---
    c.whiten_token_rewards = False  # the PPO reproductions' `whiten_rewards`: over every valid token of the batch
    c.token_whiten_shift_mean = False  # also remove their mean (the reproduction keeps it: shift_mean=False)
    # --- KL to the frozen reference policy ---
    c.kl_estimator = "k1"         # "k1" | "k2" | "k3" (Schulman, "Approximating KL"); in the loss only k2 / k3
    c.kl_in_reward = True         # True: -coef * kl_t per token in the reward; False: coef * kl as a loss term
    c.kl_coef = 0.05              # initial (or fixed) KL coefficient; 0 (not adaptive) skips the reference forward
    c.adaptive_kl = False         # Ziegler et al. 2019 proportional controller on the coefficient
    c.kl_target = 6.0             # target KL per sequence (nats, summed over response tokens)
    c.kl_horizon = 10000          # controller horizon, in episodes (sequences)
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError with what to change when the `reward` section is inconsistent."""
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"reward.kl_estimator={cfg.kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    if cfg.pairwise_baseline and cfg.pairwise_baseline not in PAIRWISE_BASELINES:
        raise ValueError(f"reward.pairwise_baseline={cfg.pairwise_baseline!r}; choose one of {PAIRWISE_BASELINES} "
                         "(or '' when the judge is not pairwise)")
    if cfg.score_norm not in SCORE_NORMS:
        raise ValueError(f"reward.score_norm={cfg.score_norm!r}; choose one of {SCORE_NORMS}")
    if cfg.missing_stop_mode not in MISSING_STOP_MODES:
        raise ValueError(f"reward.missing_stop_mode={cfg.missing_stop_mode!r}; choose one of {MISSING_STOP_MODES}")
    if cfg.clip < 0:
        raise ValueError(f"reward.clip={cfg.clip} must be >= 0 (0 turns clipping off)")
    if not math.isfinite(cfg.judge_weight):
        raise ValueError(f"reward.judge_weight={cfg.judge_weight} must be a finite number")
    if cfg.length_target < 0:
        raise ValueError(f"reward.length_target={cfg.length_target} must be >= 0 (0: every token costs)")
    if not cfg.norm_eps > 0:
        raise ValueError(f"reward.norm_eps={cfg.norm_eps} must be > 0")
    if cfg.token_whiten_shift_mean and not cfg.whiten_token_rewards:
        raise ValueError("reward.token_whiten_shift_mean=True does nothing without reward.whiten_token_rewards=True; "
                         "set both, or neither")
    if not cfg.kl_coef >= 0:
        raise ValueError(f"reward.kl_coef={cfg.kl_coef} must be >= 0 (0 with adaptive_kl=False turns the KL off)")
    if cfg.adaptive_kl and (cfg.kl_target <= 0 or cfg.kl_horizon <= 0):
        raise ValueError("reward.adaptive_kl needs reward.kl_target > 0 and reward.kl_horizon > 0")
    if cfg.adaptive_kl and cfg.kl_coef == 0:
        raise ValueError("reward.adaptive_kl=True with reward.kl_coef=0: the controller multiplies the coefficient, "
                         "so it never leaves 0; set reward.kl_coef > 0 (its starting value)")
    if cfg.kl_estimator == "k1" and not cfg.kl_in_reward:
        # tests/test_conformance.py checks the three expected gradients exactly on a small softmax.
        raise ValueError("reward.kl_estimator='k1' as a loss term (reward.kl_in_reward=False) has zero expected "
                         "gradient (E_pi[grad log pi] = 0); use 'k2' (its gradient is that of KL(pi || pi_ref)) or "
                         "'k3' (its gradient is that of KL(pi_ref || pi)), or set reward.kl_in_reward=True")
    check_term_weights(cfg, "rule", {rule.name for rule in reward_rules.load(cfg)})
    check_term_weights(cfg, "function", {f.name for f in reward_functions.load(cfg)})
    reward_functions.validate_config(cfg)


def check_term_weights(cfg: ml_collections.ConfigDict, kind: str, names: set[str]) -> None:
    """The composite reward's terms of one kind ("rule": `reward.rules`; "function": `reward.functions`) and their
    weights (`reward.<kind>_weights`): a finite weight for every term, and no weight without its term."""
    weights = cfg[f"{kind}_weights"]
    for name, weight in sorted(weights.items()):
        if name not in names:
            raise ValueError(f"reward.{kind}_weights has {name!r} but reward.{kind}s has no {kind} {name!r}; add the "
                             f"{kind} to reward.{kind}s or remove its weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"reward.{kind}_weights[{name!r}]={weight!r} must be a finite number")
    unweighted = sorted(names - set(weights))
    if unweighted:
        raise ValueError(f"reward.{kind}s.{unweighted[0]} has no weight; set reward.{kind}_weights"
                         f"[{unweighted[0]!r}] (0 logs the {kind} without changing the reward)")


# ---------------------------------------------------------------------------------------------------------------
# KL as a loss term
# ---------------------------------------------------------------------------------------------------------------

def _masked_log_probs(logp_br, logp_ref_br, mask_br):
    # Padding positions may hold anything (even -inf); set both to 0 there so every estimator gives exactly 0.
    valid = mask_br > 0
    return jnp.where(valid, logp_br, 0.0), jnp.where(valid, logp_ref_br, 0.0)


def kl_loss_term(logp_br: jax.Array, logp_ref_br: jax.Array, response_mask_br: jax.Array, coef: jax.Array,
                 estimator: str, loss_agg: str, norm: LossNorm | None = None) -> tuple[jax.Array, jax.Array]:
    """The KL penalty as a loss term (used when `kl_in_reward` is False): coef * aggregate(kl_t).

    `logp_br` are the current policy's (differentiable) log-probs of the sampled tokens; with k3 this is the
    GRPO-style penalty. `loss_agg` should be the policy loss's own aggregation, `norm` the minibatch's counts when
    this is one micro-batch of it (ops.LossNorm). Returns (loss, aggregated kl).
    """
    logp_br, logp_ref_br = _masked_log_probs(logp_br, jax.lax.stop_gradient(logp_ref_br), response_mask_br)
    kl_br = kl_estimate(estimator, logp_br, logp_ref_br)
    kl = aggregate(kl_br, response_mask_br, loss_agg, norm)
    return jax.lax.stop_gradient(coef) * kl, kl


# ---------------------------------------------------------------------------------------------------------------
# KL coefficient controller
# ---------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class KLControllerState:
    coef: jax.Array  # () float32, the current KL coefficient


def kl_controller_init(cfg: ml_collections.ConfigDict) -> KLControllerState:
    return KLControllerState(coef=jnp.asarray(cfg.kl_coef, jnp.float32))


def kl_controller_update(cfg: ml_collections.ConfigDict, state: KLControllerState, kl: jax.Array,
                         n_steps: int | jax.Array) -> KLControllerState:
    """Ziegler et al. 2019 proportional controller (fixed coefficient unless cfg.adaptive_kl):

      error = clip(kl / kl_target - 1, -0.2, 0.2)
      coef <- coef * (1 + error * n_steps / kl_horizon)

    `kl` is the measured KL per sequence (batch mean of the per-token estimates summed over the response) and
    `n_steps` the number of episodes it was measured on (the batch size).
    """
    if not cfg.adaptive_kl:
        return state
    error = jnp.clip(jnp.asarray(kl, jnp.float32) / cfg.kl_target - 1.0, -0.2, 0.2)
    return KLControllerState(coef=state.coef * (1.0 + error * n_steps / cfg.kl_horizon))


# ---------------------------------------------------------------------------------------------------------------
# Running normaliser
# ---------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class RunningNormState:
    count: jax.Array  # () float32, number of values seen
    mean: jax.Array   # () float32
    m2: jax.Array     # () float32, sum of squared deviations from the mean (variance = m2 / count)


def running_norm_init() -> RunningNormState:
    zero = jnp.zeros((), jnp.float32)
    return RunningNormState(count=zero, mean=zero, m2=zero)


def running_norm_update(state: RunningNormState, x_b: jax.Array) -> RunningNormState:
    """Merge a batch into the running statistics (Chan et al. 1979 parallel algorithm):

      n = n_a + n_b,  delta = mean_b - mean_a
      mean = mean_a + delta * n_b / n
      M2   = M2_a + M2_b + delta^2 * n_a * n_b / n
    """
    x_b = x_b.astype(jnp.float32).reshape(-1)
    n_b = jnp.asarray(x_b.shape[0], jnp.float32)
    mean_b = jnp.mean(x_b)
    m2_b = jnp.sum(jnp.square(x_b - mean_b))
    n = state.count + n_b
    delta = mean_b - state.mean
    return RunningNormState(
        count=n,
        mean=state.mean + delta * n_b / n,
        m2=state.m2 + m2_b + jnp.square(delta) * state.count * n_b / n,
    )


def running_std(state: RunningNormState) -> jax.Array:
    """Population standard deviation sqrt(M2 / count) of everything seen (0 before any update)."""
    return jnp.sqrt(state.m2 / jnp.maximum(state.count, 1.0))


def running_normalize(state: RunningNormState, x: jax.Array, subtract_mean: bool, eps: float) -> jax.Array:
    """x / (std + eps), or (x - mean) / (std + eps), with the running statistics in `state`."""
    centred = x - state.mean if subtract_mean else x
    return centred / (running_std(state) + eps)


# ---------------------------------------------------------------------------------------------------------------
# Score pieces
# ---------------------------------------------------------------------------------------------------------------

def composite_score(cfg: ml_collections.ConfigDict, judge_b: jax.Array, rule_terms: Mapping[str, jax.Array],
                    function_terms: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """s = judge_weight * judge + sum_k rule_weights[k] * rule_terms[k] + sum_k function_weights[k] *
    function_terms[k]."""
    score_b = cfg.judge_weight * judge_b.astype(jnp.float32)
    for kind, terms in (("rule", rule_terms), ("function", function_terms or {})):
        weights = dict(cfg[f"{kind}_weights"])
        missing = sorted(set(terms) - set(weights))
        if missing:
            raise ValueError(f"{kind} terms {missing} have no weight; add them to config.reward.{kind}_weights")
        for name in sorted(terms):  # sorted: a fixed summation order, so results do not depend on dict order
            score_b = score_b + weights[name] * terms[name].astype(jnp.float32)
    return score_b


def apply_missing_stop(score_b: jax.Array, stopped_b: jax.Array, penalty: float, mode: str) -> jax.Array:
    """replace: s = stopped ? s : penalty;   add: s = s + (stopped ? 0 : penalty);   none: s."""
    stopped_b = stopped_b.astype(bool)
    if mode == "replace":
        return jnp.where(stopped_b, score_b, penalty)
    if mode == "add":
        return score_b + jnp.where(stopped_b, 0.0, penalty)
    if mode == "none":
        return score_b
    raise ValueError(f"missing_stop_mode {mode!r}; choose one of {MISSING_STOP_MODES}")


def length_penalty(response_mask_br: jax.Array, coef: float, target: int) -> jax.Array:
    """Penalty (to subtract from the score) per sequence: coef * max(L - target, 0), L = response length."""
    length_b = jnp.sum(response_mask_br.astype(jnp.float32), axis=-1)
    return coef * jnp.maximum(length_b - target, 0.0)


def place_at_stop(score_b: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """(B, R) with score_b at the last token the mask marks (the stop token, or token R-1 if none), else 0.

    A row with an empty mask gets no reward at all.
    """
    length_b = jnp.sum(response_mask_br > 0, axis=-1)
    positions_r = jnp.arange(response_mask_br.shape[-1])
    is_last_br = positions_r[None, :] == (length_b - 1)[:, None]  # never true for length 0
    return jnp.where(is_last_br, score_b[:, None].astype(jnp.float32), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class RewardState:
    """What reward shaping carries from one step to the next (lives in the train state)."""
    kl: KLControllerState
    norm: RunningNormState


def init_state(cfg: ml_collections.ConfigDict) -> RewardState:
    return RewardState(kl=kl_controller_init(cfg), norm=running_norm_init())


def shape_rewards(cfg: ml_collections.ConfigDict, state: RewardState, scores_b: jax.Array, logp_br: jax.Array,
                  logp_ref_br: jax.Array, response_mask_br: jax.Array, stopped_b: jax.Array,
                  rule_terms: Mapping[str, jax.Array] | None = None,
                  function_terms: Mapping[str, jax.Array] | None = None,
                  ) -> tuple[jax.Array, RewardState, dict[str, jax.Array]]:
    """Judge scores -> per-token rewards, in the order of the module docstring.

    scores_b      (B,) judge scores
    logp_br       (B, R) sampling policy's log-probs of the sampled response tokens
    logp_ref_br   (B, R) reference policy's log-probs of the same tokens
    stopped_b     (B,) bool, True where the response contains a stop token
    rule_terms    name -> (B,) rule-based reward terms, weighted by cfg.rule_weights
    function_terms name -> (B,) terms of the Python reward functions (computed on the host), weighted by
                  cfg.function_weights
    Returns (token_rewards_br, new_state, metrics). The rewards use the KL coefficient *before* this step's
    controller update; new_state holds the updated coefficient and running statistics. When kl_in_reward is
    False, give `kl_loss_term` this step's coefficient, `state.kl.coef` (also in metrics["kl/coef"]).
    """
    rule_terms = {} if rule_terms is None else dict(rule_terms)
    # Rewards are constants for the update: no gradient ever flows into the rollout's or reference's log-probs.
    scores_b, logp_br, logp_ref_br = jax.lax.stop_gradient((scores_b, logp_br, logp_ref_br))
    function_terms = {} if function_terms is None else dict(function_terms)
    rule_terms, function_terms = jax.lax.stop_gradient((rule_terms, function_terms))
    mask_br = response_mask_br.astype(jnp.float32)
    metrics: dict[str, jax.Array] = {}

    # 1 composite score
    score_b = composite_score(cfg, scores_b, rule_terms, function_terms)
    for name, term_b in sorted(rule_terms.items()):
        metrics[f"reward/rule/{name}"] = jnp.mean(term_b.astype(jnp.float32))
    for name, term_b in sorted(function_terms.items()):
        metrics[f"reward/function/{name}"] = jnp.mean(term_b.astype(jnp.float32))
    metrics["reward/composite"] = jnp.mean(score_b)

    # 2 missing stop token
    score_b = apply_missing_stop(score_b, stopped_b, cfg.missing_stop_penalty, cfg.missing_stop_mode)

    # 3 length penalty
    penalty_b = length_penalty(mask_br, cfg.length_penalty, cfg.length_target)
    score_b = score_b - penalty_b
    metrics["reward/length_penalty"] = jnp.mean(penalty_b)

    # 4 clip
    if cfg.clip > 0:
        metrics["reward/clipped_frac"] = jnp.mean((jnp.abs(score_b) > cfg.clip).astype(jnp.float32))
        score_b = jnp.clip(score_b, -cfg.clip, cfg.clip)
    metrics["reward/score_before_norm"] = jnp.mean(score_b)

    # 5 normalise. The running statistics always track the clipped score (cheap, and worth logging); they are
    # updated with this batch first, so the very first step is normalised by its own spread.
    new_norm = running_norm_update(state.norm, score_b)
    if cfg.score_norm == "whiten":
        score_b = masked_whiten(score_b, jnp.ones_like(score_b), shift_mean=cfg.norm_subtract_mean,
                                eps=cfg.norm_eps)
    elif cfg.score_norm == "running":
        score_b = running_normalize(new_norm, score_b, cfg.norm_subtract_mean, cfg.norm_eps)
    elif cfg.score_norm != "none":
        raise ValueError(f"reward.score_norm={cfg.score_norm!r}; choose one of {SCORE_NORMS}")
    metrics["reward/score"] = jnp.mean(score_b)
    metrics["reward/running_mean"] = new_norm.mean
    metrics["reward/running_std"] = running_std(new_norm)

    # 6 place the score on the stop token
    token_rewards_br = place_at_stop(score_b, mask_br)

    # 7 KL to the reference
    logp_br, logp_ref_br = _masked_log_probs(logp_br, logp_ref_br, mask_br)
    kl_all = all_kl_estimates(logp_br, logp_ref_br)  # each 0 at padding
    for name, kl_br in kl_all.items():
        # per sequence (summed over the response), batch mean: the scale kl_target is set in
        metrics[f"kl/{name}"] = jnp.mean(jnp.sum(kl_br, axis=-1))
    kl_br = kl_all[cfg.kl_estimator]
    coef = state.kl.coef
    if cfg.kl_in_reward:
        kl_penalty_br = coef * kl_br
        token_rewards_br = token_rewards_br - kl_penalty_br
        metrics["reward/kl_penalty"] = jnp.mean(jnp.sum(kl_penalty_br, axis=-1))
    metrics["kl/coef"] = coef

    # 8 whiten the per-token rewards (score and KL together) over the batch's valid tokens
    if cfg.whiten_token_rewards:
        metrics["reward/token_reward_sum_before_whiten"] = jnp.mean(jnp.sum(token_rewards_br, axis=-1))
        token_rewards_br = masked_whiten(token_rewards_br, mask_br, shift_mean=cfg.token_whiten_shift_mean,
                                         eps=cfg.norm_eps)
    metrics["reward/token_reward_sum"] = jnp.mean(jnp.sum(token_rewards_br, axis=-1))

    new_kl = kl_controller_update(cfg, state.kl, metrics[f"kl/{cfg.kl_estimator}"], scores_b.shape[0])
    return token_rewards_br, RewardState(kl=new_kl, norm=new_norm), metrics
