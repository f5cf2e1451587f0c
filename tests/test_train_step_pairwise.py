"""The compiled RLAIF step with a judge that compares or chooses: principles drawn per prompt (both judge paths),
online DPO, and a pairwise reward against a baseline response. Split from tests/test_train_step.py (same tiny world
and helpers) so that the two halves run on two test workers at once."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import evaluate, judging
from rlaif_jax import data as data_lib
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from tests import tiny
from tests.test_conformance import np_choose_pairs
from tests.test_train_step import build, make_config, one_device_mesh, prompts, run_steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny.make_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def batches(world):
    return [prompts(world, seed=s) for s in range(4)]


# A principles judge whose principles are words of the tiny world: 8 prompts x 4 samples per step.
PRINCIPLES_RUN = {"judge.mode": "principles", "judge.template": "Q : {principle} {prompt} R : {response} S :",
                  "judge.principles": ("b", "c c", "d d d", "e", "f f", "g"), "judge.max_len": 32,
                  "rollout.n_samples": 4, "eval.samples_per_prompt": 2}


def assert_one_principle_per_prompt(index_b, n):
    """index_b (prompt-major rows): every prompt's n rows share one principle, and not every prompt the same."""
    group_sample = np.asarray(index_b).reshape(-1, n)
    np.testing.assert_array_equal(group_sample, np.repeat(group_sample[:, :1], n, axis=1))
    assert len(set(group_sample[:, 0].tolist())) > 1, group_sample


def test_fused_step_judges_each_group_by_one_principle(world, batches, monkeypatch):
    used = []
    score = judging.score

    def recording_score(*args, **kwargs):
        scores, metrics = score(*args, **kwargs)
        jax.debug.callback(lambda index_b: used.append(np.asarray(index_b)), metrics.principle_index_b)
        return scores, metrics

    monkeypatch.setattr(judging, "score", recording_score)
    s = build(make_config(world, **PRINCIPLES_RUN), one_device_mesh())
    assert s.judge_spec.path == "token_space"
    run_steps(s, one_device_mesh(), s.state, 1, batches)
    assert len(used) == 1 and used[0].shape == (32,)
    assert_one_principle_per_prompt(used[0], 4)


def test_host_path_step_and_evaluation_judge_each_group_by_one_principle(world, monkeypatch, tmp_path):
    """The host step's judge and the held-out evaluation on the host path draw one principle per prompt; the
    evaluation on the host path gives every metric."""
    judge = tiny.write_judge_with_other_tokenizer(str(tmp_path / "judge"))
    c = make_config(world, **PRINCIPLES_RUN, **{"judge.path": judge, "train.allow_tokenizer_mismatch": True})
    mesh = one_device_mesh()
    s = build(c, mesh)
    assert s.judge_spec.path == "host"
    used = {}
    score_host, score_outside_jit = judging.score_host, judging.score_outside_jit

    def recording(name, function):
        def record(*args, **kwargs):
            scores, metrics = function(*args, **kwargs)
            if metrics.principle_index_b is not None:
                used.setdefault(name, []).append(np.asarray(metrics.principle_index_b))
            return scores, metrics
        return record

    monkeypatch.setattr(judging, "score_host", recording("step", score_host))
    monkeypatch.setattr(judging, "score_outside_jit", recording("eval", score_outside_jit))
    tokens, mask = prompts(world)
    with shd.use_rules([tuple(r) for r in c.mesh.rules]), jax.set_mesh(mesh):
        roll, inputs, keys = s.step_fn.sample(s.state, s.frozen, tokens, mask)
        s.step_fn.judge(s.frozen, roll, inputs, keys[1])
        _, eval_loader = data_lib.load_prompts(c.data, s.policy_tokenizer, c.train.batch_size)

        class Samples:
            def write_samples(self, step, rows):
                self.rows = rows

        samples = Samples()
        metrics = evaluate.Evaluator(c, s, eval_loader, mesh).evaluate(s.state, s.frozen, 0, samples)
    assert [u.shape for u in used["step"]] == [(32,)]
    assert_one_principle_per_prompt(used["step"][0], 4)
    assert [u.shape for u in used["eval"]] == [(16,)]  # the reward judge's; the win rate's template has none
    assert_one_principle_per_prompt(used["eval"][0], 2)
    for name in ("judge_score", "win_rate", "position_agreement", "kl", "response_length"):
        assert np.isfinite(metrics[f"eval/{name}"]), name
    assert len(samples.rows) == c.eval.num_samples_logged


