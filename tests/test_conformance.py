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
  TRL online    trl/experimental/online_dpo/online_dpo_trainer.py `training_step` (TRL 1.16): chosen / rejected
  DPO           of two completions per prompt, sequence log-prob sums, loss_type "sigmoid", its rewards/* metrics;
                with a judge (TRL 0.x's trl/trainer/online_dpo_trainer.py) the first is chosen when ranked first

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


def trl_online_dpo_loss(logprobs, ref_logprobs, completion_mask, mask, beta):
    """online_dpo_trainer.py `training_step`, loss_type "sigmoid": rows 0..B-1 are the first completions of prompts
    0..B-1, rows B..2B-1 the second; mask (B,) bool: the first completion is chosen."""
    batch_size = mask.shape[0]
    batch_range = np.arange(batch_size)
    chosen_indices = batch_range + (~mask * batch_size)
    rejected_indices = batch_range + (mask * batch_size)
    cr_indices = np.concatenate((chosen_indices, rejected_indices))
    cr_logprobs = logprobs[cr_indices]
    cr_ref_logprobs = ref_logprobs[cr_indices]
    padding_mask = ~completion_mask.astype(bool)
    cr_padding_mask = padding_mask[cr_indices]
    cr_logprobs_sum = (cr_logprobs * ~cr_padding_mask).sum(1)
    cr_ref_logprobs_sum = (cr_ref_logprobs * ~cr_padding_mask).sum(1)
    chosen_logprobs_sum, rejected_logprobs_sum = np.split(cr_logprobs_sum, 2)
    chosen_ref_logprobs_sum, rejected_ref_logprobs_sum = np.split(cr_ref_logprobs_sum, 2)
    pi_logratios = chosen_logprobs_sum - rejected_logprobs_sum
    ref_logratios = chosen_ref_logprobs_sum - rejected_ref_logprobs_sum
    logits = pi_logratios - ref_logratios
    losses = np.logaddexp(0.0, -beta * logits)  # -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (chosen_logprobs_sum - chosen_ref_logprobs_sum)
    rejected_rewards = beta * (rejected_logprobs_sum - rejected_ref_logprobs_sum)
    margin = chosen_rewards - rejected_rewards
    return losses.mean(), {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                           "rewards/margins": margin.mean(), "rewards/accuracies": (margin > 0).mean()}


def np_choose_pairs(p_first_better, n):
    """Best and worst of each prompt's n samples by mean preference over the others, from P(i > j) of the pairs
    i < j in lexicographic order; ties to the lower index. Returns global (chosen rows, rejected rows, win rates)."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen, rejected, win_rates = [], [], []
    for g in range(len(p_first_better) // len(pairs)):
        wins = np.zeros(n)
        for k, (i, j) in enumerate(pairs):
            wins[i] += p_first_better[g * len(pairs) + k]
            wins[j] += 1.0 - p_first_better[g * len(pairs) + k]
        wins /= n - 1
        best = max(range(n), key=lambda i: (wins[i], -i))
        worst = min((i for i in range(n) if i != best), key=lambda i: (wins[i], i))
        chosen.append(g * n + best)
        rejected.append(g * n + worst)
        win_rates.extend(wins)
    return np.array(chosen), np.array(rejected), np.array(win_rates)


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
        entropy = algorithms.entropy_from_logits(logits[rows], m)
        return np.array([float(algorithms.entropy_loss(entropy, m, cfg, norm)[0]),
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
    _, m = algorithms.entropy_loss(algorithms.entropy_from_logits(f32(logits), LOSS_MASK), LOSS_MASK, cfg)
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


# ------------------------------------------------------------------------------------------------- online DPO

@pytest.mark.parametrize("n", [2, 3, 4])
def test_choose_pairs_equals_numpy_best_and_worst(n):
    """Random preferences for 6 prompts, plus a prompt the judge cannot tell apart (every P = 1/2: the first sample
    is chosen, the second rejected, as TRL's `first_half >= second_half` on a tie)."""
    K = n * (n - 1) // 2
    p = np.concatenate([np.random.default_rng(n).uniform(0.0, 1.0, 6 * K), np.full(K, 0.5)]).astype(np.float32)
    chosen, rejected = algorithms.choose_pairs(algorithms.win_rates(p, n), n)
    want_chosen, want_rejected, want_wins = np_choose_pairs(p.astype(np.float64), n)
    np.testing.assert_allclose(np.asarray(algorithms.win_rates(p, n)), want_wins, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(chosen), want_chosen)
    np.testing.assert_array_equal(np.asarray(rejected), want_rejected)
    assert (want_chosen[-1], want_rejected[-1]) == (6 * n, 6 * n + 1)


def test_choose_pairs_hand_computed():
    """n = 3, P(0 > 1) = .8, P(0 > 2) = .3, P(1 > 2) = .4: win rates (.55, .3, .65): sample 2 chosen, 1 rejected;
    n = 2: P(0 > 1) = .3 makes the second sample the chosen one."""
    wins = algorithms.win_rates(np.array([0.8, 0.3, 0.4]), 3)
    np.testing.assert_allclose(np.asarray(wins), [0.55, 0.3, 0.65], rtol=1e-6)
    assert [int(rows[0]) for rows in algorithms.choose_pairs(wins, 3)] == [2, 1]
    assert [int(rows[0]) for rows in algorithms.choose_pairs(algorithms.win_rates(np.array([0.3]), 2), 2)] == [1, 0]


def test_dpo_loss_hand_computed():
    """log pi(y_c) = -3, log pi_ref(y_c) = -4, log pi(y_r) = -5, log pi_ref(y_r) = -4, beta = 0.1: r_c = 0.1,
    r_r = -0.1, loss = log(1 + exp(-0.2)) = 0.5981389; d loss / d log pi(y_c) = -beta sigmoid(-0.2) = -0.0450166."""
    args = [jnp.array([x], jnp.float32) for x in (-3.0, -5.0, -4.0, -4.0)]
    loss, metrics = algorithms.dpo_loss(*args, 0.1)
    np.testing.assert_allclose(float(loss), 0.5981389, rtol=1e-6)
    np.testing.assert_allclose([float(metrics[k]) for k in ("dpo/chosen_reward", "dpo/rejected_reward",
                                                           "dpo/reward_margin", "dpo/accuracy")],
                               [0.1, -0.1, 0.2, 1.0], rtol=1e-6)
    grads = jax.grad(lambda c, r: algorithms.dpo_loss(c, r, *args[2:], 0.1)[0], argnums=(0, 1))(*args[:2])
    np.testing.assert_allclose([float(grads[0][0]), float(grads[1][0])], [-0.0450166, 0.0450166], rtol=1e-5)


def test_online_dpo_loss_metrics_and_gradient_equal_trl():
    """Five prompts, two completions each of 1 to 4 tokens (garbage log-probs on padding), judge preferences with
    a tie: our choice (`win_rates`, `choose_pairs`), sequence sums and `dpo_loss` give TRL's loss, metrics and
    gradient w.r.t. every per-token log-prob (central differences of TRL's loss, float64). Micro-batches of 3
    and 2 pairs, each normalised by the 5 pairs, add up to the whole."""
    B, R, beta = 5, 4, 0.1
    rng = np.random.default_rng(7)
    logprobs, ref_logprobs = rng.uniform(-3.0, -0.1, (2, 2 * B, R))
    completion_mask = _mask(rng.integers(1, R + 1, 2 * B), R)
    logprobs = np.where(completion_mask > 0, logprobs, 50.0)  # padding must not count
    p_first_better = np.array([0.9, 0.2, 0.5, 0.6, 0.05])
    want_loss, want_metrics = trl_online_dpo_loss(logprobs, ref_logprobs, completion_mask, p_first_better >= 0.5,
                                                  beta)
    # Our rows are prompt-major (prompt g's samples at 2g, 2g + 1); TRL's row g + j B is our row 2g + j.
    ours = np.stack([np.arange(B), np.arange(B) + B], axis=1).reshape(-1)
    chosen, rejected = algorithms.choose_pairs(algorithms.win_rates(p_first_better, 2), 2)
    mask = completion_mask[ours]
    ref_sum = ops.masked_sum(jnp.asarray(ref_logprobs[ours], jnp.float32), mask, axis=-1)

    def our_loss(logp_br, pairs=slice(None), norm=None):
        logp_sum = ops.masked_sum(logp_br, mask, axis=-1)
        c, r = chosen[pairs], rejected[pairs]
        return algorithms.dpo_loss(logp_sum[c], logp_sum[r], ref_sum[c], ref_sum[r], beta, norm)

    logp = jnp.asarray(logprobs[ours], jnp.float32)
    loss, metrics = our_loss(logp)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for ours_name, trl_name in (("dpo/chosen_reward", "rewards/chosen"), ("dpo/rejected_reward", "rewards/rejected"),
                                ("dpo/reward_margin", "rewards/margins"), ("dpo/accuracy", "rewards/accuracies")):
        np.testing.assert_allclose(float(metrics[ours_name]), want_metrics[trl_name], rtol=1e-5, atol=1e-7)
    grad = np.asarray(jax.grad(lambda lp: our_loss(lp)[0])(logp))
    want = np.zeros_like(logprobs)
    for idx in np.ndindex(logprobs.shape):
        step = np.zeros_like(logprobs)
        step[idx] = 1e-6
        want[idx] = (trl_online_dpo_loss(logprobs + step, ref_logprobs, completion_mask, p_first_better >= 0.5, beta)[0]
                     - trl_online_dpo_loss(logprobs - step, ref_logprobs, completion_mask, p_first_better >= 0.5,
                                           beta)[0]) / 2e-6
    np.testing.assert_allclose(grad, want[ours], rtol=1e-4, atol=1e-7)
    assert np.abs(want).max() > 1e-3
    shares = [our_loss(logp, pairs, B) for pairs in (slice(0, 3), slice(3, 5))]
    np.testing.assert_allclose(float(shares[0][0] + shares[1][0]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(shares[0][1]["dpo/accuracy"] + shares[1][1]["dpo/accuracy"]),
                               want_metrics["rewards/accuracies"], rtol=1e-6)
