"""The sampler against independent references: HF `generate` (greedy), HF's logits warpers and a NumPy
re-implementation of them (filtering + sampling frequencies), an HF forward over prompt + response
(log-probabilities), the traced program (one prefill for n samples), and the unsharded run (8 fake devices)."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

from rlaif_jax import rollout as rl
from rlaif_jax import sharding as shd
from rlaif_jax.models import hf
from rlaif_jax.models.config import ModelConfig
from tests.tiny import hf_logits, left_padded_batch, save_random_hf_model

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}
LENGTHS = (8, 5, 3, 6)  # real tokens per row of the left-padded prompt batch
P = 8

rollout = jax.jit(rl.rollout, static_argnums=(1, 5))


def prompts(seed=0, lengths=LENGTHS):
    return left_padded_batch(lengths, P, VOCAB, seed)


def make_hf_model(family, folder):
    cls, extra = FAMILIES[family]
    # Larger weights than the init, so the distributions are far from uniform.
    return save_random_hf_model(cls(**{**COMMON, **extra}), folder, noise=0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        folder = str(root / family)
        model = make_hf_model(family, folder)
        cfg, params = hf.load_model(folder)
        out[family] = (folder, model, cfg, params)
    return out


def hf_generate_greedy(model, tokens, mask, max_new, eos, min_new=0):
    with torch.no_grad():
        seq = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=max_new, min_new_tokens=min_new, eos_token_id=eos,
                             pad_token_id=0)
    return seq[:, tokens.shape[1]:].numpy()


# ---------------------------------------------------------------------------------------------- NumPy reference
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    m = np.max(np.where(finite, x, -np.inf), axis=-1, keepdims=True)
    z = np.where(finite, np.exp(x - m), 0.0)
    return np.where(finite, x - m - np.log(z.sum(-1, keepdims=True)), -np.inf)


def np_filter(logits_v, temperature, top_k, top_p):
    """HF's warpers written out in NumPy: ascending sort, drop tokens whose ascending cumulative prob <= 1 - p."""
    x = np.asarray(logits_v, np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending
        cum = np.cumsum(np.exp(np_log_softmax(x[order])))
        remove = cum <= 1 - top_p
        remove[-1] = False
        x = x.copy()
        x[order[remove]] = -np.inf
    return x


def np_sampling_probs(logits_v, temperature, top_k, top_p):
    return np.exp(np_log_softmax(np_filter(logits_v, temperature, top_k, top_p)))


def assert_frequencies_match(tokens, probs, label=""):
    """Each token's frequency within 5 standard errors of its probability: |f_i - p_i| <= 5 sqrt(p_i(1-p_i)/N).
    With <= 100 tokens a correct sampler fails this with probability < 100 * 5.7e-7 (two-sided 5 sigma, union
    bound); tokens of probability 0 must never be drawn."""
    N = len(tokens)
    freq = np.bincount(np.asarray(tokens), minlength=len(probs)) / N
    tol = 5 * np.sqrt(probs * (1 - probs) / N)
    assert np.all(freq[probs == 0] == 0), f"{label}: drew a filtered-out token"
    bad = np.abs(freq - probs) > tol
    assert not bad.any(), f"{label}: freq {freq[bad]} vs p {probs[bad]} (tol {tol[bad]})"


SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 4, 1.0),
    (1.3, 0, 0.8),
    (0.9, 6, 0.7),
]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_logits_equals_hf_warpers(temperature, top_k, top_p):
    logits = np.random.RandomState(1).randn(16, 50).astype(np.float32) * 3
    sc = rl.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(rl.filter_logits(jnp.asarray(logits), sc))
    warpers = [hf_lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(hf_lp.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(hf_lp.TopPLogitsWarper(top_p))
    ref = torch.tensor(logits)
    for w in warpers:
        ref = w(None, ref)
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)
    if top_k or top_p < 1:
        assert np.isinf(ours).any()  # the setting really removed something


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampling_frequencies_match_numpy(temperature, top_k, top_p):
    N = 20000
    logits_v = np.random.RandomState(2).randn(12).astype(np.float32) * 1.5
    sc = rl.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    token, sample_logp, policy_logp = jax.jit(rl.sample_token, static_argnums=2)(
        jax.random.uniform(jax.random.key(3), (N,)), jnp.broadcast_to(jnp.asarray(logits_v), (N, 12)), sc)
    token = np.asarray(token)
    probs = np_sampling_probs(logits_v, temperature, top_k, top_p)
    assert_frequencies_match(token, probs, f"T={temperature} k={top_k} p={top_p}")
    np.testing.assert_allclose(np.asarray(sample_logp), np.log(probs[token]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(policy_logp), np_log_softmax(logits_v / temperature)[token], atol=1e-5)


def test_rollout_first_token_distribution_matches_hf_logits(models):
    """One prompt, 4096 samples (n_samples: one prefill, repeated cache rows), one new token each: frequencies
    against the NumPy-filtered distribution of HF's logits for that prompt."""
    _, model, cfg, params = models["llama"]
    tokens, mask = prompts(seed=4, lengths=(6,))
    sc = rl.SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=30, top_p=0.9, n_samples=4096, stop_ids=(2,))
    out = rollout(params, cfg, tokens, mask, jax.random.key(5), sc)
    assert out.response_tokens_br.shape == (4096, 1)
    probs = np_sampling_probs(hf_logits(model, tokens, mask)[0, -1], 0.8, 30, 0.9)
    assert (probs > 0).sum() >= 5  # a non-trivial distribution
    assert_frequencies_match(np.asarray(out.response_tokens_br[:, 0]), probs, "rollout first token")


# ---------------------------------------------------------------------------------------------- greedy vs HF
def pick_eos(probe):
    """A token greedy emits early on some row but never on another, so that rows stop at different times."""
    for step in range(1, probe.shape[1] - 2):
        for row in probe:
            tok = int(row[step])
            if tok > 2 and any(tok not in other for other in probe):
                return tok
    return int(probe[0, 2])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_hf_generate(models, family):
    _, model, cfg, params = models[family]
    tokens, mask = prompts(seed=7)
    R = 12
    probe = hf_generate_greedy(model, tokens, mask, R, eos=2, min_new=R)  # no stop: choose an EOS from this
    eos = pick_eos(probe)
    ref = hf_generate_greedy(model, tokens, mask, R, eos=eos)
    out = rollout(params, cfg, tokens, mask, jax.random.key(0), rl.SamplingConfig(max_new_tokens=R, greedy=True,
                                                                                  stop_ids=(eos,)))
    ours, resp_mask = np.asarray(out.response_tokens_br), np.asarray(out.response_mask_br)
    lengths, stopped = np.asarray(out.lengths_b), np.asarray(out.stopped_b)
    assert stopped.any() and lengths.min() < R, "EOS must fall inside the window on some row"
    for row in range(len(tokens)):
        n = lengths[row]
        np.testing.assert_array_equal(ours[row, :n], ref[row, :n], err_msg=f"{family} row {row}")
        assert stopped[row] == (ours[row, n - 1] == eos) and (eos not in ours[row, :n - 1])
        np.testing.assert_array_equal(resp_mask[row], np.arange(R) < n)
        assert np.all(ours[row, n:] == 0)  # pad id after the stop
        if stopped[row]:
            assert np.all(ref[row, n:] == 0)  # HF pads after EOS too
    # Greedy: sample_logp is log 1; policy_logp is the model's log-prob of the argmax token at temperature 1.
    assert np.all(np.asarray(out.sample_logp_br) == 0)


# ---------------------------------------------------------------------------------------------- log-probs
def test_logprobs_equal_full_forward_recompute(models):
    _, model, cfg, params = models["qwen2"]
    tokens, mask = prompts(seed=9)
    T, K, TOP_P, R, n = 0.7, 10, 0.9, 10, 2
    sc = rl.SamplingConfig(max_new_tokens=R, temperature=T, top_k=K, top_p=TOP_P, n_samples=n, stop_ids=(5, 11))
    out = rollout(params, cfg, tokens, mask, jax.random.key(11), sc)
    resp, resp_mask = np.asarray(out.response_tokens_br), np.asarray(out.response_mask_br)
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens_bp), np.repeat(tokens, n, 0))
    np.testing.assert_array_equal(np.asarray(out.prompt_mask_bp), np.repeat(mask, n, 0))
    full_tokens = np.concatenate([np.repeat(tokens, n, 0), resp], 1)
    full_mask = np.concatenate([np.repeat(mask, n, 0), resp_mask], 1)
    logits = hf_logits(model, full_tokens, full_mask)[:, P - 1:P - 1 + R]  # position P-1+t predicts token t
    want_policy = np.zeros((len(resp), R))
    want_sample = np.zeros((len(resp), R))
    for i in range(len(resp)):
        for t in range(R):
            if resp_mask[i, t]:
                want_policy[i, t] = np_log_softmax(logits[i, t] / T)[resp[i, t]]
                want_sample[i, t] = np_log_softmax(np_filter(logits[i, t], T, K, TOP_P))[resp[i, t]]
    np.testing.assert_allclose(np.asarray(out.policy_logp_br), want_policy, atol=2e-4)
    np.testing.assert_allclose(np.asarray(out.sample_logp_br), want_sample, atol=2e-4)
    # Filtering renormalises over fewer tokens, so the sampled distribution gives them more mass.
    assert np.all(want_sample <= 0) and np.any(want_sample > want_policy + 1e-3)
    # Samples of one prompt differ (own randomness per row); masks are 1 up to and including the first stop.
    assert np.any(resp[0::2] != resp[1::2])
    for i in range(len(resp)):
        stops = np.flatnonzero(np.isin(resp[i], (5, 11)) & (resp_mask[i] == 1))
        n_i = stops[0] + 1 if len(stops) else R
        np.testing.assert_array_equal(resp_mask[i], np.arange(R) < n_i)
        assert out.lengths_b[i] == n_i and bool(out.stopped_b[i]) == bool(len(stops))