# ------------------------------------------------------------------------------------------------- online DPO
DPO = {"algo.estimator": "online_dpo", "algo.dpo_beta": 0.5, "algo.vf_coef": 0.1, "algo.epochs": 1,
       "algo.minibatches": 1, "critic.kind": "none", "rollout.n_samples": 3, "rollout.temperature": 0.7,
       "judge.mode": "pairwise", "judge.template": "Q : {prompt} R : {response} R : {response_b} S :",
       "judge.max_len": 32, "reward.kl_coef": 0.0}


def perturbed(params, scale, seed):
    """`params` + scale * N(0, 1), leaf by leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def dpo(world):
    """Online DPO, 3 samples per prompt, one update per step: its step, and `frozen` with a perturbed judge (the
    hand-built one prefers neither response, perturbed it has preferences and a position bias) and a perturbed
    reference (so the DPO loss at the initial policy is not log 2)."""
    s = build(make_config(world, **DPO), one_device_mesh())
    frozen = s.frozen.replace(judge=perturbed(s.frozen.judge, 0.3, 1), reference=perturbed(s.frozen.reference, 0.05, 2))
    return s, frozen


def test_online_dpo_step_loss_equals_numpy_and_the_policy_moves(dpo, world):
    """One compiled online_dpo step: the pairwise judge asked about each pair of a prompt's 3 samples on its own
    (3 separate judge calls here, both orders inside), NumPy's win rates, best / worst choice and DPO loss on the
    policy's and reference's sequence log-probs at temperature 1 (the rollout samples at 0.7) give the step's
    dpo/* metrics; the policy params change."""
    s, frozen = dpo
    c, n, beta = make_config(world, **DPO), 3, 0.5
    tokens, mask = prompts(world)
    state, (metrics,) = run_steps(s, one_device_mesh(), s.state, 1, [(tokens, mask)], frozen=frozen)
    assert int(metrics["guard/skipped_updates"]) == 0 and s.step_fn._cache_size() == 1

    _, k_roll, k_judge, _ = jax.random.split(s.state.rng, 4)
    roll = jax.jit(functools.partial(ts.rollout_phase, c, s.models, s.sampling))(s.state.params["policy"], tokens, mask,
                                                                              k_roll)
    prompt, pmask, resp, rmask = (np.asarray(x) for x in (roll.prompt_tokens_bp, roll.prompt_mask_bp,
                                                          roll.response_tokens_br, roll.response_mask_br))
    groups = np.arange(len(tokens)) * n
    p_pairs = np.zeros((len(tokens), 3))
    for k, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
        a, b = groups + i, groups + j
        p, _ = judging.score_jit(frozen.judge, s.models.judge, s.judge_spec, prompt[a], pmask[a], resp[a], rmask[a],
                                 k_judge, responses_b_br=resp[b], response_b_mask_br=rmask[b])
        p_pairs[:, k] = np.asarray(p)
    assert np.ptp(p_pairs) > 0.05  # the judge has preferences
    chosen, rejected, wins = np_choose_pairs(p_pairs.reshape(-1), n)

    logprobs = jax.jit(ts.response_logprobs, static_argnums=(1, 6))
    fmask = rmask.astype(np.float32)
    seq = {}
    for name, params in (("policy", s.state.params["policy"]), ("reference", frozen.reference)):
        logp, _, _ = logprobs(params, s.models.policy, prompt, pmask, resp, fmask, 1.0)
        seq[name] = (np.asarray(logp, np.float64) * fmask).sum(1)
    r_c = beta * (seq["policy"][chosen] - seq["reference"][chosen])
    r_r = beta * (seq["policy"][rejected] - seq["reference"][rejected])
    want = {"dpo/loss": np.logaddexp(0.0, -(r_c - r_r)).mean(), "dpo/chosen_reward": r_c.mean(),
            "dpo/rejected_reward": r_r.mean(), "dpo/reward_margin": (r_c - r_r).mean(),
            "dpo/accuracy": (r_c > r_r).mean()}
    assert abs(want["dpo/loss"] - np.log(2.0)) > 1e-3
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(metrics["dpo/judge_margin"], (wins[chosen] - wins[rejected]).mean(), rtol=1e-5)
    assert "judge/position_agreement" in metrics and "judge/score" not in metrics
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(s.state.params)),
                                                       jax.tree.leaves(jax.device_get(state.params)))]
    assert all(moved)


def test_online_dpo_pairs_judged_on_the_host_path_equal_token_space(dpo, world, tmp_path):
    """`judge_phase` for online_dpo through the host path (decode, render, re-tokenise) gives the token-space win
    rates, the pairs laid out alike."""
    s, frozen = dpo
    c = make_config(world, **DPO)
    other = tiny.write_judge_with_other_tokenizer(str(tmp_path / "judge"))
    judge = judging.load_judge(make_config(world, **{**DPO, "judge.path": other}).judge, s.policy_tokenizer,
                               s.sampling.stop_ids or None)
    assert judge.spec.path == "host"
    tokens, mask = prompts(world, seed=3)
    roll = jax.jit(functools.partial(ts.rollout_phase, c, s.models, s.sampling))(s.state.params["policy"], tokens, mask,
                                                                                 jax.random.key(4))
    token_space, _ = jax.jit(lambda roll: ts.judge_phase(
        c, functools.partial(judging.score, frozen.judge, s.models.judge, s.judge_spec), roll, jax.random.key(5)))(roll)
    host, _ = ts.judge_phase(c, functools.partial(judging.score_host, frozen.judge, judge.cfg, judge.spec,
                                                  s.policy_tokenizer, judge.tokenizer), roll, jax.random.key(5))
    assert token_space.shape == (len(tokens) * 3,)
    np.testing.assert_allclose(np.asarray(host), np.asarray(token_space), atol=1e-5)


def test_online_dpo_evaluation_scores_against_the_initial_policy(dpo, world):
    """With a pairwise reward judge the held-out judge_score is P(the current policy's response beats the initial
    policy's): here the evaluation's own win rate (its pairwise template is the reward judge's), to the last bit."""
    s, frozen = dpo
    c = make_config(world, **DPO)
    tokens, mask = prompts(world, seed=6)
    batch = data_lib.PromptBatch(tokens, mask, np.ones(len(tokens), np.int32), np.arange(len(tokens)))
    evaluator = evaluate.Evaluator(c, s, [batch], one_device_mesh())
    assert evaluator.pair_spec == s.judge_spec

    class Samples:
        def write_samples(self, step, rows):
            self.rows = rows

    with jax.set_mesh(one_device_mesh()):
        out = evaluator.evaluate(s.state, frozen, 0, Samples())
    assert 0.0 < out["eval/judge_score"] < 1.0
    assert out["eval/judge_score"] == out["eval/win_rate"]


# ------------------------------------------------------------------------------------ pairwise reward, PPO family
# The pairwise judge's template also shows the data's reference ({reference}), so one compiled step covers the
# reference-sample baseline and references passed into the step (its six-argument form).
PAIRWISE = {"algo.epochs": 1, "algo.minibatches": 1, "critic.kind": "none", "algo.estimator": "grpo",
            "rollout.n_samples": 2, "judge.mode": "pairwise", "judge.max_len": 40, "reward.kl_coef": 0.0,
            "judge.template": "Q : {prompt} R : {reference} R : {response} R : {response_b} S :",
            "data.reference_field": "reference", "data.max_reference_len": 5}


@pytest.fixture(scope="module")
def pairwise(world):
    """The step with a pairwise reward against a reference-policy sample; `frozen` with a perturbed judge (the
    hand-built one prefers neither response) and a reference far from the policy, so a baseline drawn from the
    policy instead would give other responses and other scores; a batch of prompts and references (content words
    then EOS, right-padded)."""
    c = make_config(world, **PAIRWISE, **{"reward.pairwise_baseline": "reference_sample"})
    s = build(c, one_device_mesh())
    frozen = s.frozen.replace(judge=perturbed(s.frozen.judge, 0.3, 1), reference=perturbed(s.frozen.reference, 0.5, 2))
    tokens, mask = prompts(world)
    rng = np.random.default_rng(7)
    content, eos = [tiny.WORDS.index(w) for w in tiny.CONTENT], s.policy_tokenizer.eos_token_id
    refs = [list(rng.choice(content, size=rng.integers(1, 5))) + [eos] for _ in range(len(tokens))]
    ref_bf, ref_mask_bf = data_lib.right_pad(refs, 5, s.policy_tokenizer.pad_token_id)
    return c, s, frozen, (tokens, mask, ref_bf, ref_mask_bf)


def expected_pairwise_scores(c, s, frozen, batch, base_resp, base_mask):
    """Independently of `train_step.judge_inputs`: the step's rollout (its keys), each row judged (both orders)
    against the baseline response of its prompt and with its prompt's reference, rows prompt * n + sample."""
    tokens, mask, ref_bf, ref_mask_bf = batch
    n = s.sampling.n_samples
    _, k_roll, k_judge, _ = jax.random.split(s.state.rng, 4)
    roll = jax.jit(functools.partial(ts.rollout_phase, c, s.models, s.sampling))(s.state.params["policy"], tokens, mask,
                                                                              k_roll)
    rows = np.arange(len(tokens) * n) // n
    p, _ = judging.score_jit(frozen.judge, s.models.judge, s.judge_spec, roll.prompt_tokens_bp, roll.prompt_mask_bp,
                             roll.response_tokens_br, roll.response_mask_br, k_judge, rows_per_prompt=n,
                             responses_b_br=np.asarray(base_resp)[rows], response_b_mask_br=np.asarray(base_mask)[rows],
                             references_bf=ref_bf[rows], reference_mask_bf=ref_mask_bf[rows])
    return np.asarray(p)


def test_pairwise_reward_against_a_sample_of_the_reference_policy(pairwise):
    """reward.pairwise_baseline='reference_sample': the step samples one response per prompt from the frozen
    reference and scores every sample by P(it beats that response); judge/score is their mean, to float rounding."""
    c, s, frozen, batch = pairwise
    tokens, mask = batch[:2]
    with jax.set_mesh(one_device_mesh()):
        _, metrics = s.step_fn(jax.tree.map(jnp.copy, s.state), frozen, *batch)
    _, k_roll, _, _ = jax.random.split(s.state.rng, 4)
    one = dataclasses.replace(s.sampling, n_samples=1)
    sample_one = jax.jit(lambda params: rollout_lib.rollout(params, s.models.policy, tokens, mask,
                                                            jax.random.fold_in(k_roll, 1), one))
    base, from_policy = sample_one(frozen.reference), sample_one(s.state.params["policy"])
    assert not np.array_equal(base.response_tokens_br, from_policy.response_tokens_br)
    want = expected_pairwise_scores(c, s, frozen, batch, base.response_tokens_br, base.response_mask_br)
    assert np.ptp(want) > 0.05
    np.testing.assert_allclose(metrics["judge/score"], want.mean(), rtol=1e-5)
    assert "judge/position_agreement" in metrics and int(metrics["guard/skipped_updates"]) == 0


def test_pairwise_reward_against_the_dataset_reference(pairwise, world):
    """reward.pairwise_baseline='dataset_reference': the judge phase takes the batch's right-padded references as the
    baseline of every sample of their prompt (`judge_inputs`, as the step calls it)."""
    _, s, frozen, batch = pairwise
    c = make_config(world, **PAIRWISE, **{"reward.pairwise_baseline": "dataset_reference"})
    tokens, mask, ref_bf, ref_mask_bf = batch
    _, k_roll, k_judge, _ = jax.random.split(s.state.rng, 4)

    @jax.jit
    def judged(params, frozen, tokens, mask, ref_bf, ref_mask_bf):
        roll = ts.rollout_phase(c, s.models, s.sampling, params["policy"], tokens, mask, k_roll)
        inputs = ts.judge_inputs(c, s.models, s.sampling, frozen, s.judge_spec, tokens, mask, ref_bf, ref_mask_bf,
                                 jax.random.fold_in(k_roll, 1))
        score_fn = functools.partial(judging.score, frozen.judge, s.models.judge, s.judge_spec)
        return ts.judge_phase(c, score_fn, roll, k_judge, inputs)[0]

    got = np.asarray(judged(s.state.params, frozen, *batch))
    want = expected_pairwise_scores(c, s, frozen, batch, ref_bf, ref_mask_bf)
    assert np.ptp(want) > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
