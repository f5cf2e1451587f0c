"""rewards.py against NumPy loops and hand-computed numbers; every function is exercised under jax.jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import ops, rewards

NEG_INF = -np.inf


def _cfg(**overrides):
    cfg = rewards.default_config()
    cfg.update(overrides)
    rewards.validate_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------- KL estimators

def _np_kl(name, logp, logp_ref):
    out = np.zeros_like(logp, dtype=np.float64)
    for idx in np.ndindex(logp.shape):
        d = float(logp[idx]) - float(logp_ref[idx])
        if name == "k1":
            out[idx] = d
        elif name == "k2":
            out[idx] = 0.5 * d * d
        else:
            r = np.exp(-d)
            out[idx] = (r - 1.0) - np.log(r)
    return out


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(name):
    rng = np.random.default_rng(0)
    logp = rng.normal(-2.0, 1.0, size=(3, 5)).astype(np.float32)
    logp_ref = logp + rng.normal(0.0, 0.5, size=(3, 5)).astype(np.float32)
    got = jax.jit(ops.kl_estimate, static_argnums=0)(name, logp, logp_ref)
    np.testing.assert_allclose(np.asarray(got), _np_kl(name, logp, logp_ref), rtol=1e-5, atol=1e-6)
    both = ops.all_kl_estimates(jnp.asarray(logp), jnp.asarray(logp_ref))
    np.testing.assert_allclose(np.asarray(both[name]), np.asarray(got), rtol=1e-6)


def test_k3_is_accurate_and_nonnegative_for_close_policies():
    logp = np.array([-1.0, -1.0, -1.0], np.float32)
    delta = np.array([1e-4, -1e-4, 0.0], np.float32)
    got = np.asarray(ops.kl_estimate("k3", logp, logp + delta))
    # (r - 1) - log r ~= d^2 / 2 for small d
    np.testing.assert_allclose(got, 0.5 * delta.astype(np.float64) ** 2, rtol=1e-2, atol=1e-12)
    assert (got >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        ops.kl_estimate("k4", logp, logp)


# ------------------------------------------------------------------------------------------------- KL controller

def test_adaptive_kl_controller_hand_computed_sequence():
    cfg = _cfg(kl_coef=0.1, adaptive_kl=True, kl_target=6.0, kl_horizon=100)
    update = jax.jit(functools.partial(rewards.kl_controller_update, cfg), static_argnums=2)
    state = rewards.kl_controller_init(cfg)
    expected = [
        0.1 * (1 + 0.2 * 10 / 100),            # kl 12: 12/6-1 = 1 -> clipped to 0.2  => 0.102
        0.102 * (1 - 0.2 * 10 / 100),          # kl 3: 3/6-1 = -0.5 -> clipped to -0.2 => 0.09996
        0.09996 * (1 + 0.1 * 10 / 100),        # kl 6.6: 6.6/6-1 = 0.1 (inside the clip) => 0.1009596
    ]
    np.testing.assert_allclose(expected, [0.102, 0.09996, 0.1009596], rtol=1e-12)
    for kl, want in zip([12.0, 3.0, 6.6], expected):
        state = update(state, jnp.float32(kl), 10)
        np.testing.assert_allclose(float(state.coef), want, rtol=1e-6)


def test_fixed_kl_controller_does_not_move():
    cfg = _cfg(kl_coef=0.1, adaptive_kl=False)
    state = rewards.kl_controller_update(cfg, rewards.kl_controller_init(cfg), jnp.float32(100.0), 10)
    assert float(state.coef) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------- normaliser

def test_running_normaliser_matches_concatenation():
    rng = np.random.default_rng(1)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (4, 7, 1, 5)]
    update = jax.jit(rewards.running_norm_update)
    state = rewards.running_norm_init()
    seen = []
    for batch in batches:
        state = update(state, batch)
        seen.append(batch)
        allx = np.concatenate(seen).astype(np.float64)
        assert float(state.count) == len(allx)
        np.testing.assert_allclose(float(state.mean), np.mean(allx), rtol=1e-5)
        np.testing.assert_allclose(float(state.m2) / float(state.count), np.var(allx), rtol=1e-5)
        np.testing.assert_allclose(float(rewards.running_std(state)), np.std(allx), rtol=1e-5)
    x = np.array([1.0, -2.0], np.float32)
    allx = np.concatenate(seen)
    np.testing.assert_allclose(np.asarray(rewards.running_normalize(state, x, True, 0.0)),
                               (x - allx.mean()) / allx.std(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(rewards.running_normalize(state, x, False, 0.0)),
                               x / allx.std(), rtol=1e-4)


# ------------------------------------------------------------------------------------------------- masked stats

def test_masked_whiten_and_aggregate_ignore_padding():
    x = np.array([[1.0, 2.0, np.nan], [4.0, np.inf, -7.0]], np.float32)   # garbage at padding
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    valid = np.array([1.0, 2.0, 4.0])
    mean, std = valid.mean(), valid.std()
    whiten = jax.jit(ops.masked_whiten, static_argnums=(2,))
    got = np.asarray(whiten(x, mask, True))
    want = np.array([[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got_keep = np.asarray(whiten(x, mask, False))
    np.testing.assert_allclose(got_keep, np.where(mask > 0, want + mean, 0.0), rtol=1e-5, atol=1e-6)

    agg = jax.jit(ops.aggregate, static_argnums=2)
    np.testing.assert_allclose(float(agg(x, mask, "token_mean")), 7.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(float(agg(x, mask, "seq_mean_token_mean")), (1.5 + 4.0) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(agg(x, mask, "seq_mean_token_sum_norm")), (3.0 + 4.0) / (2 * 3), rtol=1e-6)
    # a row with no valid token does not count as a sequence
    mask_empty = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    np.testing.assert_allclose(float(agg(x, mask_empty, "seq_mean_token_mean")), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(agg(x, mask_empty, "seq_mean_token_sum_norm")), 3.0 / 3, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- shape_rewards

# Three responses, R = 4:
#   row 0 stopped after 2 tokens, row 1 never stopped (mask all ones), row 2 stopped on its last token.
MASK = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
STOPPED = np.array([True, False, True])
SCORES = np.array([2.0, 5.0, 0.5], np.float32)
LOGP = np.array([[-1.0, -2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -0.5]], np.float32)
# -inf at padding: must never leak into rewards or metrics
LOGP_REF = np.array([[-1.5, -1.0, NEG_INF, NEG_INF], [-1.0, -2.0, -0.5, -1.0], [-0.5, -0.7, -0.3, -0.5]],
                    np.float32)
# k1 = logp - logp_ref on valid tokens:
K1 = np.array([[0.5, -1.0, 0.0, 0.0], [0.0, 1.0, -0.5, 0.0], [0.0, 0.2, -0.2, 0.0]])


def _run_shape(cfg, rule_terms=None, state=None):
    fn = jax.jit(functools.partial(rewards.shape_rewards, cfg))
    state = rewards.init_state(cfg) if state is None else state
    return fn(state, SCORES, LOGP, LOGP_REF, MASK, STOPPED, rule_terms)


def test_shape_rewards_kl_in_reward_hand_computed():
    cfg = _cfg(kl_coef=0.1, kl_estimator="k1", kl_in_reward=True, missing_stop_penalty=-1.0,
               missing_stop_mode="replace")
    token_rewards, new_state, metrics = _run_shape(cfg)
    want = np.array([
        [-0.1 * 0.5, 2.0 - 0.1 * -1.0, 0.0, 0.0],       # score 2 at the stop token (index 1)
        [0.0, -0.1 * 1.0, -0.1 * -0.5, -1.0],           # no stop: score replaced by -1 on the last token
        [0.0, -0.1 * 0.2, -0.1 * -0.2, 0.5],
    ])
    np.testing.assert_allclose(np.asarray(token_rewards), want, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    np.testing.assert_allclose(float(metrics["kl/k1"]), K1.sum(-1).mean(), atol=1e-6)
    for name in ("k2", "k3"):
        want_kl = np.where(MASK > 0, _np_kl(name, LOGP, np.where(MASK > 0, LOGP_REF, 0.0)), 0.0)
        np.testing.assert_allclose(float(metrics[f"kl/{name}"]), want_kl.sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl/coef"]), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/score"]), (2.0 - 1.0 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(new_state.kl.coef), 0.1, rtol=1e-6)   # fixed coefficient
    np.testing.assert_allclose(float(new_state.norm.mean), (2.0 - 1.0 + 0.5) / 3, rtol=1e-6)


def test_shape_rewards_composite_add_length_clip_kl_in_loss():
    # shape_rewards takes the rule terms as given (the step computes them from reward.rules); a stop_token rule
    # named "fmt" only makes the config valid
    cfg = _cfg(judge_weight=2.0, rules={"fmt": {"kind": "stop_token"}}, rule_weights={"fmt": 0.5},
               missing_stop_mode="add", missing_stop_penalty=-1.0, length_penalty=0.1, length_target=2, clip=3.0,
               kl_in_reward=False, kl_estimator="k3")
    rule = {"fmt": np.array([1.0, 0.0, 1.0], np.float32)}
    token_rewards, _, metrics = _run_shape(cfg, rule)
    # composite: 2*[2, 5, .5] + .5*[1, 0, 1] = [4.5, 10, 1.5]; add -1 to row 1 -> 9;
    # length beyond 2 tokens: [0, 2, 2] * 0.1 -> [4.5, 8.8, 1.3]; clip to 3 -> [3, 3, 1.3]; no KL in the reward
    want = np.array([[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.3]])
    np.testing.assert_allclose(np.asarray(token_rewards), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/composite"]), 16.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/rule/fmt"]), 2.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/length_penalty"]), 0.4 / 3, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward/clipped_frac"]), 2.0 / 3, rtol=1e-6)
    assert "reward/kl_penalty" not in metrics

    # the loss-side KL term: coef * token_mean(k3), with a differentiable policy log-prob
    k3 = np.where(MASK > 0, _np_kl("k3", LOGP, np.where(MASK > 0, LOGP_REF, 0.0)), 0.0)
    term = jax.jit(rewards.kl_loss_term, static_argnums=(4, 5))
    loss, kl = term(LOGP, LOGP_REF, MASK, jnp.float32(0.1), "k3", "token_mean")
    np.testing.assert_allclose(float(kl), k3.sum() / MASK.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.1 * k3.sum() / MASK.sum(), rtol=1e-5)
    grad = jax.grad(lambda lp: term(lp, LOGP_REF, MASK, jnp.float32(0.1), "k3", "token_mean")[0])(LOGP)
    # d k3 / d logp = 1 - exp(logp_ref - logp), scaled by coef / n_valid; zero at padding
    want_grad = np.where(MASK > 0, 0.1 * (1 - np.exp(np.where(MASK > 0, LOGP_REF - LOGP, 0.0))) / MASK.sum(), 0)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)


def test_shape_rewards_whiten_running_and_adaptive_kl():
    base = dict(missing_stop_mode="none", kl_in_reward=False, kl_estimator="k3", adaptive_kl=True, kl_coef=0.2,
                kl_target=1.0, kl_horizon=30)
    # whiten over the batch, keeping the mean
    tr, new_state, metrics = _run_shape(_cfg(score_norm="whiten", norm_subtract_mean=False, **base))
    s = SCORES.astype(np.float64)
    want_scores = (s - s.mean()) / np.sqrt(s.var() + 1e-8) + s.mean()
    np.testing.assert_allclose(np.asarray(tr)[[0, 1, 2], [1, 3, 3]], want_scores, rtol=1e-5)
    # controller: measured kl (k3 summed per sequence: 0.825, 0.517, 0.040) = 0.461 -> error clip(0.461/1 - 1)
    # = -0.2; coef 0.2 * (1 - 0.2*3/30)
    np.testing.assert_allclose(float(new_state.kl.coef), 0.2 * (1 - 0.2 * 3 / 30), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl/coef"]), 0.2, rtol=1e-6)   # the rewards used the old one

    # running normalisation over two steps: the second step is divided by the std of both batches
    cfg = _cfg(score_norm="running", norm_subtract_mean=True, **base)
    _, state1, _ = _run_shape(cfg)
    tr2, state2, _ = _run_shape(cfg, state=state1)
    both = np.concatenate([s, s])
    want2 = (s - both.mean()) / (both.std() + 1e-8)
    np.testing.assert_allclose(np.asarray(tr2)[[0, 1, 2], [1, 3, 3]], want2, rtol=1e-5)
    assert float(state2.norm.count) == 6


def test_place_at_stop_and_rule_weight_errors():
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
    got = np.asarray(rewards.place_at_stop(jnp.array([7.0, 9.0]), mask))
    np.testing.assert_array_equal(got, [[0, 0, 7.0, 0], [0, 0, 0, 0]])   # empty response gets nothing
    with pytest.raises(ValueError, match="rule_weights"):
        rewards.composite_score(_cfg(), jnp.zeros(3), {"fmt": jnp.zeros(3)})
    with pytest.raises(ValueError, match="kl_estimator"):
        _cfg(kl_estimator="k5")


@pytest.mark.parametrize("shift_mean", [False, True])
def test_whiten_token_rewards_matches_numpy_over_the_valid_tokens(shift_mean):
    """reward.whiten_token_rewards whitens the per-token rewards (score at its token + KL penalty) over every
    valid token of the batch, as the reproduction's masked_whiten (summarize_from_feedback_details/ppo.py):
    population variance, eps 1e-8 inside the root, the mean added back unless shift_mean; padding stays 0."""
    cfg = _cfg(kl_coef=0.1, kl_estimator="k1", missing_stop_mode="replace", missing_stop_penalty=-1.0,
               whiten_token_rewards=True, token_whiten_shift_mean=shift_mean)
    token_rewards, _, metrics = _run_shape(cfg)
    # NumPy reference, built here: -coef * k1 per valid token, the score on the stop token (row 1 never stopped:
    # its score is replaced by -1 on its last token), then the whitening over the 10 valid entries only.
    raw = -0.1 * K1
    raw[0, 1] += 2.0
    raw[1, 3] += -1.0
    raw[2, 3] += 0.5
    valid = raw[MASK > 0]
    assert valid.size == 10
    mean, var = valid.mean(), np.mean((valid - valid.mean()) ** 2)
    want = (raw - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    want = np.where(MASK > 0, want, 0.0)
    np.testing.assert_allclose(np.asarray(token_rewards), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/token_reward_sum_before_whiten"]), raw.sum(-1).mean(),
                               rtol=1e-5)
    got_valid = np.asarray(token_rewards)[MASK > 0]
    np.testing.assert_allclose(got_valid.std(), 1.0, rtol=1e-4)  # unit spread over the valid tokens
    np.testing.assert_allclose(got_valid.mean(), 0.0 if shift_mean else mean, atol=1e-5)


def test_token_whiten_shift_mean_alone_is_refused():
    with pytest.raises(ValueError, match="token_whiten_shift_mean=True does nothing without reward."
                                         "whiten_token_rewards=True"):
        _cfg(token_whiten_shift_mean=True)