# ---------------------------------------------------------------------------------------------- n samples
def _dot_output_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes.extend(_dot_output_shapes(sub))
    return shapes


def test_n_samples_share_one_prefill(models, monkeypatch):
    _, _, cfg, params = models["llama"]
    tokens, mask = prompts(seed=3)
    B, n, R = len(tokens), 3, 5
    calls = []
    real_prefill = rl.tfm.prefill

    def counting_prefill(params, cfg, tokens_bt, *args, **kwargs):
        calls.append(tokens_bt.shape)
        return real_prefill(params, cfg, tokens_bt, *args, **kwargs)

    monkeypatch.setattr(rl.tfm, "prefill", counting_prefill)
    sc = rl.SamplingConfig(max_new_tokens=R, n_samples=n)
    jaxpr = jax.make_jaxpr(rl.rollout, static_argnums=(1, 5))(params, cfg, tokens, mask, jax.random.key(0), sc)
    assert calls == [(B, P)]  # traced once, on the B prompts (not B * n rows)
    shapes = _dot_output_shapes(jaxpr.jaxpr)
    # The LM head over a prompt-length block runs exactly once, on B rows; decoding runs on B * n rows.
    assert shapes.count((B, P, cfg.vocab_size)) == 1
    assert (B * n, P, cfg.vocab_size) not in shapes
    assert (B * n, 1, cfg.vocab_size) in shapes
    monkeypatch.undo()

    # And greedy with n samples is each prompt's greedy response repeated n times.
    greedy = rl.SamplingConfig(max_new_tokens=R, greedy=True, n_samples=n)
    many = rollout(params, cfg, tokens, mask, jax.random.key(0), greedy)
    one = rollout(params, cfg, tokens, mask, jax.random.key(0), rl.SamplingConfig(max_new_tokens=R, greedy=True))
    np.testing.assert_array_equal(np.asarray(many.response_tokens_br), np.repeat(np.asarray(one.response_tokens_br),
                                                                                 n, 0))


