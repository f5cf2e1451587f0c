"""Model code against HF transformers in PyTorch: parity per family, KV cache, import/export, sharding, errors."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from rlaif_jax import sharding as shd
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import HF_ACTIVATIONS, ModelConfig
from tests.tiny import hf_logits, left_padded_batch, save_random_hf_model

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # Llama-3 RoPE scaling with a short original context so the scaled, blended and kept bands all occur.
    "llama": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    # Pythia's layout: parallel residual, RoPE on half of each head, untied embed_out (num_key_value_heads is
    # ignored: GPT-NeoX has no GQA).
    "gpt_neox": (transformers.GPTNeoXConfig, dict(rotary_pct=0.5, rotary_emb_base=1000.0)),
}
# GPT-NeoX's other switches: sequential residual, RoPE on a quarter of each head, head tied to embed_in. Larger
# weights than the families' (noise 0.3) so that exact and tanh gelu differ by more than the parity tolerance.
NEOX_SEQUENTIAL_TIED = dict(use_parallel_residual=False, rotary_pct=0.25, tie_word_embeddings=True)

# A left-padded batch of three rows with 8, 5 and 3 real tokens.
LENGTHS = (8, 5, 3)
T = 8


def batch(vocab=97, seed=0):
    return left_padded_batch(LENGTHS, T, vocab, seed)


def make_hf_model(family, folder):
    cls, extra = FAMILIES[family]
    return save_random_hf_model(cls(**{**COMMON, **extra}), folder, noise=0.05)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: (str(root / f), make_hf_model(f, str(root / f))) for f in FAMILIES}


forward = jax.jit(tfm.forward, static_argnums=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_hf(checkpoints, family):
    folder, model = checkpoints[family]
    cfg, params = hf.load_model(folder)
    assert cfg.family == family
    tokens, mask = batch()
    ours = np.asarray(forward(params, cfg, tokens, mask).logits)
    ref = hf_logits(model, tokens, mask)
    diff = np.abs(ours - ref)[mask == 1].max()
    print(f"{family}: max |logits - HF| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_neox"])
def test_kv_cache_decoding_matches_full_forward(checkpoints, family):
    folder, _ = checkpoints[family]
    cfg, params = hf.load_model(folder)
    tokens, mask = batch(seed=1)
    full = np.asarray(forward(params, cfg, tokens, mask).logits)
    prompt = 4  # the two shorter rows are still all padding or partly padding here
    out, cache = jax.jit(tfm.prefill, static_argnums=(1, 4))(params, cfg, tokens[:, :prompt], mask[:, :prompt], T)
    steps = [np.asarray(out.logits)]
    step = jax.jit(tfm.decode, static_argnums=1)
    for t in range(prompt, T):
        # Rows whose prompt was all padding still see their first real token here, so feed the true mask.
        out, cache = step(params, cfg, tokens[:, t:t + 1], cache, mask[:, t:t + 1])
        steps.append(np.asarray(out.logits))
    cached = np.concatenate(steps, axis=1)
    assert np.abs(cached - full)[mask == 1].max() <= 1e-5
    assert int(cache.index) == T



@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_shared_prefix_forward_equals_full_forward(checkpoints, family):
    """Three left-padded prefixes (8, 5, 3 real tokens), two continuations each, some ending in padding (a response
    after its stop token): the shared-prefix forward equals `forward` on the concatenated rows, and so do its
    gradients (the n continuations' gradients sum into the shared prefix)."""
    folder, _ = checkpoints[family]
    cfg, params = hf.load_model(folder)
    prefix, prefix_mask = batch(seed=2)
    n, C = 2, 5
    rng = np.random.default_rng(3)
    cont = rng.integers(3, 97, size=(len(LENGTHS) * n, C)).astype(np.int32)
    cont_mask = (np.arange(C)[None, :] < np.array([5, 2, 4, 5, 1, 3])[:, None]).astype(np.int32)
    rows, rows_mask = np.repeat(prefix, n, axis=0), np.repeat(prefix_mask, n, axis=0)
    full_tokens, full_mask = np.concatenate([rows, cont], 1), np.concatenate([rows_mask, cont_mask], 1)
    real = full_mask == 1

    def full_logits(p):
        return tfm.forward(p, cfg, full_tokens, full_mask).logits

    def shared_logits(p):
        prefix_out, cont_out = tfm.forward_shared_prefix(p, cfg, prefix, prefix_mask, cont, cont_mask)
        return jax.numpy.concatenate([jax.numpy.repeat(prefix_out.logits, n, axis=0), cont_out.logits], axis=1)

    diff = np.abs(np.asarray(jax.jit(shared_logits)(params)) - np.asarray(jax.jit(full_logits)(params)))[real]
    assert diff.max() <= 1e-5

    weights = rng.normal(size=full_tokens.shape + (cfg.vocab_size,)).astype(np.float32) * real[..., None]
    grad_full = jax.jit(jax.grad(lambda p: (full_logits(p) * weights).sum()))(params)
    grad_shared = jax.jit(jax.grad(lambda p: (shared_logits(p) * weights).sum()))(params)
    # Gradients are sums over many positions and the vocabulary, accumulated in another order by each path: the
    # float32 error scales with the leaf's magnitude, not with each (possibly cancelling) entry.
    for a, b in zip(jax.tree.leaves(grad_full), jax.tree.leaves(grad_shared)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("family", ["qwen3", "gpt_neox"])
def test_round_trip_export_then_hf_load(checkpoints, tmp_path, family):
    folder, model = checkpoints[family]
    cfg, params = hf.load_model(folder)
    hf.save_model(params, cfg, str(tmp_path / "export"), max_shard_bytes=20_000)  # forces index sharding
    assert os.path.exists(tmp_path / "export" / "model.safetensors.index.json")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                                 attn_implementation="eager").eval()
    tokens, mask = batch()
    real = mask == 1
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask)[real], hf_logits(model, tokens, mask)[real])
    cfg2, params2 = hf.load_model(str(tmp_path / "export"))  # and our own importer reads the sharded index
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_gpt_neox_sequential_tied_parity_and_export(tmp_path):
    """Logits parity with HF on the left-padded batch, and the export loads in HF with the same logits."""
    model = save_random_hf_model(transformers.GPTNeoXConfig(**{**COMMON, **NEOX_SEQUENTIAL_TIED}),
                                 str(tmp_path / "hf"), noise=0.3)
    cfg, params = hf.load_model(str(tmp_path / "hf"))
    assert (cfg.parallel_residual, cfg.rotary_dim, cfg.tie_word_embeddings, cfg.activation) == (False, 2, True, "gelu")
    tokens, mask = batch()
    real = mask == 1
    ref = hf_logits(model, tokens, mask)
    assert np.abs(np.asarray(forward(params, cfg, tokens, mask).logits) - ref)[real].max() <= 1e-4
    hf.save_model(params, cfg, str(tmp_path / "export"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                                 attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask)[real], ref[real])


