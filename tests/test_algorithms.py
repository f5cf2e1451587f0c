"""algorithms.py against NumPy loops and hand-computed numbers; every function is exercised under jax.jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import algorithms, ops


def _cfg(**overrides):
    cfg = algorithms.default_config()
    cfg.update(overrides)
    algorithms.validate_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------- GAE

def _np_gae(rewards, values, lengths, gamma, lam):
    B, R = rewards.shape
    adv = np.zeros((B, R))
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = np.zeros((B, R))
    for b in range(B):
        ret[b, :lengths[b]] = adv[b, :lengths[b]] + values[b, :lengths[b]]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [5, 2, 1, 3]
    B, R = 4, 5
    mask = np.array([[1.0] * n + [0.0] * (R - n) for n in lengths], np.float32)
    rewards = rng.normal(size=(B, R)).astype(np.float32)
    values = rng.normal(size=(B, R)).astype(np.float32)
    want_adv, want_ret = _np_gae(rewards, values, lengths, gamma, lam)
    # garbage after the stop token must not leak backwards
    rewards[mask == 0] = np.nan
    values[mask == 0] = 1e30
    got = jax.jit(algorithms.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(got.advantages_br), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.returns_br), want_ret, rtol=1e-5, atol=1e-5)


def test_compute_advantages_gae_whitened():
    rng = np.random.default_rng(1)
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    rewards = rng.normal(size=(2, 3)).astype(np.float32)
    values = rng.normal(size=(2, 3)).astype(np.float32)
    adv, ret = _np_gae(rewards, values, [3, 1], 1.0, 0.9)
    valid = adv[mask > 0]
    for shift in (True, False):
        cfg = _cfg(estimator="gae", gamma=1.0, lam=0.9, whiten_advantages=True, whiten_shift_mean=shift)
        out = jax.jit(functools.partial(algorithms.compute_advantages, cfg, n_samples=1))(rewards, values, mask)
        want = (adv - valid.mean()) / np.sqrt(valid.var() + 1e-8) + (0.0 if shift else valid.mean())
        np.testing.assert_allclose(np.asarray(out.advantages_br), np.where(mask > 0, want, 0.0), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.returns_br), ret, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- critic-free

SCORES = np.array([1.0, 3.0, 2.0, 0.0, 0.0, 5.0], np.float32)   # 2 prompts x n = 3
MASK = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
# Each score on its row's last valid token, garbage at padding: the sequence return G_0 is the score.
TOKEN_REWARDS = np.where(MASK > 0, 0.0, np.nan).astype(np.float32)
TOKEN_REWARDS[np.arange(6), MASK.sum(1).astype(int) - 1] = SCORES


def _np_grpo(scores, n, scale):
    out = np.zeros(len(scores))
    for g in range(len(scores) // n):
        grp = scores[g * n:(g + 1) * n].astype(np.float64)
        m = sum(grp) / n
        s = np.sqrt(sum((x - m) ** 2 for x in grp) / (n - 1))
        for i in range(n):
            out[g * n + i] = (grp[i] - m) / (s + 1e-4) if scale else grp[i] - m
    return out


def _np_rloo(scores, n):
    out = np.zeros(len(scores))
    for g in range(len(scores) // n):
        for i in range(n):
            others = [scores[g * n + j] for j in range(n) if j != i]
            out[g * n + i] = scores[g * n + i] - sum(others) / (n - 1)
    return out


@pytest.mark.parametrize("estimator,scale", [("grpo", True), ("grpo", False), ("rloo", None)])
def test_group_estimators_match_numpy(estimator, scale):
    cfg = _cfg(estimator=estimator, grpo_scale_std=bool(scale))
    fn = jax.jit(functools.partial(algorithms.compute_advantages, cfg, n_samples=3))
    out = fn(TOKEN_REWARDS, None, MASK)
    per_seq = _np_grpo(SCORES, 3, scale) if estimator == "grpo" else _np_rloo(SCORES, 3)
    np.testing.assert_allclose(np.asarray(out.advantages_br), MASK * per_seq[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.returns_br), MASK * SCORES[:, None], rtol=1e-6)


def test_grpo_default_ignores_other_groups_lengths():
    """Issue 12's example: scores [1, .9, .9, .9 | 1, 1, 1, .9], lengths [30, 2, 2, 2 | 2, 2, 2, 2]. The default
    GRPO advantage of a row depends on its group's scores only, so the second group's best answers are positive
    (+0.499); whitening the advantages over tokens afterwards (the old default) made them negative."""
    scores = np.array([1.0, 0.9, 0.9, 0.9, 1.0, 1.0, 1.0, 0.9], np.float32)
    lengths = np.array([30, 2, 2, 2, 2, 2, 2, 2])
    mask = (np.arange(30)[None, :] < lengths[:, None]).astype(np.float32)
    token_rewards = np.zeros((8, 30), np.float32)
    token_rewards[np.arange(8), lengths - 1] = scores
    fn = functools.partial(algorithms.compute_advantages, n_samples=4)
    adv = np.asarray(fn(_cfg(estimator="grpo"), token_rewards, None, mask).advantages_br)[:, 0]
    # group 2: mean .975, std (ddof 1) .05 -> (1 - .975) / (.05 + 1e-4) for each of its three 1s
    np.testing.assert_allclose(adv[4:7], 0.025 / 0.0501, rtol=1e-4)
    np.testing.assert_allclose(adv, _np_grpo(scores, 4, True), rtol=1e-4)
    token_whitened = np.asarray(ops.masked_whiten(jnp.asarray(adv)[:, None] * mask, mask))[:, 0]
    assert (token_whitened[4:7] < 0).all()   # what the old default did to them
    # Opt-in whitening of a sequence-level estimator counts sequences: each group's advantages sum to 0, so the
    # mean is 0 and the best answers stay positive.
    whitened = np.asarray(fn(_cfg(estimator="grpo", whiten_advantages=True), token_rewards, None, mask)
                          .advantages_br)[:, 0]
    np.testing.assert_allclose(whitened, adv / adv.std(), rtol=1e-4)


def test_rloo_hand_values_and_group_errors():
    # group [1, 3, 2]: 1 - 2.5, 3 - 1.5, 2 - 2 ; group [0, 0, 5]: 0 - 2.5, 0 - 2.5, 5 - 0
    np.testing.assert_allclose(np.asarray(algorithms.rloo_advantages(jnp.asarray(SCORES), 3)),
                               [-1.5, 1.5, 0.0, -2.5, -2.5, 5.0], rtol=1e-6)
    with pytest.raises(ValueError, match="n_samples >= 2"):
        algorithms.grpo_advantages(jnp.asarray(SCORES), 1)
    with pytest.raises(ValueError, match="groups of 4"):
        algorithms.rloo_advantages(jnp.asarray(SCORES), 4)


def test_reinforce_baseline_and_reward_to_go_targets():
    """A = G_0 - V(s_0) on every valid token; the value targets are the reward-to-go G_t at every token (with
    per-token rewards, e.g. a KL penalty, G_t differs from the sequence return after the first token)."""
    rng = np.random.default_rng(4)
    values = rng.normal(size=(6, 3)).astype(np.float32)
    token_rewards = np.where(MASK > 0, rng.normal(size=(6, 3)), np.nan).astype(np.float32)
    to_go = np.zeros((6, 3))
    for b in range(6):
        running = 0.0
        for t in reversed(range(int(MASK[b].sum()))):
            running += float(token_rewards[b, t])
            to_go[b, t] = running
    out = jax.jit(functools.partial(algorithms.compute_advantages, _cfg(estimator="reinforce"), n_samples=3))(
        token_rewards, values, MASK)
    np.testing.assert_allclose(np.asarray(out.returns_br), to_go, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.advantages_br), MASK * (to_go[:, 0] - values[:, 0])[:, None],
                               rtol=1e-5, atol=1e-6)
    # the baseline gets no policy gradient
    g = jax.grad(lambda v: algorithms.reinforce_advantages(jnp.asarray(SCORES), v).sum())(jnp.asarray(values))
    assert not np.asarray(g).any()


# ------------------------------------------------------------------------------------------------- PPO losses

# 2 x 3 example, clip range [1 - 0.2, 1 + 0.3] = [0.8, 1.3]; row 1 has 2 valid tokens.
#   token   ratio   A    -A*ratio   -A*clip(ratio)   max     clipped term active
#   (0,0)   1.0     1     -1.0       -1.0            -1.0    no
#   (0,1)   1.5     1     -1.5       -1.3            -1.3    yes
#   (0,2)   0.5    -1      0.5        0.8             0.8    yes
#   (1,0)   0.7    -2      1.4        1.6             1.6    yes
#   (1,1)   1.1     2     -2.2       -2.2            -2.2    no
# token_mean = (-1 - 1.3 + 0.8 + 1.6 - 2.2) / 5 = -0.42 ; seq_mean_token_mean = mean((-1.5)/3, (-0.6)/2) = -0.4 ;
# seq_mean_token_sum_norm = (-1.5 - 0.6) / (2 sequences * R = 3) = -0.35
# clipfrac = 3/5. d loss/d logp_new (token_mean) = -A*ratio/5 where not clipped, else 0.
PPO_MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
PPO_RATIO = np.array([[1.0, 1.5, 0.5], [0.7, 1.1, 1.0]])
PPO_ADV = np.array([[1.0, 1.0, -1.0], [-2.0, 2.0, 5.0]], np.float32)
PPO_OLD = np.full((2, 3), -1.0, np.float32)
PPO_NEW = (PPO_OLD + np.log(PPO_RATIO)).astype(np.float32)
PPO_NEW[1, 2] = 200.0   # padding: exp(201) overflows f32; must not become a NaN loss or gradient


@pytest.mark.parametrize("agg,want", [("token_mean", -0.42), ("seq_mean_token_mean", -0.4),
                                      ("seq_mean_token_sum_norm", -0.35)])
def test_ppo_policy_loss_hand_computed(agg, want):
    cfg = _cfg(clip_low=0.2, clip_high=0.3, loss_agg=agg)
    loss_fn = jax.jit(lambda new: algorithms.ppo_policy_loss(new, PPO_OLD, PPO_ADV, PPO_MASK, cfg))
    loss, metrics = loss_fn(PPO_NEW)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["policy/clipfrac"]), 0.6, rtol=1e-6)
    r = PPO_RATIO[PPO_MASK > 0]
    np.testing.assert_allclose(float(metrics["policy/approx_kl_k3"]), np.mean((r - 1) - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["policy/approx_kl_k2"]), np.mean(0.5 * np.log(r) ** 2), rtol=1e-5)
    grad = np.asarray(jax.jit(jax.grad(lambda new: loss_fn(new)[0]))(PPO_NEW))
    if agg == "token_mean":
        want_grad = np.array([[-1.0 * 1.0 / 5, 0.0, 0.0], [0.0, -2.0 * 1.1 / 5, 0.0]])
    elif agg == "seq_mean_token_mean":   # row 0 weighs 1/(2*3) per token, row 1 1/(2*2)
        want_grad = np.array([[-1.0 * 1.0 / 6, 0.0, 0.0], [0.0, -2.0 * 1.1 / 4, 0.0]])
    else:   # every token weighs 1/(2*3)
        want_grad = np.array([[-1.0 * 1.0 / 6, 0.0, 0.0], [0.0, -2.0 * 1.1 / 6, 0.0]])
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_value_loss_clipping_hand_computed():
    # old [0, 0, 1], new [0.5, -0.1, 1.0], returns [1, 0, 0], vf_clip 0.2:
    #   t0: (0.5-1)^2 = .25 vs clipped 0.2 -> (0.2-1)^2 = .64 -> .64 (clip active)
    #   t1: .01 vs .01 -> .01 ; t2: 1 vs 1 -> 1 ; last column is padding
    old = np.array([[0.0, 0.0, 1.0, 0.0]], np.float32)
    new = np.array([[0.5, -0.1, 1.0, np.nan]], np.float32)
    ret = np.array([[1.0, 0.0, 0.0, 1e9]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    loss, m = jax.jit(lambda n: algorithms.value_loss(n, old, ret, mask, _cfg(vf_clip=0.2, vf_coef=0.1)))(new)
    np.testing.assert_allclose(float(m["value/loss"]), 0.5 * (0.64 + 0.01 + 1.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.1 * 0.5 * (0.64 + 0.01 + 1.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(m["value/clipfrac"]), 1 / 3, rtol=1e-6)
    loss_off, m_off = algorithms.value_loss(new, old, ret, mask, _cfg(vf_clip=0.0, vf_coef=0.1))
    np.testing.assert_allclose(float(m_off["value/loss"]), 0.5 * (0.25 + 0.01 + 1.0) / 3, rtol=1e-5)


def test_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    logits = (3 * rng.normal(size=(2, 3, 7))).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    want = np.zeros((2, 3))
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                z = logits[b, t].astype(np.float64)
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                want[b, t] = -sum(pi * np.log(pi) for pi in p)
    got = jax.jit(algorithms.entropy_from_logits)(logits, mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    loss, m = algorithms.entropy_loss(got, mask, _cfg(ent_coef=0.01, loss_agg="seq_mean_token_mean"))
    seq_mean = np.mean([want[0, :2].mean(), want[1, 0]])
    np.testing.assert_allclose(float(m["policy/entropy"]), seq_mean, rtol=1e-5)
    np.testing.assert_allclose(float(loss), -0.01 * seq_mean, rtol=1e-5)


def test_explained_variance_matches_numpy():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 4)).astype(np.float32)
    returns = (values + 0.3 * rng.normal(size=(3, 4))).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    v, r = values[mask > 0].astype(np.float64), returns[mask > 0].astype(np.float64)
    got = jax.jit(algorithms.explained_variance)(values, returns, mask)
    np.testing.assert_allclose(float(got), 1 - np.var(r - v) / np.var(r), rtol=1e-4)
    assert np.isnan(float(algorithms.explained_variance(values, np.ones_like(returns), mask)))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="estimator"):
        _cfg(estimator="dpo")
    with pytest.raises(ValueError, match="loss_agg"):
        _cfg(loss_agg="seq_mean")
    with pytest.raises(ValueError, match="algo.gamma=0.99 discounts only GAE"):
        _cfg(estimator="grpo", gamma=0.99)
    with pytest.raises(ValueError, match="algo.dpo_beta=0.0 must be > 0"):
        _cfg(estimator="online_dpo", dpo_beta=0.0)
    with pytest.raises(ValueError, match="algo.dpo_beta=0.5 applies to online_dpo only, not 'grpo'"):
        _cfg(estimator="grpo", dpo_beta=0.5)
    with pytest.raises(ValueError, match="algo.clip_high=0.28 is a PPO-family setting that online_dpo does not use"):
        _cfg(estimator="online_dpo", clip_high=0.28)
    _cfg(estimator="online_dpo", dpo_beta=0.5)
    _cfg(estimator="gae", gamma=0.99)
