"""The compiled RLAIF step on tiny models: one compilation, 1 vs 8 devices, learning, KL, the NaN guard. The judges that
compare or choose (principles, online DPO, a pairwise reward) are in tests/test_train_step_pairwise.py."""
import copy
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlaif_jax import builder, errors, evaluate, judging, ops, plan, reward_model
from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax.models import transformer as tfm
from tests import tiny, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny.make_world(str(tmp_path_factory.mktemp("world")))


def make_config(world, **overrides):
    """tests/tiny_config.py's run (pointwise judge counting TARGET), with PPO's epochs x minibatches = 2 x 2."""
    c = tiny_config.get_config(os.path.dirname(world["policy"]))
    c.judge.mode = "pointwise"
    c.train.steps = 40
    c.reward.missing_stop_mode = "none"
    c.algo.epochs = 2
    c.algo.minibatches = 2
    c.algo.vf_coef = 0.5
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def prompts(world, n=8, seed=0):
    tok = tiny.make_tokenizer()
    rng = np.random.default_rng(seed)
    rows = [tok(" ".join(rng.choice(tiny.CONTENT[1:], size=rng.integers(2, 5))))["input_ids"] for _ in range(n)]
    return data_lib.left_pad(rows, 6)


def one_device_mesh():
    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def build(c, mesh):
    rules = [tuple(r) for r in c.mesh.rules]
    with shd.use_rules(rules), jax.set_mesh(mesh):
        return builder.build(c, mesh, rules)


def run_steps(s, mesh, state, steps, batches, frozen=None):
    """Runs `steps` steps from a copy of `state` (the step donates its input)."""
    history = []
    with jax.set_mesh(mesh):
        state = jax.tree.map(jnp.copy, state)
        for i in range(steps):
            tokens, mask = batches[i % len(batches)]
            state, metrics = s.step_fn(state, frozen or s.frozen, tokens, mask)
            history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def single(world):
    """One compiled step on one device, shared by every test below that runs on it."""
    return build(make_config(world), one_device_mesh())


@pytest.fixture(scope="module")
def batches(world):
    return [prompts(world, seed=s) for s in range(4)]


def test_judge_counts_the_target_word(world):
    """The hand-built judge: more TARGET words, higher pointwise score (checked through the host path)."""
    c = make_config(world)
    judge = judging.load_judge(c.judge)
    texts = ["b c d e", "a c d e", "a a d e", "a a a a"]
    scores, _ = judging.score_texts(judge.params, judge.cfg, judge.spec, judge.tokenizer, ["b c"] * 4, texts,
                                    jax.random.key(0))
    scores = np.asarray(scores)
    assert np.all(np.diff(scores) > 0.02), scores
    assert -0.1 < scores[0] < 0.1  # no TARGET: P uniform over 1..5 -> E[k] = 3 -> rescaled 0


@pytest.fixture(scope="module")
def learning_run(single, batches):
    state, history = run_steps(single, one_device_mesh(), single.state, 30, batches)
    return single, state, history


def test_step_compiles_once(learning_run):
    s, _, history = learning_run
    assert s.step_fn._cache_size() == 1
    assert len(history) == 30


def test_judge_score_rises(learning_run):
    _, state, history = learning_run
    scores = np.array([h["judge/score"] for h in history])
    print("judge score per step:", np.round(scores, 3))
    assert scores[-5:].mean() > scores[:5].mean() + 0.15
    assert int(state.skipped_updates) == 0
    for key in ("kl/k1", "kl/k2", "kl/k3", "policy/entropy", "policy/clipfrac", "policy/approx_kl_k3",
                "value/explained_variance", "response/length", "response/stopped_frac", "optim/grad_norm",
                "policy/logp_mismatch", "reward/kl_penalty"):
        assert key in history[-1], key
    # The rollout's log-probs (KV cache) and the training forward's agree.
    assert max(h["policy/logp_mismatch"] for h in history) < 1e-4


def test_large_kl_keeps_score_near_start(single, batches):
    # The KL coefficient lives in the state (the adaptive controller updates it), so no recompilation.
    state = single.state.replace(reward=single.state.reward.replace(
        kl=single.state.reward.kl.replace(coef=jnp.float32(5.0))))
    _, history = run_steps(single, one_device_mesh(), state, 30, batches)
    assert single.step_fn._cache_size() == 1
    scores = np.array([h["judge/score"] for h in history])
    assert abs(scores[-5:].mean() - scores[:5].mean()) < 0.1
    assert history[-1]["kl/k1"] < 0.5


