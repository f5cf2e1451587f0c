"""Python reward functions on text (rlaif_jax/reward_functions.py): the composite reward inside a real host-path
step against NumPy, None -> the neutral value, a raising function stops the step naming itself, and validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import config as config_lib
from rlaif_jax import reward_functions, rewards
from rlaif_jax import train_step as ts
from tests import tiny
from tests.test_train_step import build, make_config, one_device_mesh, prompts

FAIL = {"count_b": False}


def count_b(prompts, completions, **columns):
    """The fraction of the completion's words that are "b"; no opinion (None) on an odd number of words."""
    if FAIL["count_b"]:
        raise ZeroDivisionError("the user's bug")
    out = []
    for text in completions:
        words = text.split()
        out.append(None if len(words) % 2 else words.count("b") / max(len(words), 1))
    return out


def answer_in_completion(prompts, completions, answer):
    """1 if the row's dataset column `answer` is a word of the completion, else 0 (named column, no **kwargs)."""
    return [float(a in c.split()) for c, a in zip(completions, answer)]


def not_a_function_of_text(prompts):
    return [0.0] * len(prompts)


FUNCTIONS = {"bs": "tests.test_reward_functions:count_b", "answer": "tests.test_reward_functions:answer_in_completion"}
WEIGHTS = {"bs": 0.5, "answer": -2.0}
NEUTRAL, JUDGE_WEIGHT = 0.25, 0.7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny.make_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def host(world):
    c = make_config(world, **{"reward.functions": FUNCTIONS, "reward.function_weights": WEIGHTS,
                              "reward.function_neutral": NEUTRAL, "reward.judge_weight": JUDGE_WEIGHT,
                              "rollout.n_samples": 2})
    config_lib.validate(c, num_devices=1)
    return build(c, one_device_mesh())