# ---------------------------------------------------------------------------------------------- cache phases
def test_cache_phase_lengths():
    # Step t writes slot P + t - 1; each phase's cache covers its last step, rounded up to 16 slots.
    assert rl.cache_phase_lengths(32, 64, 4) == [(16, 48), (32, 64), (48, 80), (64, 96)]
    assert rl.cache_phase_lengths(32, 64, 1) == [(64, 96)]
    assert rl.cache_phase_lengths(6, 3, 4) == [(1, 16), (2, 16), (3, 16)]  # no empty phases


def test_cache_phases_do_not_change_the_samples(models):
    """Sampling with rows stopping at different steps, n = 2: one phase and four phases draw the same tokens
    with the same log-probs (the grown slots are masked, so attention sees the same keys)."""
    _, _, cfg, params = models["qwen2"]
    tokens, mask = prompts(seed=6)
    outs = [rollout(params, cfg, tokens, mask, jax.random.key(7),
                    rl.SamplingConfig(max_new_tokens=9, n_samples=2, stop_ids=tuple(range(3, 12)), cache_phases=k))
            for k in (1, 4)]
    lengths = np.asarray(outs[0].lengths_b)
    assert lengths.min() < 9 and len(set(lengths.tolist())) > 1, lengths  # stops inside the window, at different steps
    np.testing.assert_array_equal(np.asarray(outs[1].response_tokens_br), np.asarray(outs[0].response_tokens_br))
    np.testing.assert_allclose(np.asarray(outs[1].policy_logp_br), np.asarray(outs[0].policy_logp_br), atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs[1].sample_logp_br), np.asarray(outs[0].sample_logp_br), atol=1e-5)


