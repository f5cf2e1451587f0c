"""Conformance: the algorithm pieces against independent NumPy (float64) re-implementations of the references.

Each reference function below is transcribed from the named source, keeping its structure (its loops, its
variable names where they help), so that a difference in a formula, an eps, a ddof or a normaliser shows up as a
number that does not match:

  TRL 1.16      trl/trainer/grpo_trainer.py  `_generate_and_score_completions` (GRPO advantages, scale_rewards),
                                             `_compute_loss` (clipped surrogate, loss_type grpo / bnpo / dr_grpo /
                                             dapo, k3 KL term); trl/trainer/utils.py `nanstd` (Bessel-corrected);
                trl/trainer/rloo_trainer.py  (leave-one-out baseline, normalize_advantages=False by default)
  N+ details    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", github.com/vwxyzjn/
                summarize_from_feedback_details, ppo_left_padding.py: `whiten`, the GAE loop, the clipped value
                loss, the entropy from logits, `AdaptiveKLController` (Ziegler et al. 2019's controller, as in
                openai/lm-human-preferences)
  Schulman      "Approximating KL Divergence" (2020): k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r,
                r = p_ref(x) / p(x), x ~ p
  DAPO          Yu et al. 2025: token-level loss, 1 / sum_i |o_i| over the whole batch; clip-higher
  Dr. GRPO      Liu et al. 2025: no std division; token sums over a constant (the generation budget)

The KL estimators are checked against exact expectations over a small softmax (every outcome weighted by its
probability, no sampling).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import algorithms, ops, rewards


def _algo(**overrides):
    cfg = algorithms.default_config()
    cfg.update(overrides)
    algorithms.validate_config(cfg)
    return cfg


def _mask(lengths, R):
    return (np.arange(R)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _terminal_rewards(scores, lengths, R):
    """Each score on its row's last valid token (where shaping puts it), 0 elsewhere."""
    out = np.zeros((len(scores), R), np.float32)
    out[np.arange(len(scores)), np.asarray(lengths) - 1] = scores
    return out


# ------------------------------------------------------------------------------------------------- references

def trl_nanstd(x, axis=None):
    """trl/trainer/utils.py nanstd: sqrt(nanmean((x - mean)^2) * count / (count - 1))."""
    mean = np.nanmean(x, axis=axis, keepdims=True)
    variance = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    variance = variance * count / (count - 1)
    return np.sqrt(variance).squeeze(axis) if axis is not None else np.sqrt(variance).item()


def trl_grpo_advantages(rewards_, num_generations, scale_rewards="group"):
    """grpo_trainer.py, multi_objective_aggregation="sum_then_normalize"."""
    mean_grouped_rewards = np.nanmean(rewards_.reshape(-1, num_generations), axis=1)
    mean_grouped_rewards = np.repeat(mean_grouped_rewards, num_generations)
    std_rewards = np.repeat(trl_nanstd(rewards_.reshape(-1, num_generations), axis=1), num_generations)
    advantages = rewards_ - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def trl_rloo_advantages(rewards_, num_generations):
    """rloo_trainer.py: baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)."""
    grouped_rewards = rewards_.reshape(-1, num_generations)
    grouped_sum = np.nansum(grouped_rewards, axis=1, keepdims=True)
    baselines = (grouped_sum - grouped_rewards) / (num_generations - 1)
    return rewards_ - baselines.reshape(-1)


def nplus_whiten(values, shift_mean=True):
    """ppo_left_padding.py whiten: population variance (`unbiased=False`), rsqrt(var + 1e-8)."""
    mean, var = np.mean(values), np.var(values)
    whitened = (values - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def nplus_gae(rewards_, values, gamma, lam):
    """ppo_left_padding.py, "6. compute advantages and returns"."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards_.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards_[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = np.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def trl_per_token_loss(per_token_logps, old_per_token_logps, advantages, epsilon_low, epsilon_high):
    """grpo_trainer.py `_compute_loss`, loss_type in grpo / bnpo / dr_grpo / dapo, token-level importance."""
    coef_1 = np.exp(per_token_logps - old_per_token_logps)
    coef_2 = np.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages[:, None]
    per_token_loss2 = coef_2 * advantages[:, None]
    return -np.minimum(per_token_loss1, per_token_loss2)


def trl_aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch=None,
                  gradient_accumulation_steps=1):
    """grpo_trainer.py `_compute_loss`: one micro-batch's loss as TRL hands it to backward (the HF Trainer sums
    these over the accumulation window). num_items_in_batch: valid tokens of the whole window (dapo)."""
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
        return loss / gradient_accumulation_steps
    if loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
        return loss / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
        return loss / gradient_accumulation_steps
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / max(num_items_in_batch, 1.0)
    raise ValueError(loss_type)


OURS_FOR_TRL = {"dapo": "token_mean", "grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


class NplusAdaptiveKLController:
    """ppo_left_padding.py AdaptiveKLController (Ziegler et al. 2019)."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