def test_composite_reward_equals_numpy_inside_a_host_step(host):
    """s = judge_weight * judge + sum_k w_k f_k (None -> neutral) per row, checked through the step's metrics:
    the composite's mean and its population std (the running statistics after the first step), each function's
    mean and None fraction, against NumPy on the decoded text."""
    assert isinstance(host.step_fn, ts.HostJudgeStep)
    tokens, mask = prompts(None, n=8, seed=3)
    answers = ["b", "c", "d", "e", "f", "g", "h", "i"]
    seen = {}

    def judge(*args):
        seen["scores"], jm = host.step_fn.judge(*args)
        return seen["scores"], jm

    def functions(roll, columns):
        seen["roll"] = roll
        return host.step_fn.functions(roll, columns)

    step = dataclasses.replace(host.step_fn, judge=judge, functions=functions)
    with jax.set_mesh(one_device_mesh()):
        state = jax.tree.map(jnp.copy, host.state)
        _, metrics = step(state, host.frozen, tokens, mask, columns={"answer": answers})
    metrics = jax.device_get(metrics)

    roll, tok = seen["roll"], host.policy_tokenizer
    completions = [tok.decode(t[m > 0], skip_special_tokens=True)
                   for t, m in zip(np.asarray(roll.response_tokens_br), np.asarray(roll.response_mask_br))]
    words = [c.split() for c in completions]
    none = np.array([len(w) % 2 == 1 for w in words])
    bs = np.array([NEUTRAL if n else w.count("b") / max(len(w), 1) for w, n in zip(words, none)])
    answer = np.array([float(a in w) for w, a in zip(words, np.repeat(answers, 2))])
    assert 0 < none.sum() < len(none), "the check needs rows with and without an opinion"
    judge_b = np.asarray(seen["scores"], np.float64)
    composite = JUDGE_WEIGHT * judge_b + 0.5 * bs - 2.0 * answer
    np.testing.assert_allclose(metrics["reward/composite"], composite.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["reward/running_std"], composite.std(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward/function/bs"], bs.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward/function/answer"], answer.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward/function/bs/none_frac"], none.mean(), rtol=1e-6)
    assert metrics["time/reward_functions_s"] > 0


def test_a_raising_function_stops_the_step_naming_itself(host, monkeypatch):
    monkeypatch.setitem(FAIL, "count_b", True)
    tokens, mask = prompts(None, n=8, seed=3)
    with jax.set_mesh(one_device_mesh()), pytest.raises(reward_functions.RewardFunctionError) as e:
        host.step_fn(jax.tree.map(jnp.copy, host.state), host.frozen, tokens, mask, columns={"answer": ["b"] * 8})
    assert str(e.value) == ("reward.functions.bs (tests.test_reward_functions:count_b) raised ZeroDivisionError: "
                            "the user's bug")


def function(fn_values):
    return reward_functions.RewardFunction("f", "m:f", lambda p, c, **kw: fn_values, None)


def test_call_neutral_for_none_and_refuses_malformed_output():
    values, none = reward_functions.call(function([1, None, 2.5]), ["p"] * 3, ["c"] * 3, {}, neutral=-0.5)
    np.testing.assert_array_equal(values, [1.0, -0.5, 2.5])
    np.testing.assert_array_equal(none, [False, True, False])
    for bad, message in (([1.0, 2.0], "returned 2 values for 3 completions"),
                         ([1.0, float("nan"), 2.0], "returned nan for completion 1"),
                         ([1.0, "2", 3.0], "returned '2' for completion 1"), (3.0, "returned float")):
        with pytest.raises(reward_functions.RewardFunctionError, match=message):
            reward_functions.call(function(bad), ["p"] * 3, ["c"] * 3, {}, neutral=0.0)


def test_a_function_without_kwargs_gets_only_the_columns_it_names():
    cfg = rewards.default_config()
    cfg.functions = {"answer": "tests.test_reward_functions:answer_in_completion"}
    (fn,) = reward_functions.load(cfg)
    assert fn.keywords == {"answer"}
    values, _ = reward_functions.call(fn, ["p", "p"], ["a b", "c"], {"answer": ["b", "b"], "stopped": [1, 0]}, 0.0)
    np.testing.assert_array_equal(values, [1.0, 0.0])


@pytest.mark.parametrize("fields, message", [
    ({"functions": {"f": "tests.test_reward_functions:count_b"}}, r"reward.functions.f has no weight"),
    ({"function_weights": {"g": 1.0}}, r"reward.function_weights has 'g' but reward.functions has no function"),
    ({"functions": {"f": "tests.test_reward_functions:nope"}, "function_weights": {"f": 1.0}}, r"has no function 'nope'"),
    ({"functions": {"f": "count_b"}, "function_weights": {"f": 1.0}}, r"is not 'module:function'"),
    ({"functions": {"f": "tests.test_reward_functions:count_b"}, "function_weights": {"f": float("inf")}},
     r"function_weights\['f'\]=inf must be a finite number"),
    ({"functions": {"f": "tests.test_reward_functions:not_a_function_of_text"}, "function_weights": {"f": 1.0}},
     r"takes \['prompts'\]; a reward function takes \(prompts, completions"),
    ({"function_neutral": float("nan")}, r"reward.function_neutral=nan must be a finite number"),
])
def test_validation_refuses_with_one_line(fields, message):
    cfg = rewards.default_config()
    for k, v in fields.items():
        cfg[k] = v
    with pytest.raises(ValueError, match=message):
        rewards.validate_config(cfg)


def test_online_dpo_refuses_reward_functions(world):
    c = make_config(world, **{"algo.estimator": "online_dpo", "judge.mode": "pairwise", "critic.kind": "none",
                              "rollout.n_samples": 2, "reward.functions": {"f": FUNCTIONS["bs"]},
                              "reward.function_weights": {"f": 1.0}, "algo.vf_coef": 0.1, "algo.epochs": 1,
                              "algo.minibatches": 1})
    c.judge.template = "Q : {prompt} R : {response} R : {response_b} S :"
    for name, off in config_lib.REWARD_SHAPING_OFF.items():
        c.reward[name] = off
    with pytest.raises(ValueError, match="reward.functions=.* online_dpo does not use"):
        config_lib.validate(c, num_devices=1)