def test_one_device_equals_eight(world, single, batches):
    """Same seeds, same prompts: the step on a (data=2, fsdp=2, tensor=2) mesh of 8 fake devices matches the
    single-device step: metrics to 1e-4 relative / 1e-5 absolute (f32; reductions run in another order), params
    after 2 steps (8 Adam updates of lr 3e-3) to 1e-4 absolute, since Adam's m / sqrt(v) turns f32 rounding
    differences in near-zero gradients into differences of a fraction of the learning rate."""
    mesh8 = shd.make_mesh(2, 2, 2)
    s8 = build(make_config(world), mesh8)
    state1, hist1 = run_steps(single, one_device_mesh(), single.state, 2, batches)
    state8, hist8 = run_steps(s8, mesh8, s8.state, 2, batches)
    q = s8.state.params["policy"]["layers"]["q"]
    want = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(None, "fsdp", "tensor", None))
    assert q.sharding.is_equivalent_to(want, q.ndim)
    for key in ("judge/score", "optim/loss", "kl/k1", "response/length"):
        np.testing.assert_allclose(hist8[-1][key], hist1[-1][key], rtol=1e-4, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(jax.device_get(state1.params)), jax.tree.leaves(jax.device_get(state8.params))):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_one_device_equals_data_parallel(world, batches):
    """On a plain data-parallel mesh (data=2) the update runs per device in a shard_map
    (`train_step.accumulate_gradients`): with 2 micro-batches, chunked attention and chunked log-probs (scans
    inside it), 2 steps match one device's: metrics and params as in test_one_device_equals_eight."""
    c = make_config(world, **{"optim.grad_accum": 2, "compute.attention": "chunked", "compute.attention_chunk": 4,
                              "compute.logprob_chunk": 2})
    mesh2 = shd.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    s1, s2 = build(c, one_device_mesh()), build(c, mesh2)
    with shd.use_rules([tuple(r) for r in c.mesh.rules]), jax.set_mesh(mesh2):
        assert shd.data_parallel_axis() == ("data", 2)
    state1, hist1 = run_steps(s1, one_device_mesh(), s1.state, 2, batches)
    state2, hist2 = run_steps(s2, mesh2, s2.state, 2, batches)
    for key in ("judge/score", "optim/loss", "optim/grad_norm", "kl/k1", "value/explained_variance"):
        np.testing.assert_allclose(hist2[-1][key], hist1[-1][key], rtol=1e-4, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(jax.device_get(state1.params)), jax.tree.leaves(jax.device_get(state2.params))):
        np.testing.assert_allclose(a, b, atol=1e-4)


def write_reward_model(world, folder):
    """The tiny judge's backbone plus a random value head, saved as a reward-model folder."""
    judge = judging.load_judge(make_config(world).judge)
    head = {"kernel": jnp.linspace(-1.0, 1.0, judge.cfg.hidden_size), "bias": jnp.zeros(())}
    reward_model.save_reward_model(folder, judge.cfg, judge.params, head, judge.tokenizer, judge.spec)
    return folder


def test_gae_with_a_critic_from_the_reward_model_runs(world, batches, tmp_path):
    """GAE with a separate critic initialised from a reward model compiles and takes finite steps with the metrics
    it promises (REINFORCE with a separate critic: test_forward_microbatches_step_equals_whole_batch_step)."""
    write_reward_model(world, str(tmp_path / "rm"))
    s = build(make_config(world, **{"critic.kind": "separate", "critic.init": "reward_model",
                                    "critic.path": str(tmp_path / "rm")}), one_device_mesh())
    state, history = run_steps(s, one_device_mesh(), s.state, 2, batches)
    assert int(state.skipped_updates) == 0
    last = history[-1]
    assert np.isfinite(last["optim/loss"]) and np.isfinite(last["kl/k3"]) and np.isfinite(last["value/loss"])
    np.testing.assert_allclose(np.asarray(s.state.params["critic"]["head"]["kernel"]),
                               np.linspace(-1.0, 1.0, s.models.critic.hidden_size), rtol=1e-6)


@pytest.fixture(scope="module")
def rloo_adaptive(world):
    """RLOO with the KL as a loss term, an adaptive KL coefficient and running score normalisation: every piece
    of reward state in use (one compiled step, shared by the two tests below)."""
    return build(make_config(world, **{"algo.estimator": "rloo", "critic.kind": "none", "rollout.n_samples": 2,
                                       "reward.kl_in_reward": False, "reward.kl_estimator": "k3",
                                       "reward.adaptive_kl": True,
                                       "reward.kl_target": 0.5, "reward.kl_horizon": 100,
                                       "reward.score_norm": "running"}), one_device_mesh())


def test_rloo_kl_in_loss_adaptive_runs(rloo_adaptive, batches):
    state, history = run_steps(rloo_adaptive, one_device_mesh(), rloo_adaptive.state, 2, batches)
    assert int(state.skipped_updates) == 0
    last = history[-1]
    assert np.isfinite(last["optim/loss"]) and np.isfinite(last["kl/k3"])
    assert "policy/kl_loss_term" in last and "value/loss" not in last
    assert history[-1]["kl/coef"] != history[0]["kl/coef"]  # the controller moved the coefficient


