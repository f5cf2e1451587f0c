"""reward_rules.py: each rule against a NumPy loop or hand-computed numbers (under jax.jit), their config checks, and
the rule terms reaching the reward inside the compiled step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import reward_rules, rewards
from rlaif_jax import train_step as ts
from tests import tiny
from tests.test_train_step import build, make_config, one_device_mesh, prompts


def user_rule_first_token(x: reward_rules.RuleInputs, token: int) -> jax.Array:
    """A user rule for the tests: 1 where the response starts with `token`."""
    return (x.response_tokens_br[:, 0] == token).astype(jnp.float32)


def user_rule_per_token(x: reward_rules.RuleInputs) -> jax.Array:
    """A wrong user rule: one number per token, not per response."""
    return x.response_mask_br.astype(jnp.float32)


def inputs(tokens_br, mask_br, stopped_b=None):
    tokens_br, mask_br = np.asarray(tokens_br, np.int32), np.asarray(mask_br, np.int32)
    B = tokens_br.shape[0]
    stopped_b = np.zeros(B, bool) if stopped_b is None else np.asarray(stopped_b, bool)
    return reward_rules.RuleInputs(np.ones((B, 3), np.int32), np.ones((B, 3), np.int32), tokens_br, mask_br,
                                   stopped_b)


def run(fn, x, **params):
    return np.asarray(jax.jit(functools.partial(fn, **params))(x))


# ---------------------------------------------------------------------------------------------- NumPy references
def np_repeated_ngrams(tokens, mask, n):
    out = []
    for row, valid in zip(tokens, mask):
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1) if all(valid[i:i + n])]
        out.append((len(grams) - len(set(grams))) / max(len(grams), 1))
    return np.array(out)


def np_token_set(tokens, mask, ids, mode):
    out = []
    for row, valid in zip(tokens, mask):
        present = {int(t) for t, v in zip(row, valid) if v}
        hits = [i in present for i in ids]
        out.append({"any": any(hits), "all": all(hits), "none": not any(hits)}[mode])
    return np.array(out, np.float64)


def random_batch(seed, prefix_masks=True, B=7, R=9, vocab=4):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, R))
    if prefix_masks:
        lengths = np.concatenate([[0, 1, R], rng.integers(0, R + 1, B - 3)])
        mask = (np.arange(R)[None] < lengths[:, None]).astype(np.int32)
    else:
        mask = rng.integers(0, 2, (B, R))
    return tokens, mask, rng.integers(0, 2, B).astype(bool)


# ---------------------------------------------------------------------------------------------- the rules
def test_rules_hand_computed():
    # row 0: "5 6 5 6 5", all valid: bigrams (5,6) (6,5) (5,6) (6,5) -> 4 of which 2 distinct -> 0.5;
    #        trigrams (5,6,5) (6,5,6) (5,6,5) -> 1/3
    # row 1: "7 7 7 | 7 7" (2 padding tokens): bigrams inside the mask (7,7) (7,7) -> 1/2
    x = inputs([[5, 6, 5, 6, 5], [7, 7, 7, 7, 7]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], [True, False])
    np.testing.assert_allclose(run(reward_rules.repeated_ngrams, x, n=2), [0.5, 0.5])
    np.testing.assert_allclose(run(reward_rules.repeated_ngrams, x, n=3), [1 / 3, 0.0])
    np.testing.assert_allclose(run(reward_rules.repeated_ngrams, x, n=6), [0.0, 0.0])  # longer than R
    np.testing.assert_allclose(run(reward_rules.length, x), [1.0, 0.6])
    np.testing.assert_allclose(run(reward_rules.stop_token, x), [1.0, 0.0])
    # token 7 sits only in row 1; in row 1, 6 is absent; the padding 7s of row 1 do not count for anything
    np.testing.assert_allclose(run(reward_rules.token_set, x, tokens=(6, 7), mode="any"), [1.0, 1.0])
    np.testing.assert_allclose(run(reward_rules.token_set, x, tokens=(6, 7), mode="all"), [0.0, 0.0])
    np.testing.assert_allclose(run(reward_rules.token_set, x, tokens=(6,), mode="none"), [0.0, 1.0])


@pytest.mark.parametrize("prefix_masks", [True, False])
def test_rules_match_numpy(prefix_masks):
    tokens, mask, stopped = random_batch(0 if prefix_masks else 1, prefix_masks)
    x = inputs(tokens, mask, stopped)
    for n in (1, 2, 3):
        np.testing.assert_allclose(run(reward_rules.repeated_ngrams, x, n=n), np_repeated_ngrams(tokens, mask, n),
                                   rtol=1e-6, err_msg=f"n={n}")
    for mode in reward_rules.TOKEN_SET_MODES:
        np.testing.assert_array_equal(run(reward_rules.token_set, x, tokens=[1, 3], mode=mode),
                                      np_token_set(tokens, mask, [1, 3], mode), err_msg=mode)
    np.testing.assert_allclose(run(reward_rules.length, x), mask.sum(1) / mask.shape[1], rtol=1e-6)
    np.testing.assert_array_equal(run(reward_rules.stop_token, x), stopped.astype(np.float64))


def reward_cfg(rules, weights, **overrides):
    cfg = rewards.default_config()
    cfg.rules, cfg.rule_weights = rules, weights
    cfg.update(overrides)
    return cfg


def test_compute_terms_loads_builtin_and_user_rules():
    cfg = reward_cfg({"length": {}, "banned": {"kind": "token_set", "tokens": [7], "mode": "none"},
                      "starts_5": {"kind": "user", "fn": "tests.test_reward_rules:user_rule_first_token",
                                   "token": 5}},
                     {"length": 1.0, "banned": 1.0, "starts_5": 1.0})
    rewards.validate_config(cfg)
    x = inputs([[5, 6, 5, 6, 5], [7, 7, 7, 7, 7]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    terms = jax.jit(functools.partial(reward_rules.compute_terms, cfg))(x)
    assert sorted(terms) == ["banned", "length", "starts_5"]
    np.testing.assert_allclose(np.asarray(terms["banned"]), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(terms["starts_5"]), [1.0, 0.0])
    assert all(t.dtype == jnp.float32 and t.shape == (2,) for t in terms.values())


def test_a_user_rule_of_the_wrong_shape_is_refused():
    cfg = reward_cfg({"bad": {"kind": "user", "fn": "tests.test_reward_rules:user_rule_per_token"}}, {"bad": 1.0})
    x = inputs([[5, 6]], [[1, 1]])
    with pytest.raises(ValueError, match=r"^reward.rules.bad returned shape \(1, 2\); a rule gives one number"):
        reward_rules.compute_terms(cfg, x)


def test_token_ids_outside_the_vocabulary_are_refused():
    cfg = reward_cfg({"t": {"kind": "token_set", "tokens": [3, 40]}}, {"t": 1.0})
    reward_rules.check_token_ids(cfg, 41)
    with pytest.raises(ValueError, match=r"^reward.rules.t.tokens has ids \[40\] outside the policy's vocabulary"):
        reward_rules.check_token_ids(cfg, 40)


# ---------------------------------------------------------------------------------------------- in the step
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny.make_world(str(tmp_path_factory.mktemp("world")))


def test_rule_terms_reach_the_reward_in_the_compiled_step(world):
    """With judge weight 0, no KL, no penalty and no normalisation, the shaped score is the weighted sum of the
    rules' terms, each computed (here by NumPy) from the very responses the step sampled."""
    weights = {"length": -0.5, "repeated_ngrams": -1.0, "stop_token": 0.25, "has_a": 2.0, "starts_a": 0.125}
    c = make_config(world, **{"reward.judge_weight": 0.0, "reward.kl_coef": 0.0, "reward.clip": 0.0,
                              "reward.score_norm": "none", "reward.length_penalty": 0.0,
                              "algo.epochs": 1, "algo.minibatches": 1})
    a_id = tiny.make_tokenizer().convert_tokens_to_ids(tiny.TARGET)
    c.reward.rules = {"length": {}, "repeated_ngrams": {"n": 1}, "stop_token": {},
                      "has_a": {"kind": "token_set", "tokens": [a_id], "mode": "any"},
                      "starts_a": {"kind": "user", "fn": "tests.test_reward_rules:user_rule_first_token",
                                   "token": a_id}}
    c.reward.rule_weights = weights
    rewards.validate_config(c.reward)
    s = build(c, one_device_mesh())
    tokens_bp, mask_bp = prompts(world)

    with jax.set_mesh(one_device_mesh()):
        # The step's own rollout: same params and the same key as its phase 1.
        k_roll = jax.random.split(s.state.rng, 4)[1]
        roll = jax.jit(functools.partial(ts.rollout_phase, c, s.models, s.sampling))(
            s.state.params["policy"], tokens_bp, mask_bp, k_roll)
        _, metrics = s.step_fn(jax.tree.map(jnp.copy, s.state), s.frozen, tokens_bp, mask_bp)
    resp, mask = np.asarray(roll.response_tokens_br), np.asarray(roll.response_mask_br)
    stopped = np.asarray(roll.stopped_b)
    want = {"length": mask.sum(1) / mask.shape[1], "repeated_ngrams": np_repeated_ngrams(resp, mask, 1),
            "stop_token": stopped.astype(np.float64), "has_a": np_token_set(resp, mask, [a_id], "any"),
            "starts_a": (resp[:, 0] == a_id).astype(np.float64)}
    for name, term in want.items():
        np.testing.assert_allclose(float(metrics[f"reward/rule/{name}"]), term.mean(), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    composite = sum(weights[name] * want[name] for name in weights)
    np.testing.assert_allclose(float(metrics["reward/composite"]), composite.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["reward/token_reward_sum"]), composite.mean(), rtol=1e-5, atol=1e-7)
    assert 0 < want["has_a"].mean() < 1 and want["repeated_ngrams"].max() > 0  # the terms are not constant