@pytest.mark.parametrize("family, window", [(f, None) for f in FAMILIES] + [("mistral", 3)])
def test_reading_some_positions_equals_the_full_forward_there(checkpoints, family, window):
    """`forward` and `forward_shared_prefix` with read positions, whose last layer computes only those (queries,
    attention, o projection, MLP; keys and values everywhere), give the full forward's logits and hidden states
    at them: every family's layer (biases, qk-norm, parallel residual, partial RoPE), GQA, a sliding window,
    left-padded rows and right-padded continuations, positions in the padding included."""
    folder, _ = checkpoints[family]
    cfg, params = hf.load_model(folder)
    cfg = dataclasses.replace(cfg, sliding_window=window)
    tokens, mask = batch(seed=4)
    read = np.array([[7, 2], [7, 5], [3, 7]], np.int32)  # row 3 has 3 real tokens: slot 3 is padding
    full = forward(params, cfg, tokens, mask)
    got = jax.jit(tfm.forward, static_argnums=1)(params, cfg, tokens, mask, read_br=read)
    for a, b in ((got.logits, full.logits), (got.hidden, full.hidden)):
        np.testing.assert_allclose(np.asarray(a), np.take_along_axis(np.asarray(b), read[..., None], 1),
                                   rtol=1e-5, atol=1e-5)

    n, C = 2, 4
    cont = np.random.default_rng(5).integers(3, 97, size=(len(LENGTHS) * n, C)).astype(np.int32)
    cont_mask = (np.arange(C)[None, :] < np.array([4, 1, 3, 4, 0, 2])[:, None]).astype(np.int32)
    read_nr = np.array([[3, 0], [0, 2], [2, 1], [3, 3], [0, 1], [1, 3]], np.int32)
    shared = jax.jit(tfm.forward_shared_prefix, static_argnums=1)
    prefix_all, cont_all = shared(params, cfg, tokens, mask, cont, cont_mask)
    prefix_read, cont_read = shared(params, cfg, tokens, mask, cont, cont_mask, read_nr=read_nr)
    np.testing.assert_allclose(np.asarray(prefix_read.hidden), np.asarray(prefix_all.hidden[:, -1:]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(prefix_read.logits), np.asarray(prefix_all.logits[:, -1:]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cont_read.logits),
                               np.take_along_axis(np.asarray(cont_all.logits), read_nr[..., None], 1),
                               rtol=1e-5, atol=1e-5)


def test_gpt_neox_shared_prefix_and_sharded_import(checkpoints):
    """The shared-prefix forward equals `forward` on the concatenated rows (logits; the gradients' path is the
    other families'), and the import onto a data x fsdp x tensor mesh (each device reading its slice of the fused
    query_key_value tensor) gives the single-device params, sharded."""
    folder, _ = checkpoints["gpt_neox"]
    cfg, params = hf.load_model(folder)
    prefix, prefix_mask = batch(seed=2)
    n, C = 2, 3  # two continuations per prefix, right-padded after their last token
    cont = np.random.default_rng(3).integers(3, 97, size=(len(LENGTHS) * n, C)).astype(np.int32)
    cont_mask = (np.arange(C)[None, :] < np.array([3, 1, 2, 3, 3, 1])[:, None]).astype(np.int32)
    rows, rows_mask = np.repeat(prefix, n, axis=0), np.repeat(prefix_mask, n, axis=0)
    full_tokens, full_mask = np.concatenate([rows, cont], 1), np.concatenate([rows_mask, cont_mask], 1)
    prefix_out, cont_out = jax.jit(tfm.forward_shared_prefix, static_argnums=1)(params, cfg, prefix, prefix_mask,
                                                                                 cont, cont_mask)
    shared = np.concatenate([np.repeat(np.asarray(prefix_out.logits), n, axis=0), np.asarray(cont_out.logits)], 1)
    full = np.asarray(forward(params, cfg, full_tokens, full_mask).logits)
    assert np.abs(shared - full)[full_mask == 1].max() <= 1e-5

    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    _, sharded = hf.load_model(folder, mesh=mesh)
    assert sharded["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert shd.check_sharded(mesh, sharded, min_size=1024) == []
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


def test_activations_match_hf():
    """Each HF hidden_act we accept, through our name for it, computes transformers' ACT2FN."""
    import torch
    from transformers.activations import ACT2FN
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    for hf_name, ours in HF_ACTIVATIONS.items():
        ref = ACT2FN[hf_name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(tfm.activation(x, ours)), ref, atol=2e-6, err_msg=hf_name)


def test_pythia_config_of_transformers_4(checkpoints):
    """Pythia's config.json (transformers 4.x) names RoPE's settings rotary_pct / rotary_emb_base and has no
    attention_bias: read as the 5.x fields are; and what we write keeps both spellings."""
    folder, _ = checkpoints["gpt_neox"]
    cfg = hf.load_config(folder)
    legacy = json.loads(open(os.path.join(folder, "config.json")).read())
    del legacy["rope_parameters"], legacy["attention_bias"]
    legacy.update(rotary_pct=0.5, rotary_emb_base=1000.0, transformers_version="4.24.0")
    assert ModelConfig.from_hf(legacy) == cfg
    assert (cfg.rotary_dim, cfg.rope_theta, cfg.qkv_bias, cfg.o_bias) == (4, 1000.0, True, True)
    written = cfg.to_hf()
    assert (written["rotary_pct"], written["rope_parameters"]["partial_rotary_factor"]) == (0.5, 0.5)


def test_sharded_forward_equals_single_device(checkpoints):
    folder, _ = checkpoints["llama"]
    cfg, params = hf.load_model(folder)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    _, sharded = hf.load_model(folder, mesh=mesh)
    # Weights really are split: q over fsdp (embed) and tensor (heads), the MLP over fsdp and tensor.
    assert sharded["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert sharded["layers"]["down"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert sharded["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # vocab 97 is odd
    assert shd.check_sharded(mesh, sharded, min_size=1024) == []
    assert len(sharded["layers"]["gate"].addressable_shards[0].data.reshape(-1)) == sharded["layers"]["gate"].size // 4
    tokens, mask = batch()
    tokens = np.concatenate([tokens, tokens[::-1]], 0)[:4]  # batch 4 divides data x fsdp
    mask = np.concatenate([mask, mask[::-1]], 0)[:4]
    with jax.set_mesh(mesh):
        x = jax.device_put(tokens, shd.batch_sharding(mesh, 2))
        m = jax.device_put(mask, shd.batch_sharding(mesh, 2))
        out = jax.jit(tfm.forward, static_argnums=1)(sharded, cfg, x, m)
    ref = forward(params, cfg, tokens, mask)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5)
    assert out.logits.sharding.spec[0] == ("data", "fsdp")


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "hello", "world"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>")
    folder = tmp_path / "tok"
    fast.save_pretrained(folder)
    loaded = hf.load_tokenizer(str(folder))
    assert loaded("hello world", add_special_tokens=False)["input_ids"] == [3, 4]


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def broken(checkpoints, tmp_path):
    src, _ = checkpoints["llama"]
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_error_unsupported_architecture(broken):
    edit_config(broken, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architecture: model_type='gpt2'.*GPT2LMHeadModel"):
        hf.load_model(str(broken))


def test_error_unsupported_activation(broken):
    edit_config(broken, hidden_act="quick_gelu")
    with pytest.raises(ValueError, match=r"unsupported hidden_act 'quick_gelu' \(supported: silu, swish, gelu"):
        hf.load_model(str(broken))


def test_error_missing_weights(broken):
    os.remove(broken / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match="no weights in .*model.safetensors"):
        hf.load_model(str(broken))


def test_error_missing_config(broken):
    os.remove(broken / "config.json")
    with pytest.raises(hf.CheckpointError, match="missing config.json"):
        hf.load_model(str(broken))


def test_error_missing_shard_file(checkpoints, tmp_path):
    folder, _ = checkpoints["qwen2"]
    cfg, params = hf.load_model(folder)
    hf.save_model(params, cfg, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.startswith("model-"))[1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(hf.CheckpointError, match=f"missing weight file {shard}"):
        hf.load_model(str(tmp_path / "sharded"))


def test_error_missing_tensor(broken):
    tensors = hf.SafetensorsReader(str(broken))
    kept = {n: np.array(tensors.get(n)) for n in tensors.names() if n != "model.layers.1.mlp.up_proj.weight"}
    hf.write_safetensors(str(broken / "model.safetensors"), kept)
    with pytest.raises(hf.CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf.load_model(str(broken))


def test_error_shape_mismatch(broken):
    edit_config(broken, intermediate_size=48)
    with pytest.raises(hf.CheckpointError,
                       match=r"shape mismatch for model.layers.0.mlp.gate_proj.weight: checkpoint has \(64, 32\), "
                             r"config.json implies \(48, 32\)"):
        hf.load_model(str(broken))


def test_error_not_a_folder(tmp_path):
    with pytest.raises(hf.CheckpointError, match="could not be fetched from the hub"):
        hf.load_model(str(tmp_path / "no-such-model"))


# ---------------------------------------------------------------------------------------------- memory settings
# config.compute's remat and attention settings change how the no-cache forward is computed, not what: each is
# checked against the plain path (remat "none", attention "xla", itself checked against HF above).
@pytest.fixture(scope="module")
def memory_model(checkpoints):
    """Params of the Mistral checkpoint (GQA: 4 query heads over 2 kv heads) and its config with a sliding window
    of 5, and config.compute's model settings: model(**settings) -> cfg."""
    cfg, params = hf.load_model(checkpoints["mistral"][0])
    return params, lambda **settings: cfg.replace(sliding_window=5, **settings)


def logits_and_grads(cfg, params, shared_prefix: bool, real_only: bool = False):
    """Logits of the left-padded batch (all positions, padding included) and the gradient of a random weighting
    of them, by `forward` or, with shared_prefix, by `forward_shared_prefix` (the batch as prefixes of 2
    continuations each). `real_only`: the logits and weights at real tokens only (zero at padding), what the
    fused kernels are equal on (models/fused_attention.py: a padding query attends differently)."""
    tokens, mask = batch()
    cont = np.random.default_rng(1).integers(3, 97, size=(2 * len(LENGTHS), 4)).astype(np.int32)
    cont_mask = (np.arange(4)[None] < np.array([4, 2, 4, 1, 3, 4])[:, None]).astype(np.int32)
    real = mask if not shared_prefix else np.concatenate([np.repeat(mask, 2, axis=0), cont_mask], axis=1)

    def logits(p):
        if not shared_prefix:
            out = tfm.forward(p, cfg, tokens, mask).logits
        else:
            prefix_out, cont_out = tfm.forward_shared_prefix(p, cfg, tokens, mask, cont, cont_mask)
            out = jax.numpy.concatenate([jax.numpy.repeat(prefix_out.logits, 2, axis=0), cont_out.logits], axis=1)
        return out * real[..., None] if real_only else out

    weights = np.random.default_rng(2).normal(size=jax.eval_shape(logits, params).shape).astype(np.float32)
    loss = lambda p: (logits(p) * weights).sum()  # noqa: E731
    return jax.jit(lambda p: (logits(p), jax.grad(loss)(p)))(params)


@pytest.fixture(scope="module")
def plain_run(memory_model):
    """The plain path's params, config maker and {(shared_prefix, real_only): (logits, gradients)} (computed
    when first asked for)."""
    params, model = memory_model
    runs = {}

    def plain(shared_prefix, real_only):
        if (shared_prefix, real_only) not in runs:
            runs[shared_prefix, real_only] = logits_and_grads(model(), params, shared_prefix, real_only)
        return runs[shared_prefix, real_only]
    return params, model, plain


def assert_same_as_plain(plain_run, shared_prefix: bool, real_only: bool = False, **settings):
    params, model, plain = plain_run
    got, want = logits_and_grads(model(**settings), params, shared_prefix, real_only), plain(shared_prefix, real_only)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,dkce->btkce", (2, 5, 8), (8, 2, 3, 4)),  # q/k/v: x narrower than the output (dense's own gradient)
    ("btd,dcf->btcf", (2, 5, 8), (8, 2, 12)),      # gate/up: likewise
    ("btf,fd->btd", (2, 5, 12), (12, 8)),          # down: x wider (JAX's own rule)
    ("nk,kd->nd", (10, 8), (8, 8)),                # o: equal widths (JAX's own rule)
    ("btd,dv->btv", (2, 5, 8), (8, 16)),           # the LM head (`unembed`): x narrower (dense's own gradient)
])
def test_dense_equals_einsum_values_and_gradients(spec, x_shape, w_shape):
    """`tfm.dense` (the weight matmuls, with their weight gradient written activation-first where that is
    cheaper) gives einsum's values, and the gradients of a random weighting of its output equal NumPy's
    dx = g w^T and dw = x^T g, summed over the token axes."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
    out = np.einsum(spec, x, w)
    g = rng.normal(size=out.shape).astype(np.float32)
    got = jax.jit(lambda x, w: tfm.dense(spec, x, w))(x, w)
    np.testing.assert_allclose(np.asarray(got), out, rtol=1e-5, atol=1e-5)
    dx, dw = jax.jit(jax.grad(lambda x, w: (tfm.dense(spec, x, w) * g).sum(), argnums=(0, 1)))(x, w)
    (x_axes, w_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    np.testing.assert_allclose(np.asarray(dx), np.einsum(f"{out_axes},{w_axes}->{x_axes}", g, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum(f"{x_axes},{out_axes}->{w_axes}", x, g), rtol=1e-5, atol=1e-5)


def test_weight_matmul_with_a_float32_output_matches_jax_rule_in_bfloat16():
    """The LM head's path (`unembed`: bfloat16 hidden states and head, float32 logits through
    `tfm.weight_matmul`'s own gradient): float32 values equal to einsum's with preferred_element_type, and
    gradients of the inputs' dtypes equal to JAX's own rule for that einsum."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    spec = "btd,dv->btv"
    plain = lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)  # noqa: E731
    ours = lambda x, w: tfm.weight_matmul(spec, x, w, jnp.float32)  # noqa: E731
    got, want = jax.jit(ours)(x, w), jax.jit(plain)(x, w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    grads = [jax.jit(jax.grad(lambda x, w, f=f: (f(x, w) * g).sum(), argnums=(0, 1)))(x, w) for f in (ours, plain)]
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_remat_policies_recompute_only_what_they_do_not_save(memory_model):
    """Matmuls in the gradient's program (the scan body counts once): "dots" saves every matmul's output, so it
    has exactly the plain path's; "minimal" recomputes attention's two (scores, and probabilities times values);
    "full" five of a layer's six (q/k/v, attention's two, o and gate/up; down's output is not needed by the
    backward). The weight matmuls are `tfm.dense`, a custom VJP whose dot dots_saveable cannot see: the policies
    keep them by name (tfm.DENSE_OUTPUT)."""
    params, model = memory_model
    tokens, mask = batch()

    def dots(**settings):
        cfg = model(**settings)
        loss = lambda p: tfm.forward(p, cfg, tokens, mask).logits.sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general")

    plain = dots()
    assert [dots(remat=r) - plain for r in ("dots", "minimal", "full")] == [0, 2, 5]


def test_remat_gradients_equal_no_remat(plain_run):
    """Remat "full" recomputes each layer of the scan in the backward pass: logits and gradients equal the run
    without remat. (The policies that save matmul outputs are checked with chunked attention below.)"""
    assert_same_as_plain(plain_run, False, remat="full")


@pytest.mark.parametrize("shared_prefix, remat", [(False, "minimal"), (True, "dots")])
def test_chunked_attention_equals_xla_attention(plain_run, shared_prefix, remat):
    """Online-softmax attention over key blocks of 5 (8 keys, or 12 with the shared prefix: not whole blocks),
    with GQA, a sliding window and left padding (padding queries that may see no key, where the plain softmax
    averages all keys): logits at every position and gradients equal the (B, H, T, S) softmax's, in `forward` and
    in the shared-prefix forward, whose continuations attend over their prefix's keys too; under a remat policy
    that saves the weight matmuls' outputs (minimal) or all matmuls' (dots) around the custom-VJP attention."""
    assert_same_as_plain(plain_run, shared_prefix, attention="chunked", attention_chunk=5, remat=remat)


# The kernels run through the shared-prefix forward, whose prefixes are `forward`'s case (queries at key slot t)
# and whose continuations attend at an offset over their prefix's keys: both offsets in one test.
def test_splash_attention_equals_xla_attention(plain_run):
    """The Pallas splash-attention kernel (TPU; here in Pallas' interpret mode, the same kernel code) with GQA
    (one multi-query kernel per kv head), the sliding window as a local mask, left padding and the shared
    prefix's right-padded continuations as segment ids, 8 or 12 slots padded to one 128-slot block: logits at
    every real position and the gradients of a loss on them equal the (B, H, T, S) softmax's."""
    assert_same_as_plain(plain_run, True, real_only=True, attention="splash", attention_chunk=128)


def test_cudnn_attention_path_equals_xla_attention(plain_run, monkeypatch):
    """attention="cudnn" as the model runs it (layouts, GQA head order, the segment mask) with the one thing
    that needs a GPU, jax.nn.dot_product_attention's cuDNN kernel, swapped for its XLA implementation: equal at
    real positions, forward and backward."""
    from rlaif_jax.models import fused_attention
    kernel = fused_attention.dot_product_attention
    calls = []

    def on_xla(*args):
        calls.append(args[-1])
        return kernel(*args[:-1], "xla")
    monkeypatch.setattr(fused_attention, "dot_product_attention", on_xla)
    assert_same_as_plain(plain_run, True, real_only=True, attention="cudnn")
    assert calls and set(calls) == {"cudnn"}


def test_splash_attention_sharded_and_packed(memory_model):
    """Under a (data=2, fsdp=2, tensor=2) mesh the splash kernel runs per device in a shard_map (rows over data
    and fsdp, kv heads over tensor), and packed rows (SFT's train.packing: segment ids) attend within their own
    sequence: the forward's logits at real tokens equal the plain path's, which has no mesh."""
    params, model = memory_model
    ids = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1],
                    [1, 1, 2, 2, 3, 3, 3, 0]], np.int32)
    tokens = np.random.default_rng(3).integers(3, 97, size=ids.shape).astype(np.int32)
    want = np.asarray(tfm.forward(params, model(), tokens, ids > 0, ids).logits)
    mesh = shd.make_mesh(2, 2, 2)
    with shd.use_rules(shd.DEFAULT_RULES), jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
                               params)
        got = jax.jit(lambda p, t, i: tfm.forward(p, model(attention="splash", attention_chunk=128), t, i > 0, i).logits
                      )(sharded, tokens, ids)
    real = (ids > 0)[..., None]
    np.testing.assert_allclose(np.asarray(got) * real, want * real, rtol=1e-5, atol=1e-5)