# ------------------------------------------------------------------------------------------------- estimators

# Three groups of n = 4: mixed scores, a tie (std 0), and the issue-12 group.
GROUP_SCORES = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.9], np.float32)
GROUP_LENGTHS = np.array([5, 1, 3, 2, 4, 4, 1, 2, 5, 2, 2, 3])


@pytest.mark.parametrize("scale_std,scale_rewards", [(True, "group"), (False, "none")])
def test_grpo_advantages_equal_trl(scale_std, scale_rewards):
    mask = _mask(GROUP_LENGTHS, 5)
    out = algorithms.compute_advantages(_algo(estimator="grpo", grpo_scale_std=scale_std),
                                        _terminal_rewards(GROUP_SCORES, GROUP_LENGTHS, 5), None, mask, 4)
    want = trl_grpo_advantages(GROUP_SCORES.astype(np.float64), 4, scale_rewards)
    np.testing.assert_allclose(np.asarray(out.advantages_br), mask * want[:, None], rtol=1e-5, atol=1e-6)
    if scale_std:  # group 1: mean .5, std (ddof 1) sqrt(1/3); the tied group: 0 / (0 + 1e-4) = 0
        np.testing.assert_allclose(want[:4], np.array([1, -1, -1, 1]) * 0.5 / (np.sqrt(1 / 3) + 1e-4))
        np.testing.assert_array_equal(want[4:8], 0.0)