def test_non_finite_guard_keeps_every_state_and_the_next_step_is_clean(rloo_adaptive, world):
    """A NaN injected in the judge makes every score, reward, loss and gradient NaN: the step skips every update
    and leaves params, optimizer state and reward state (running score statistics, KL coefficient) as they were;
    only step, rng and the skip counter move. The next step with a sound judge is then exactly the clean step
    from the original state with that rng (before the fix, the running statistics held the NaN, so every later
    step's scores were NaN)."""
    s, mesh, batch = rloo_adaptive, one_device_mesh(), [prompts(world)]
    c = make_config(world)
    bad_judge = dict(s.frozen.judge)
    bad_judge["lm_head"] = bad_judge["lm_head"].at[0, tiny.WORDS.index("5")].set(jnp.nan)
    after_bad, history = run_steps(s, mesh, s.state, 1, batch, frozen=s.frozen.replace(judge=bad_judge))
    assert np.isnan(history[0]["judge/score"])
    updates = c.algo.epochs * c.algo.minibatches
    assert int(after_bad.skipped_updates) == int(history[0]["guard/skipped_updates"]) == updates
    assert int(after_bad.step) == 1

    def kept(state):
        return jax.device_get((state.params, state.opt_state, state.reward))

    jax.tree.map(np.testing.assert_array_equal, kept(after_bad), kept(s.state))

    after_clean, (clean,) = run_steps(s, mesh, after_bad, 1, batch)
    assert int(clean["guard/skipped_updates"]) == 0 and int(after_clean.skipped_updates) == updates
    for key in ("judge/score", "optim/loss", "optim/grad_norm", "kl/coef", "reward/running_std", "reward/score"):
        assert np.isfinite(clean[key]), key
    want_state, (want,) = run_steps(s, mesh, s.state.replace(rng=after_bad.rng), 1, batch)
    assert clean.keys() == want.keys()
    for key in clean:
        np.testing.assert_array_equal(clean[key], want[key], err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, kept(after_clean), kept(want_state))


def test_guard_rejects_an_update_that_makes_params_non_finite():
    """Loss and gradients finite, but the step overflows a param to inf (3e38 + 1e38 > f32 max): rejected."""
    params, grads, loss = {"w": jnp.array([3e38, 1.0])}, {"w": jnp.array([-1.0, 0.5])}, jnp.float32(0.5)
    for lr, accepted in ((1e38, False), (0.1, True)):
        optimizer = optax.sgd(lr)
        new_params, _, kept, grad_norm = jax.jit(ts.guarded_update, static_argnums=0)(
            optimizer, grads, optimizer.init(params), params, loss)
        assert bool(kept) == accepted and np.isfinite(float(grad_norm))
        want = np.array([3e38 + 0.1, 1.0 - 0.05], np.float32) if accepted else np.asarray(params["w"])
        np.testing.assert_array_equal(np.asarray(new_params["w"]), want)


def test_adafactor_state_is_sharded_like_its_params_where_it_has_their_shape():
    """Adafactor's factored statistics drop one axis of a (256, 512) param: they are replicated, while the
    unfactored second moment of a small param is sharded like it; the sharded update equals optax's unsharded one."""
    mesh = shd.make_mesh(1, 8, 1)
    params = {"w": jnp.linspace(-1, 1, 256 * 512).reshape(256, 512), "b": jnp.linspace(0, 1, 16)}
    spec = {"w": jax.sharding.PartitionSpec("fsdp", None), "b": jax.sharding.PartitionSpec("fsdp")}
    param_shardings = {k: jax.sharding.NamedSharding(mesh, v) for k, v in spec.items()}
    config = tiny_config.get_config()
    config.optim.name = "adafactor"
    optimizer = ts.make_optimizer(config, 10)
    abstract = jax.eval_shape(optimizer.init, params)
    shardings = ts.optimizer_state_shardings(optimizer, abstract, jax.eval_shape(lambda: params), param_shardings,
                                             shd.replicated(mesh))
    leaves = [(a.shape, s.spec) for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))]
    assert ((16,), spec["b"]) in leaves and ((256,), jax.sharding.PartitionSpec()) in leaves
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    sharded = jax.device_put(params, param_shardings)
    state = jax.jit(optimizer.init, out_shardings=shardings)(sharded)
    updates, _ = jax.jit(optimizer.update, out_shardings=(param_shardings, shardings))(grads, state, sharded)
    want, _ = optimizer.update(grads, optimizer.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), updates, want)