def test_sharded_decode_weights_do_not_change_the_samples(models):
    """rollout.decode_weights="sharded" (stacked weights and cache, the layers under lax.scan) draws the same tokens
    with the same log-probs as the default unrolled layers, with rows stopping at different steps, n = 2 and
    four cache phases."""
    _, _, cfg, params = models["qwen2"]
    tokens, mask = prompts(seed=6)
    outs = [rollout(params, cfg, tokens, mask, jax.random.key(7),
                    rl.SamplingConfig(max_new_tokens=9, n_samples=2, stop_ids=tuple(range(3, 12)), decode_weights=w))
            for w in ("gathered", "sharded")]
    lengths = np.asarray(outs[0].lengths_b)
    assert lengths.min() < 9 and len(set(lengths.tolist())) > 1, lengths
    np.testing.assert_array_equal(np.asarray(outs[1].response_tokens_br), np.asarray(outs[0].response_tokens_br))
    np.testing.assert_allclose(np.asarray(outs[1].policy_logp_br), np.asarray(outs[0].policy_logp_br), atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs[1].sample_logp_br), np.asarray(outs[0].sample_logp_br), atol=1e-5)


# ---------------------------------------------------------------------------------------------- sharded
@pytest.mark.parametrize("decode_weights", ["gathered", "sharded"])
def test_sharded_greedy_equals_unsharded(models, decode_weights):
    folder, _, cfg, params = models["llama"]
    tokens, mask = prompts(seed=3)
    ref = rollout(params, cfg, tokens, mask, jax.random.key(0), rl.SamplingConfig(max_new_tokens=5, greedy=True))
    sc = rl.SamplingConfig(max_new_tokens=5, greedy=True, decode_weights=decode_weights)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    _, sharded = hf.load_model(folder, mesh=mesh)
    with jax.set_mesh(mesh):
        x = jax.device_put(tokens, shd.batch_sharding(mesh, 2))
        m = jax.device_put(mask, shd.batch_sharding(mesh, 2))
        out = jax.jit(rl.rollout, static_argnums=(1, 5))(sharded, cfg, x, m, jax.random.key(0), sc)
    np.testing.assert_array_equal(np.asarray(out.response_tokens_br), np.asarray(ref.response_tokens_br))
    np.testing.assert_allclose(np.asarray(out.policy_logp_br), np.asarray(ref.policy_logp_br), atol=1e-5)
    assert out.response_tokens_br.sharding.spec[0] == ("data", "fsdp")
    assert len(out.response_tokens_br.sharding.device_set) == 8


# ---------------------------------------------------------------------------------------------- config
def test_config_resolution_and_validation():
    cfg = rl.default_config()
    model_cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(2, 7))
    sc = rl.SamplingConfig.from_config(cfg, model_cfg)
    assert sc.stop_ids == (2, 7) and sc.cache_dtype is None and sc.max_new_tokens == cfg.max_new_tokens
    cfg.stop_ids = [5]
    assert rl.SamplingConfig.from_config(cfg, model_cfg).stop_ids == (5,)
    hash(sc)  # static under jit
    with pytest.raises(ValueError, match="top_p"):
        rl.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="greedy"):
        rl.SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="cache_phases"):
        rl.SamplingConfig(cache_phases=0)
    # decode_weights "auto": "sharded" on a mesh with an fsdp axis, else "gathered"; "auto" is resolved, never kept.
    cfg.decode_weights = "auto"
    assert rl.SamplingConfig.from_config(cfg, model_cfg).decode_weights == "gathered"
    for fsdp, want in ((2, "sharded"), (1, "gathered")):
        with jax.set_mesh(shd.make_mesh(data=8 // fsdp, fsdp=fsdp, tensor=1)):
            assert rl.SamplingConfig.from_config(cfg, model_cfg).decode_weights == want
    with pytest.raises(ValueError, match="decode_weights"):
        rl.SamplingConfig(decode_weights="auto")