def test_fused_attention_choice_per_backend():
    """"fused" is cuDNN on GPU (half precision; float32 falls back to chunked), splash on TPU, chunked on CPU; an
    explicit kernel on another backend, or cuDNN in float32, is refused in one line."""
    from rlaif_jax.models import fused_attention as fa
    assert [fa.resolve("fused", b, "bfloat16") for b in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "chunked"]
    assert fa.resolve("fused", "gpu", "float32") == "chunked" and fa.resolve("xla", "tpu", "bfloat16") == "xla"
    fa.check_backend("fused", "cpu", "float32")
    with pytest.raises(ValueError, match="attention='splash' is the TPU kernel; this backend is cpu"):
        fa.check_backend("splash", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="bfloat16 and float16 kernels only; the model computes in float32"):
        fa.check_backend("cudnn", "gpu", "float32")


def test_remat_and_chunked_attention_lower_compiled_memory():
    """XLA's memory analysis of the compiled gradient of a loss through `forward` (4 layers, 512 tokens): remat
    "full" keeps only each layer's input for the backward pass, so its temporaries are smaller than without remat;
    chunked attention then drops the (B, H, T, T) scores that the recomputed layer still builds."""
    base = dict(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=16)
    tokens = jax.ShapeDtypeStruct((2, 512), np.int32)

    def temp_bytes(cfg):
        loss = lambda p, t: tfm.forward(p, cfg, t, t > 0).logits.mean()  # noqa: E731
        compiled = jax.jit(jax.grad(loss)).lower(tfm.abstract_params(cfg), tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, full = temp_bytes(ModelConfig(**base)), temp_bytes(ModelConfig(**base, remat="full"))
    chunked = temp_bytes(ModelConfig(**base, remat="full", attention="chunked", attention_chunk=128))
    print(f"temporaries (MiB): remat none {none / 2**20:.1f}, full {full / 2**20:.1f}, "
          f"full + chunked attention {chunked / 2**20:.1f}")
    assert full < 0.6 * none and chunked < 0.6 * full
    # The scan unrolled into one iteration: XLA inlines the loop and merges the recomputation with the forward, so
    # remat saves nothing (ModelConfig refuses the combination: the config below is built around that check).
    unrolled = ModelConfig(**base, scan_unroll=4)
    unrolled_remat = dataclasses.replace(unrolled)
    object.__setattr__(unrolled_remat, "remat", "full")
    assert temp_bytes(unrolled_remat) > 0.9 * temp_bytes(unrolled)
    with pytest.raises(ValueError, match=r"remat='full' needs the layer scan to loop at least twice: num_layers=4 "
                                         r"with scan_unroll=4 loops once.*use scan_unroll <= 2 or remat='none'"):
        ModelConfig(**base, scan_unroll=4, remat="full")


def test_map_microbatches_keeps_row_order_and_groups():
    """`map_microbatches` splits rows into strided micro-batches of whole groups, and puts the results back in
    row order: row-wise functions give the whole-batch result, and each call sees whole groups."""
    rows = np.arange(24, dtype=np.float32).reshape(12, 2)
    seen = []

    def fn(x):
        seen.append(x.shape)
        return x * 2.0, (x[::2, 0] - x[1::2, 0])  # the second output is per group of 2: pairs must stay together
    got, pair_diff = tfm.map_microbatches(lambda x: (fn(x)[0], jnp.repeat(fn(x)[1], 2)), 3, jnp.asarray(rows),
                                          group=2)
    np.testing.assert_array_equal(np.asarray(got), rows * 2)
    np.testing.assert_array_equal(np.asarray(pair_diff), np.full(12, -2.0))  # rows 2j, 2j + 1 together
    assert seen[0] == (4, 2)
    seen.clear()  # 6 groups do not divide into 4 micro-batches: 3 is the largest number that does
    got, _ = tfm.map_microbatches(lambda x: (fn(x)[0], jnp.repeat(fn(x)[1], 2)), 4, jnp.asarray(rows), group=2)
    np.testing.assert_array_equal(np.asarray(got), rows * 2)
    assert seen[0] == (4, 2)
    with pytest.raises(ValueError, match="13 rows are not whole groups of 2"):
        tfm.map_microbatches(fn, 4, jnp.ones((13, 2)), group=2)


def test_last_hidden_in_microbatches_equals_whole_batch(memory_model):
    """compute.forward_microbatches on the forward that frozen models (judge, reward model) run: the same final
    hidden states as all rows at once."""
    params, model = memory_model
    tokens, mask = batch()
    want = tfm.last_hidden(params, model(), tokens, mask)
    got = jax.jit(tfm.last_hidden, static_argnums=1)(params, model(forward_microbatches=3), tokens, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