def test_grad_accum_gives_the_same_gradient(world, single):
    """optim.grad_accum only splits a minibatch for memory: on rows of uneven lengths (7 and 4 valid tokens in
    the two micro-batches), 1 and 2 micro-batches give the same loss, metrics, values and gradient, with every
    loss term present (PPO-clip, entropy, value, KL loss term). The default token_mean; the other aggregations'
    shares are checked on plain arrays in test_conformance.py."""
    rng = np.random.default_rng(0)
    prompt, pmask = prompts(world, n=4)
    lengths = np.array([6, 1, 1, 3])
    rmask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.float32)

    def per_token(low, high):
        return rng.uniform(low, high, (4, 6)).astype(np.float32)

    data = dict(prompt=prompt, pmask=pmask, resp=rng.integers(3, len(tiny.WORDS), size=(4, 6)).astype(np.int32),
                rmask=rmask, old_logp=per_token(-3.0, -1.0), ref_logp=per_token(-3.0, -1.0),
                old_values=per_token(-1.0, 1.0), advantages=per_token(-1.0, 1.0), returns=per_token(-1.0, 1.0))
    assert "value_head" in single.state.params
    c = make_config(world, **{"algo.ent_coef": 0.01, "reward.kl_in_reward": False})
    assert c.algo.loss_agg == "token_mean"
    loss_fn = ts.make_loss_fn(c, single.models, jnp.float32(0.1), 1, single.frozen)

    @functools.partial(jax.jit, static_argnums=2)
    def run(params, d, accum):
        return ts.accumulate_gradients(functools.partial(loss_fn, norm=ops.loss_norm(d["rmask"])), params, d, accum)

    (loss1, (metrics1, values1), grads1) = run(single.state.params, data, 1)
    (loss2, (metrics2, values2), grads2) = run(single.state.params, data, 2)
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
    assert metrics1.keys() == metrics2.keys()
    for key in metrics1:
        np.testing.assert_allclose(float(metrics2[key]), float(metrics1[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(np.asarray(values2), np.asarray(values1), rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-4, atol=1e-6 * np.abs(g1).max())

def _while_bodies_with_all_reduce(hlo: str) -> list[str]:
    """Names of the compiled HLO's while-loop bodies that contain an all-reduce."""
    computations = {m.group(1): m.group(2) for m in re.finditer(r"^%?(\S+) [^\n]*\{\n(.*?)^\}", hlo, re.M | re.S)}
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    return [b for b in bodies if "all-reduce(" in computations.get(b, "")]


def test_data_parallel_accumulation_reduces_once():
    """On a plain data-parallel mesh (2 devices) each device sums its own rows' micro-batches and the gradients are
    all-reduced once, after the loop (no all-reduce inside a while body of the compiled program; in the benchmark's
    update XLA put one per micro-batch there before), with the same loss, gradient and per-row outputs, in row
    order, as one device for 1 and 2 micro-batches. A loss that needs pairs of rows together (group=2, DPO's)
    keeps them whole: with one row per device's micro-batch it falls back to the minibatch's own micro-batches,
    and still matches."""
    rng = np.random.default_rng(0)
    w = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
    d = {"x": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}

    def loss_fn(p, m):  # a share of the 4-row minibatch's mean, and a per-row output; rows split as the model's
        out = jnp.tanh(shd.constrain(m["x"], ("batch", None)) @ p["a"]) @ p["b"]
        return jnp.sum((out - m["y"]) ** 2) / 4, ({"sum_y": jnp.sum(m["y"])}, out)

    def pair_loss_fn(p, m):  # needs rows 2i and 2i + 1 in one micro-batch
        out = (jnp.tanh(m["x"] @ p["a"]) @ p["b"]).reshape(-1, 2)
        return jnp.sum((out[:, 0] - out[:, 1]) ** 2) / 2, ({}, None)

    want = {(fn, accum): jax.jit(lambda p, m, fn=fn, accum=accum: ts.accumulate_gradients(fn, p, m, accum))(w, d)
            for fn in (loss_fn, pair_loss_fn) for accum in (1, 2)}
    mesh = shd.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    with shd.use_rules(shd.DEFAULT_RULES), jax.set_mesh(mesh):
        assert shd.data_parallel_axis() == ("data", 2)
        rows = jax.device_put(d, {k: shd.batch_sharding(mesh, x.ndim) for k, x in d.items()})
        for fn, accum, group, per_device in ((loss_fn, 1, 1, True), (loss_fn, 2, 1, True),
                                             (pair_loss_fn, 1, 2, True), (pair_loss_fn, 2, 2, False)):
            compiled = jax.jit(lambda p, m: ts.accumulate_gradients(fn, p, m, accum, group)).lower(w, rows).compile()
            got = compiled(w, rows)
            if per_device:  # one all-reduce, outside the micro-batch loop
                hlo = compiled.as_text()
                assert "all-reduce(" in hlo and not _while_bodies_with_all_reduce(hlo)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                         got, want[fn, accum])
    for fsdp_or_tensor in (shd.make_mesh(2, 2, 2), shd.make_mesh(1, 8, 1)):  # XLA's own schedule (see there)
        with shd.use_rules(shd.DEFAULT_RULES), jax.set_mesh(fsdp_or_tensor):
            assert shd.data_parallel_axis() is None


def test_group_permutation_keeps_groups_whole():
    perm = np.asarray(ts.group_permutation(jax.random.key(0), 12, 3))
    assert sorted(perm) == list(range(12))
    groups = perm.reshape(4, 3)
    np.testing.assert_array_equal(groups - groups[:, :1], np.tile(np.arange(3), (4, 1)))  # whole, in order
    assert (groups[:, 0] % 3 == 0).all() and not np.array_equal(groups[:, 0], np.arange(0, 12, 3))  # shuffled


def test_shared_prompt_logprobs_equal_per_row_forward(world, single):
    """The learn phase runs each prompt once for the n samples of a group: its log-probs, entropies and hidden
    states equal the per-row forward's (1e-5), on one device and sharded over 8."""
    s = single
    cfg, params = s.models.policy, s.state.params["policy"]
    tokens, mask = prompts(world, seed=5)
    sc = rollout_lib.SamplingConfig(max_new_tokens=6, n_samples=2, stop_ids=(2,))
    roll = jax.jit(rollout_lib.rollout, static_argnums=(1, 5))(params, cfg, tokens, mask, jax.random.key(1), sc)
    assert not bool(roll.stopped_b.all()) and bool(roll.stopped_b.any())  # padded and full-length responses
    args = (roll.prompt_tokens_bp, roll.prompt_mask_bp, roll.response_tokens_br,
            roll.response_mask_br.astype(jnp.float32), 1.0)
    logprobs = jax.jit(ts.response_logprobs, static_argnums=(1, 7))
    per_row = logprobs(params, cfg, *args, 1)
    real = np.asarray(roll.response_mask_br) == 1
    rules = [tuple(r) for r in make_config(world).mesh.rules]
    for mesh in (one_device_mesh(), shd.make_mesh(2, 2, 2)):
        with shd.use_rules(rules), jax.set_mesh(mesh):
            on_mesh = jax.device_put(params, shd.tree_shardings(mesh, tfm.param_logical_axes(cfg), params))
            batch = [jax.device_put(x, shd.batch_sharding(mesh, x.ndim)) for x in args[:4]]
            shared = logprobs(on_mesh, cfg, *batch, 1.0, 2)
        for a, b in zip(per_row, shared):
            np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-5)


def test_chunked_logprobs_equal_whole_logprobs(single):
    """config.compute.logprob_chunk: the LM head over blocks of 4 of the 6 response positions (not whole blocks),
    each recomputed in the backward, gives the log-probs and entropies of the whole (B, R, V) logits, and the same
    gradients with respect to the params (LM head, tied or not) and the hidden states."""
    cfg, params = single.models.policy, single.state.params["policy"]
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 6, cfg.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 6)).astype(np.int32)
    mask = (np.arange(6)[None] < np.array([[6], [2], [5]])).astype(np.float32)
    w_logp, w_entropy = rng.normal(size=(2, 3, 6)).astype(np.float32)

    def run(cfg):
        def loss(p, h):
            logp, entropy = ts.token_logprobs(p, cfg, h, tokens, mask, 0.7)
            return (w_logp * logp + w_entropy * entropy).sum(), (logp, entropy)
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, hidden)

    (grads, (logp, entropy)), (want_grads, (want_logp, want_entropy)) = run(cfg.replace(logprob_chunk=4)), run(cfg)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(want_logp), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(want_entropy), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(entropy)[mask == 0] == 0) and np.all(np.asarray(entropy)[mask == 1] > 0)
    for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * np.abs(np.asarray(a)).max())