def test_rloo_advantages_equal_trl_and_opt_in_whitening_counts_sequences():
    mask = _mask(GROUP_LENGTHS, 5)
    token_rewards = _terminal_rewards(GROUP_SCORES, GROUP_LENGTHS, 5)
    fn = functools.partial(algorithms.compute_advantages, n_samples=4)
    got = np.asarray(fn(_algo(estimator="rloo"), token_rewards, None, mask).advantages_br)
    want = trl_rloo_advantages(GROUP_SCORES.astype(np.float64), 4)
    np.testing.assert_allclose(got, mask * want[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(want[:4], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])
    # whiten_advantages on a sequence-level estimator: the N+ whiten over the 12 sequences, not over tokens
    for shift in (True, False):
        got = np.asarray(fn(_algo(estimator="rloo", whiten_advantages=True, whiten_shift_mean=shift),
                            token_rewards, None, mask).advantages_br)
        np.testing.assert_allclose(got, mask * nplus_whiten(want, shift)[:, None], rtol=1e-5, atol=1e-6)


def test_reinforce_with_baseline_is_return_minus_prompt_value_and_targets_are_reward_to_go():
    """Williams 1992 with a state-value baseline: A = G_0 - V(s_0) on each token of the sequence (Lee et al.
    2023's sequence-level REINFORCE); V(s_t) is fitted to the Monte-Carlo reward-to-go G_t at every token."""
    rng = np.random.default_rng(0)
    lengths = [4, 1, 3]
    mask = _mask(lengths, 4)
    token_rewards = np.where(mask > 0, rng.normal(size=(3, 4)), 0.0)
    values = rng.normal(size=(3, 4))
    want_returns = np.zeros((3, 4))
    for b, n in enumerate(lengths):
        for t in range(n):
            want_returns[b, t] = sum(token_rewards[b, t:n])
    out = algorithms.compute_advantages(_algo(estimator="reinforce"), token_rewards.astype(np.float32),
                                        values.astype(np.float32), mask, 1)
    np.testing.assert_allclose(np.asarray(out.returns_br), want_returns, rtol=1e-5, atol=1e-6)
    want_adv = mask * (want_returns[:, 0] - values[:, 0])[:, None]
    np.testing.assert_allclose(np.asarray(out.advantages_br), want_adv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma,lam,whiten", [(1.0, 0.95, True), (0.9, 0.8, False)])
def test_gae_equals_the_nplus_loop(gamma, lam, whiten):
    """The reproduction's loop over the response, on episodes that end at the stop token (rewards and values 0
    after it; the reproduction itself reads the critic and a 0 reward at padded positions), then its whiten over
    the valid tokens."""
    rng = np.random.default_rng(1)
    lengths = [5, 2, 1, 4]
    mask = _mask(lengths, 5)
    rewards_ = np.where(mask > 0, rng.normal(size=(4, 5)), 0.0)
    values = np.where(mask > 0, rng.normal(size=(4, 5)), 0.0)
    want_adv, want_returns = nplus_gae(rewards_, values, gamma, lam)
    if whiten:
        valid = mask > 0
        whitened = np.zeros_like(want_adv)
        whitened[valid] = nplus_whiten(want_adv[valid])
        want_adv = whitened
    out = algorithms.compute_advantages(_algo(estimator="gae", gamma=gamma, lam=lam, whiten_advantages=whiten),
                                        rewards_.astype(np.float32), values.astype(np.float32), mask, 1)
    np.testing.assert_allclose(np.asarray(out.advantages_br), mask * want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.returns_br), mask * want_returns, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- losses

# Four sequences of a response budget R = 5, 3 + 9 valid tokens in the two halves (uneven micro-batches).
LOSS_LENGTHS = np.array([2, 1, 5, 4])
LOSS_MASK = _mask(LOSS_LENGTHS, 5)
_rng = np.random.default_rng(2)
LOGP_OLD = _rng.uniform(-3.0, -0.5, (4, 5))
# ratios in [0.6, 1.45]: some clipped at 0.2 / 0.28, none within 1e-3 of a clip edge (the max switches there)
RATIO = np.array([[0.6, 1.1, 1.0, 1.0, 1.0], [1.45, 1.0, 1.0, 1.0, 1.0], [0.9, 1.25, 0.75, 1.35, 1.05],
                  [1.15, 0.85, 1.3, 0.7, 1.0]])
LOGP_NEW = LOGP_OLD + np.log(RATIO)
SEQ_ADV = np.array([1.0, -0.5, 2.0, -1.5])


def _ours_policy_loss(logp_new, rows, agg, clip_high=0.2, norm=None):
    """Our loss on LOSS_* rows `rows`, the advantage of each sequence on its valid tokens."""
    cfg = _algo(clip_low=0.2, clip_high=clip_high, loss_agg=agg)
    mask = LOSS_MASK[rows]
    adv_br = (SEQ_ADV[rows, None] * mask).astype(np.float32)
    return algorithms.ppo_policy_loss(logp_new, jnp.asarray(LOGP_OLD[rows], jnp.float32), adv_br, mask, cfg, norm)


@pytest.mark.parametrize("clip_high", [0.2, 0.28])   # PPO's symmetric clip; DAPO's clip-higher
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_policy_loss_and_gradient_equal_trl(loss_type, clip_high):
    def trl_loss(logp_new):
        per_token = trl_per_token_loss(logp_new, LOGP_OLD, SEQ_ADV, 0.2, clip_high)
        return trl_aggregate(per_token, LOSS_MASK, loss_type, 5, num_items_in_batch=LOSS_MASK.sum())

    agg = OURS_FOR_TRL[loss_type]
    loss, metrics = _ours_policy_loss(jnp.asarray(LOGP_NEW, jnp.float32), slice(None), agg, clip_high)
    np.testing.assert_allclose(float(loss), trl_loss(LOGP_NEW), rtol=1e-5)
    # TRL's clip ratio counts (ratio < 1 - eps_low and A < 0) or (ratio > 1 + eps_high and A > 0): the tokens
    # whose clipped term is active, our clipfrac
    coef_1 = RATIO
    adv = SEQ_ADV[:, None]
    region = ((coef_1 < 0.8) & (adv < 0)) | ((coef_1 > 1 + clip_high) & (adv > 0))
    np.testing.assert_allclose(float(metrics["policy/clipfrac"]), region[LOSS_MASK > 0].mean(), rtol=1e-6)
    # gradient w.r.t. the new log-probs: central differences of TRL's loss (float64)
    grad = np.asarray(jax.grad(lambda lp: _ours_policy_loss(lp, slice(None), agg, clip_high)[0])(
        jnp.asarray(LOGP_NEW, jnp.float32)))
    want = np.zeros_like(LOGP_NEW)
    for idx in np.ndindex(LOGP_NEW.shape):
        step = np.zeros_like(LOGP_NEW)
        step[idx] = 1e-6
        want[idx] = (trl_loss(LOGP_NEW + step) - trl_loss(LOGP_NEW - step)) / 2e-6
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batch_shares_add_up_to_trl_accumulated_loss(loss_type):
    """Two micro-batches of 2 rows (3 and 9 valid tokens): our shares, normalised by the whole minibatch's
    counts, add up to the minibatch loss and to TRL's accumulated loss for the same loss_type. TRL's "bnpo"
    (per-micro-batch token mean / steps), which our token_mean computed before, weighs the two micro-batches
    differently and gives another number."""
    agg = OURS_FOR_TRL[loss_type]
    norm = ops.loss_norm(LOSS_MASK)
    whole = float(_ours_policy_loss(jnp.asarray(LOGP_NEW, jnp.float32), slice(None), agg)[0])
    shares, trl_total, bnpo_total = 0.0, 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        shares += float(_ours_policy_loss(jnp.asarray(LOGP_NEW[rows], jnp.float32), rows, agg, norm=norm)[0])
        per_token = trl_per_token_loss(LOGP_NEW[rows], LOGP_OLD[rows], SEQ_ADV[rows], 0.2, 0.2)
        trl_total += trl_aggregate(per_token, LOSS_MASK[rows], loss_type, 5, LOSS_MASK.sum(), 2)
        bnpo_total += trl_aggregate(per_token, LOSS_MASK[rows], "bnpo", 5, None, 2)
    np.testing.assert_allclose(shares, whole, rtol=1e-5)
    np.testing.assert_allclose(shares, trl_total, rtol=1e-5)
    if loss_type == "dapo":
        assert abs(bnpo_total - trl_total) > 0.05 * abs(trl_total)


@pytest.mark.parametrize("agg", ops.LOSS_AGGS)
def test_aggregation_shares_of_every_term_add_up(agg):
    """Entropy, value loss and KL loss term use the same shares: the sum over micro-batches is the minibatch's."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 5, 7)).astype(np.float32)
    v_new, v_old, ret = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
    ref = rng.uniform(-3.0, -0.5, (4, 5)).astype(np.float32)
    cfg = _algo(loss_agg=agg, ent_coef=0.01, vf_clip=0.2)

    def terms(rows, norm):
        m = LOSS_MASK[rows]
        return np.array([float(algorithms.entropy_loss(logits[rows], m, cfg, norm)[0]),
                         float(algorithms.value_loss(v_new[rows], v_old[rows], ret[rows], m, cfg, norm)[0]),
                         float(rewards.kl_loss_term(LOGP_NEW[rows].astype(np.float32), ref[rows], m,
                                                    jnp.float32(0.1), "k3", agg, norm)[0])])

    norm = ops.loss_norm(LOSS_MASK)
    np.testing.assert_allclose(terms(slice(0, 2), norm) + terms(slice(2, 4), norm), terms(slice(0, 4), None),
                               rtol=1e-5)


def test_value_loss_and_entropy_equal_nplus():
    """vf_losses1 / vf_losses2 / 0.5 * max, clipfrac (vf_losses2 > vf_losses1), and the entropy from logits
    (logsumexp - sum p * logits), as token means over the valid tokens."""
    rng = np.random.default_rng(4)
    vpred, mb_values, mb_return = rng.normal(size=(3, 4, 5))
    logits = 3.0 * rng.normal(size=(4, 5, 6))
    valid = LOSS_MASK > 0
    vpredclipped = np.clip(vpred, mb_values - 0.2, mb_values + 0.2)
    vf_losses1 = np.square(vpred - mb_return)
    vf_losses2 = np.square(vpredclipped - mb_return)
    vf_loss = 0.5 * np.maximum(vf_losses1, vf_losses2)[valid].mean()
    vf_clipfrac = (vf_losses2 > vf_losses1)[valid].mean()
    prob_dist = np.exp(logits - logits.max(-1, keepdims=True))
    prob_dist /= prob_dist.sum(-1, keepdims=True)
    logsumexp = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    entropy = (logsumexp - np.sum(prob_dist * logits, axis=-1))[valid].mean()

    cfg = _algo(vf_clip=0.2, vf_coef=0.1, ent_coef=1.0)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    loss, m = algorithms.value_loss(f32(vpred), f32(mb_values), f32(mb_return), LOSS_MASK, cfg)
    np.testing.assert_allclose(float(m["value/loss"]), vf_loss, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.1 * vf_loss, rtol=1e-5)
    np.testing.assert_allclose(float(m["value/clipfrac"]), vf_clipfrac, rtol=1e-6)
    _, m = algorithms.entropy_loss(f32(logits), LOSS_MASK, cfg)
    np.testing.assert_allclose(float(m["policy/entropy"]), entropy, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- KL

P_LOGITS = np.array([1.0, -0.5, 0.3, 2.0, -1.2])
REF_LOGITS = np.array([0.2, 0.4, -0.3, 1.1, 0.0])


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_kl_estimators_exact_expectations_and_gradients():
    """Over x ~ p = softmax(theta), exactly (every outcome weighted by p(x)), with r = q(x) / p(x), q = ref:

      values     E[k1] = E[k3] = KL(p || q);  E[k2] = E[(log r)^2] / 2        (Schulman 2020)
      gradients  of E_x[k(log p_theta(x), log q(x))] with the samples held fixed (a loss on sampled tokens):
                 k1 -> 0 (E[grad log p] = 0), k2 -> grad KL(p || q), k3 -> grad KL(q || p) = p - q
    """
    p, q = _softmax(P_LOGITS), _softmax(REF_LOGITS)
    log_ratio = np.log(p) - np.log(q)
    kl_pq = np.sum(p * log_ratio)
    want_values = {"k1": kl_pq, "k2": 0.5 * np.sum(p * log_ratio ** 2), "k3": kl_pq}
    # d KL(p||q) / d theta for softmax logits: p * (log_ratio - KL(p||q)); d KL(q||p) / d theta = p - q
    want_grads = {"k1": np.zeros(5), "k2": p * (log_ratio - kl_pq), "k3": p - q}
    logq = jnp.asarray(np.log(q), jnp.float32)
    weights = jnp.asarray(p, jnp.float32)  # the sampling distribution: fixed, no gradient through it

    for name in ops.KL_ESTIMATORS:
        def expected(theta):
            return jnp.sum(weights * ops.kl_estimate(name, jax.nn.log_softmax(theta), logq))

        theta = jnp.asarray(P_LOGITS, jnp.float32)
        np.testing.assert_allclose(float(expected(theta)), want_values[name], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(jax.grad(expected)(theta)), want_grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    # the k3 loss term is TRL's per_token_kl = exp(ref - logp) - (ref - logp) - 1
    logp = np.log(p)
    trl_k3 = np.exp(np.log(q) - logp) - (np.log(q) - logp) - 1
    np.testing.assert_allclose(np.asarray(ops.kl_estimate("k3", jnp.asarray(logp, jnp.float32), logq)), trl_k3,
                               rtol=1e-5, atol=1e-7)


def test_adaptive_kl_controller_equals_ziegler():
    """The coefficient after a sequence of steps, fed by shape_rewards with the reproduction's measured KL
    (k1 summed over each response, batch mean) and n_steps = batch size."""
    cfg = rewards.default_config()
    cfg.update(adaptive_kl=True, kl_coef=0.1, kl_target=0.5, kl_horizon=20, kl_estimator="k1",
               missing_stop_mode="none")
    rewards.validate_config(cfg)
    reference = NplusAdaptiveKLController(0.1, 0.5, 20)
    state = rewards.init_state(cfg)
    rng = np.random.default_rng(5)
    mask = LOSS_MASK
    shape = jax.jit(functools.partial(rewards.shape_rewards, cfg))
    for scale in (0.05, 0.3, 1.0, 0.02, 0.6):   # measured KL below, near and above the target (clipped errors)
        logp = rng.uniform(-2.0, -0.5, (4, 5))
        logp_ref = logp - scale * rng.uniform(0.0, 1.0, (4, 5))
        _, state, _ = shape(state, np.ones(4, np.float32), logp.astype(np.float32),
                                  logp_ref.astype(np.float32), mask, np.ones(4, bool))
        reference.update(((logp - logp_ref) * mask).sum(1).mean(), 4)
        np.testing.assert_allclose(float(state.kl.coef), reference.value, rtol=2e-6)
    assert reference.value != 0.1