def test_shared_prompt_forward_step_equals_per_row_step(world, batches):
    """GRPO with 2 samples per prompt, one update per step: the learn phase whose forwards run each prompt once
    computes the same loss, gradient norm and policy metrics as the per-row forward (1e-5 relative). One update,
    because Adam turns f32 rounding differences in near-zero gradient entries into differences of a whole
    learning rate, and later updates would compare diverged params (tests/test_models.py compares the shared
    forward's gradients with the full forward's directly). KL coefficient 0: with a KL term in the reward, two
    identical samples of a group differ only by f32 noise in their KL, which GRPO's division by the group std
    blows up into O(1e-3) advantages of either sign."""
    runs = []
    for share in (True, False):
        c = make_config(world, **{"algo.estimator": "grpo", "critic.kind": "none", "rollout.n_samples": 2,
                                  "algo.epochs": 1, "algo.minibatches": 1, "reward.kl_coef": 0.0,
                                  "compute.share_prompt_forward": share})
        s = build(c, one_device_mesh())
        runs.append(run_steps(s, one_device_mesh(), s.state, 1, batches)[1][0])
    shared, per_row = runs
    for key in ("judge/score", "optim/loss", "optim/grad_norm", "policy/clipfrac", "policy/entropy"):
        np.testing.assert_allclose(shared[key], per_row[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_forward_microbatches_step_equals_whole_batch_step(world, batches):
    """config.compute.forward_microbatches = 2: the judge's forward, the reference's and the separate critic's
    forwards before the update and the rollout's prefill run their rows in two strided micro-batches under
    lax.map (groups of the 2 samples of a prompt kept together for the shared-prompt forward). The step's samples,
    scores, KL, values and update equal the whole-batch step's. (Also the REINFORCE estimator with a separate
    critic taking finite steps.)"""
    runs = []
    for microbatches in (1, 2):
        c = make_config(world, **{"algo.estimator": "reinforce", "critic.kind": "separate", "rollout.n_samples": 2,
                                  "algo.epochs": 1, "algo.minibatches": 1,
                                  "compute.forward_microbatches": microbatches})
        s = build(c, one_device_mesh())
        assert s.models.judge.forward_microbatches == s.models.policy.forward_microbatches == microbatches
        state, history = run_steps(s, one_device_mesh(), s.state, 1, batches)
        assert int(state.skipped_updates) == 0
        assert all(np.isfinite(history[0][k]) for k in ("optim/loss", "kl/k3", "value/loss"))
        runs.append(history[0])
    whole, micro = runs
    for key in ("response/length", "judge/score", "kl/k1", "value/explained_variance_before", "value/loss", "optim/loss",
                "optim/grad_norm"):
        np.testing.assert_allclose(micro[key], whole[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_lora_policy_and_critic_train_adapters_only(world, single, batches):
    """policy.lora_rank = 2 and a separate critic with critic.lora_rank = 2 (one build for both): the train state
    holds the policy's adapters and the critic's adapters and value head (and the optimizer state theirs), the
    frozen reference is the base of both (no copy of the policy: Frozen.critic_base stays None), the critic's
    values at the start are the full separate critic's (the initial policy's backbone under the same head: B = 0),
    and the first step samples, scores and measures KL as the full fine-tune's first step does. Two steps move
    both sets of B adapters, not the reference."""
    c = make_config(world, **{"policy.lora_rank": 2, "critic.kind": "separate", "critic.lora_rank": 2})
    s = build(c, one_device_mesh())
    adapters, critic = s.state.params["policy"], s.state.params["critic"]
    assert set(adapters) == {"layers"} and all(k.endswith(("_a", "_b")) for k in adapters["layers"])
    assert set(critic) == {"lora", "head"} and all(k.endswith(("_a", "_b")) for k in critic["lora"]["layers"])
    assert s.frozen.critic_base is None  # the critic's base is s.frozen.reference
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert size(adapters) < 0.15 * size(s.frozen.reference) and size(critic) < 0.15 * size(s.frozen.reference)
    assert size(s.state.opt_state) < size(s.frozen.reference)  # Adam's moments of the adapters and the head
    for a, b in zip(jax.tree.leaves(s.frozen.reference), jax.tree.leaves(single.frozen.reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The full separate critic of the same seed (its head's key does not depend on the critic's LoRA), from the
    # initial policy; values of the same rows under both.
    c_full = make_config(world, **{"policy.lora_rank": 2, "critic.kind": "separate"})
    full = ts.init_trainable(c_full, s.models, single.frozen.reference, jax.random.split(jax.random.key(c.seed))[0])
    for a, b in zip(jax.tree.leaves(full["critic"]["head"]), jax.tree.leaves(critic["head"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)  # jitted init vs eager: ~1 ulp
    tokens, mask = batches[0]
    resp = np.random.default_rng(0).integers(3, s.models.policy.vocab_size, (tokens.shape[0], 4)).astype(np.int32)
    rmask = np.ones(resp.shape, np.float32)

    def values(cfg, params):
        return np.asarray(jax.jit(lambda p, f: ts._values(p, cfg, s.models, f, None, tokens, mask, resp, rmask, 1))(
            params, s.frozen))

    lora_values = values(c, s.state.params)
    assert np.abs(lora_values).max() > 1e-3
    # Not bitwise: the heads differ by the ulp above, and XLA may fuse the merged forward differently.
    np.testing.assert_allclose(lora_values, values(c_full, full), rtol=1e-5, atol=1e-7)

    reference = jax.tree.map(np.asarray, s.frozen.reference)
    state, history = run_steps(s, one_device_mesh(), s.state, 2, batches)
    _, first = run_steps(single, one_device_mesh(), single.state, 1, batches)
    for key in ("response/length", "judge/score", "kl/k1"):
        np.testing.assert_allclose(history[0][key], first[0][key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert all(np.isfinite(v) for h in history for v in h.values() if np.ndim(v) == 0)
    assert "value/loss" in history[-1]
    for moved in (state.params["policy"]["layers"], state.params["critic"]["lora"]["layers"]):
        assert any(np.abs(np.asarray(v)).max() > 0 for k, v in moved.items() if k.endswith("_b"))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(s.frozen.reference)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_plan_mode_builds_what_training_builds(world, tmp_path):
    """`builder.build` from config.json and tokenizer files alone (plan mode) gives the model configs, judge spec
    and sampling settings, and the shapes, dtypes and shardings of the train state and frozen models, that the
    build with real weights gives, on a (data=2, fsdp=2, tensor=2) mesh. A reward-model judge and a separate critic
    initialised from it cover the value heads, the critic with LoRA its frozen base (`Frozen.critic_base`, the
    reward model's backbone) and adapters; compute.scan_unroll and remat reach the trained models only, the
    attention settings the judge too."""
    rm = write_reward_model(world, str(tmp_path / "rm"))
    c = make_config(world, **{"judge.mode": "reward_model", "judge.path": rm, "critic.kind": "separate",
                              "critic.init": "reward_model", "critic.path": rm, "critic.lora_rank": 2,
                              "compute.attention": "chunked",
                              "compute.attention_chunk": 4, "compute.logprob_chunk": 3})
    mesh = shd.make_mesh(2, 2, 2)
    rules = [tuple(r) for r in c.mesh.rules]
    with shd.use_rules(rules), jax.set_mesh(mesh):
        real = builder.build(c, mesh, rules)
        shapes = builder.build(c, mesh, rules, weights=False)
    assert shapes.models == real.models
    # scan_unroll and remat, in plan mode's shapes-only build: the critic (the 1-layer reward model) refuses remat,
    # whose recomputation XLA would merge into the forward of a scan that loops once (ModelConfig).
    other = copy.deepcopy(c)
    other.compute.scan_unroll = 2
    with shd.use_rules(rules), jax.set_mesh(mesh):
        unrolled = builder.build(other, mesh, rules, weights=False).models
        other.compute.scan_unroll, other.compute.remat = 1, "full"
        with pytest.raises(errors.ConfigError, match=r"config.compute on the model of config.critic.path: "
                                                     r"remat='full' needs .* num_layers=1 .* use remat='none'"):
            builder.build(other, mesh, rules, weights=False)
        other.critic.kind, other.critic.init, other.critic.path, other.critic.lora_rank = "value_head", "policy", "", 0
        rematted = builder.build(other, mesh, rules, weights=False).models
    assert (unrolled.policy.scan_unroll, unrolled.critic.scan_unroll, unrolled.judge.scan_unroll) == (2, 2, 1)
    assert (rematted.policy.remat, rematted.judge.remat) == ("full", "none")
    assert (real.models.policy.logprob_chunk, real.models.critic.logprob_chunk) == (3, 3)
    models = (real.models.policy, real.models.critic, real.models.judge)
    assert all((m.attention, m.attention_chunk) == ("chunked", 4) for m in models)
    assert shapes.judge_spec == real.judge_spec and shapes.sampling == real.sampling
    assert isinstance(shapes.frozen.judge, reward_model.RewardModelParams)
    assert set(real.state.params["critic"]) == {"lora", "head"}
    # B = 0: the critic's backbone is the reward model's (read as the judge's too), not the policy's.
    backbone = jax.jit(functools.partial(ts.critic_backbone, c))(real.state.params, real.frozen)
    for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(real.frozen.judge.model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for want, got in ((real.state, shapes.state), (real.frozen, shapes.frozen)):
        assert jax.tree.structure(want) == jax.tree.structure(got)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            assert isinstance(b, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (b.shape, b.dtype)
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def test_host_judge_path_step_equals_token_space_step(world, single, batches, tmp_path):
    """The same judge behind a tokenizer that differs only by an unused word: the host path (two compiled programs,
    judge prompts decoded, rendered and re-tokenised on the host) takes the same step as the fused token-space
    step, from the same state and PRNG stream."""
    judge = tiny.write_judge_with_other_tokenizer(str(tmp_path / "judge"))
    host = build(make_config(world, **{"judge.path": judge, "train.allow_tokenizer_mismatch": True}),
                 one_device_mesh())
    assert (host.judge_spec.path, single.judge_spec.path) == ("host", "token_space")
    assert isinstance(host.step_fn, ts.HostJudgeStep)
    _, fused = run_steps(single, one_device_mesh(), single.state, 1, batches)
    _, split = run_steps(host, one_device_mesh(), host.state, 1, batches)
    for key in ("judge/score", "judge/valid_mass", "response/length", "optim/loss", "optim/grad_norm", "kl/k1"):
        np.testing.assert_allclose(split[0][key], fused[0][key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_reasoning_judge_runs_inside_the_fused_step(world, single, batches):
    """judge.cot inside the compiled step: the judge writes a rationale (our sampler, in the fused program) before
    its score; the rationale's length is in the metrics and the score is not the plain judge's. (The reasoning
    itself is checked against a reference on both judge paths in tests/test_judging.py.)"""
    cot = {"judge.template": "Q : {prompt} R : {response} Q :", "judge.cot": dict(
        judging.reasoning.default_config(), enabled=True, answer_prompt=" S :", max_new_tokens=3)}
    fused = build(make_config(world, **cot), one_device_mesh())
    assert fused.judge_spec.reasoning is not None and not isinstance(fused.step_fn, ts.HostJudgeStep)
    _, got = run_steps(fused, one_device_mesh(), fused.state, 1, batches)
    _, plain = run_steps(single, one_device_mesh(), single.state, 1, batches)
    assert 0 < got[0]["judge/rationale_length"] <= 3
    np.testing.assert_allclose(got[0]["response/length"], plain[0]["response/length"])  # the same rollout
    assert abs(got[0]["judge/score"] - plain[0]["judge/score"]) > 1e-4
    assert np.isfinite(got[0]["optim/loss"])


def test_evaluation_adds_the_independent_evaluators_numbers(single, world):
    """config.eval.evaluator (here the tiny world's judge, asked pairwise and harmless): the evaluation adds
    eval/evaluator_*. At step 0 the policy is the initial one and greedy sampling gives both the same responses, so
    the win rate, its interval and the LC win rate are exactly 1/2 and both harmless P(yes) are equal; the same
    with the data's references as the baseline when they are the initial policy's responses (the references'
    plumbing: right-padded, ended by EOS)."""
    c = make_config(world)
    c.eval.evaluator.update(path=world["judge"], template=c.eval.pairwise_template, option_tokens=("1", "2"),
                            max_len=24, max_new_tokens=4, harmless_question="e f", yes_no_tokens=("1", "2"),
                            harmless_template="Q : {prompt} R : {response} Q : {criterion} S :")
    tokens, mask = prompts(world, seed=6)
    batch = data_lib.PromptBatch(tokens, mask, np.ones(len(tokens), np.int32), np.arange(len(tokens)))
    with jax.set_mesh(one_device_mesh()):
        evaluator = evaluate.Evaluator(c, single, [batch], one_device_mesh())
        out = evaluator.independent_metrics(single.state, single.frozen)
        initial = evaluator.independent._baseline[("initial_policy", 0)]
        c.eval.evaluator.baseline, c.data.reference_field = "reference", "reference"
        config_lib.validate(c, num_devices=1)
        references = dict(reference_bf=np.asarray(initial[0]), reference_mask_bf=np.asarray(initial[1]))
        evaluator.batches = [batch._replace(**references)]
        against_references = evaluator.independent_metrics(single.state, single.frozen)
    for metrics in (out, against_references):
        for name in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate"):
            assert metrics[f"eval/evaluator_{name}"] == 0.5, name
        assert metrics["eval/evaluator_harmless_p"] == metrics["eval/evaluator_baseline_harmless_p"]
        assert metrics["eval/evaluator_prompts"] == len(tokens)
    assert out["eval/evaluator_length_a"] > 0 and "eval/evaluator_harmless_rate_ci_high" in out


# ------------------------------------------------------------------------------------------------- judge ensembles
@pytest.fixture(scope="module")
def ensemble(world, tmp_path_factory):
    """The counting judge and a second one that counts the other way (strength -3: the more TARGET words, the lower
    its score), the reward their mean - 0.5 std: one compiled step on one device."""
    other = tiny.write_counting_judge(str(tmp_path_factory.mktemp("ensemble") / "judge"), strength=-3.0)
    c = make_config(world, **{"judge.ensemble_paths": (other,), "judge.ensemble_aggregate": "mean_minus_std",
                              "judge.ensemble_std_coef": 0.5})
    return c, build(c, one_device_mesh())


def test_ensemble_reward_is_the_aggregate_of_each_judge_scored_alone(ensemble, world):
    """One ensemble step: each judge scores the step's rollout on its own (`judging.score_jit`), and NumPy's mean
    - 0.5 std over the two, per response, averages to the step's judge/score (the score that shaping turns into
    the reward); each judge's mean score and their mean disagreement are logged."""
    c, s = ensemble
    tokens, mask = prompts(world, seed=1)
    _, (metrics,) = run_steps(s, one_device_mesh(), s.state, 1, [(tokens, mask)])
    _, k_roll, k_judge, _ = jax.random.split(s.state.rng, 4)
    roll = jax.jit(functools.partial(ts.rollout_phase, c, s.models, s.sampling))(s.state.params["policy"], tokens, mask,
                                                                              k_roll)
    members = ((s.frozen.judge, s.models.judge), (s.frozen.extra_judges[0], s.models.extra_judges[0]))
    scores_kb = np.stack([np.asarray(judging.score_jit(
        params, cfg, s.judge_spec, roll.prompt_tokens_bp, roll.prompt_mask_bp, roll.response_tokens_br,
        roll.response_mask_br, k_judge, rows_per_prompt=c.rollout.n_samples)[0], np.float64) for params, cfg in members])
    reward = scores_kb.mean(0) - 0.5 * scores_kb.std(0)
    assert reward.mean() < scores_kb.mean() - 0.01  # the judges disagree: the penalty is felt
    np.testing.assert_allclose(metrics["judge/score"], reward.mean(), rtol=1e-5, atol=1e-6)
    for k in range(2):
        np.testing.assert_allclose(metrics[f"judge/member_{k}_score"], scores_kb[k].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["judge/ensemble_std"], scores_kb.std(0).mean(), rtol=1e-5, atol=1e-6)


def test_an_ensemble_of_one_judge_twice_is_that_judge(ensemble, single, batches):
    """The same compiled ensemble step with its second judge's params replaced by the first's: the members agree
    (std 0), so mean - 0.5 std is the judge's own score and the step is the single judge's, metric by metric."""
    _, s = ensemble
    _, (got,) = run_steps(s, one_device_mesh(), s.state, 1, batches, frozen=s.frozen.replace(
        extra_judges=(s.frozen.judge,)))
    _, (want,) = run_steps(single, one_device_mesh(), single.state, 1, batches)
    assert got["judge/ensemble_std"] == 0 and got["judge/member_0_score"] == got["judge/member_1_score"]
    assert set(got) - set(want) == {"judge/member_0_score", "judge/member_1_score", "judge/ensemble_std"}
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_an_ensemble_of_two_sizes_builds_and_plans(world, tmp_path):
    """A 2-layer judge joins the 1-layer counting judge: plan mode's build from config.json and tokenizer files gives
    training's models and frozen shapes, plan mode counts both judges' forwards in its FLOPs, and the judge phase
    compiles from those shapes alone with both judges' params among its arguments (as `--plan_phases` compiles it;
    the whole ensemble step compiles in the tests above)."""
    other = tiny.write_opinionated_judge(str(tmp_path / "judge2"))
    c = make_config(world, **{"judge.ensemble_paths": (other,), "judge.ensemble_aggregate": "min"})
    mesh, rules = one_device_mesh(), [tuple(r) for r in c.mesh.rules]
    with shd.use_rules(rules), jax.set_mesh(mesh):
        real = builder.build(c, mesh, rules)
        shapes = builder.build(c, mesh, rules, weights=False)
        models, spec = shapes.models, shapes.judge_spec
        assert models == real.models and (models.judge.num_layers, models.extra_judges[0].num_layers) == (1, 2)
        assert jax.tree.structure(shapes.frozen) == jax.tree.structure(real.frozen)
        for a, b in zip(jax.tree.leaves(real.frozen), jax.tree.leaves(shapes.frozen)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype) and a.sharding.is_equivalent_to(b.sharding, a.ndim)
        examples, rows = ts.judged_examples(c), spec.max_len
        judges = plan.matmul_params(models.judge) + plan.matmul_params(models.extra_judges[0])
        assert plan.step_flops(c, models, spec)["judge"] == 2 * judges * examples * rows

        tokens = jax.ShapeDtypeStruct((c.train.batch_size, c.data.max_prompt_len), jnp.int32)
        roll = jax.eval_shape(functools.partial(ts.rollout_phase, c, models, shapes.sampling),
                              shapes.frozen.reference, tokens, tokens, jax.random.key(0))
        judge = jax.jit(lambda frozen, roll, key: ts.judge_phase(c, ts.token_space_score_fn(
            c, models, spec, frozen.judge, extra_judges=frozen.extra_judges), roll, key)[0])
        compiled = judge.lower(shapes.frozen, roll, jax.random.key(0)).compile()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(shapes.frozen.extra_judges) > nbytes(shapes.frozen.judge) > 0
    assert compiled.out_info.shape == (examples,)
    assert plan.memory_gib(compiled)["arguments_gib"] * plan.GIB >= nbytes((shapes.frozen.judge,
                                                                            shapes.frozen.extra_judges))
