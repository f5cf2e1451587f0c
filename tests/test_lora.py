"""LoRA (rlaif_jax/lora.py): adapters with B = 0 leave the model unchanged, the merge is W + alpha / r * A @ B,
and the merged export loads in HF transformers (PyTorch) with the merged model's logits; the config's LoRA fields.
The LoRA steps (policy, critic) are in tests/test_train_step.py."""
import jax
import numpy as np
import pytest

from rlaif_jax import lora
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from tests import tiny

TARGETS = lora.DEFAULT_TARGETS


@pytest.fixture(scope="module")
def model():
    cfg = tiny.model_config()
    return cfg, tfm.init_params(cfg, jax.random.key(0))


def random_adapters(cfg, seed=1):
    """Adapters with B drawn too (lora.init leaves it at 0), so the merge changes every target."""
    adapters = lora.init(cfg, 3, TARGETS, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(adapters["layers"])))
    return {"layers": {k: (0.3 * jax.random.normal(next(keys), v.shape) if k.endswith("_b") else v)
                       for k, v in adapters["layers"].items()}}


def test_zero_b_adapters_equal_the_base_model(model):
    cfg, params = model
    adapters = lora.init(cfg, 4, TARGETS, jax.random.key(1))
    assert set(adapters["layers"]) == {f"{t}_{s}" for t in TARGETS for s in "ab"}
    assert all(not np.any(np.asarray(v)) for k, v in adapters["layers"].items() if k.endswith("_b"))
    merged = lora.merge(params, adapters, 16.0 / 4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, mask = tiny.left_padded_batch((5, 3), 6, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(tfm.forward(merged, cfg, tokens, mask).logits),
                                  np.asarray(tfm.forward(params, cfg, tokens, mask).logits))


def test_merge_is_w_plus_scaled_a_times_b(model):
    """Checked in NumPy per layer, on a weight with two in axes (o: heads, head_dim) and one with two out axes (q)."""
    cfg, params = model
    adapters, scale = random_adapters(cfg), 0.7
    merged = lora.merge(params, adapters, scale)
    for name in ("o", "q", "down"):
        w, a, b = (np.asarray(x, np.float64) for x in (params["layers"][name], adapters["layers"][name + "_a"],
                                                        adapters["layers"][name + "_b"]))
        for layer in range(cfg.num_layers):
            a2 = a[layer].reshape(-1, a.shape[-1])  # (in, r)
            b2 = b[layer].reshape(b.shape[1], -1)  # (r, out)
            want = w[layer] + scale * (a2 @ b2).reshape(w[layer].shape)
            np.testing.assert_allclose(np.asarray(merged["layers"][name][layer]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(params["embed"]))  # not a target


def test_merged_export_loads_in_transformers_with_the_merged_logits(model, tmp_path):
    import torch
    import transformers
    cfg, params = model
    merged = lora.merge(params, random_adapters(cfg), 2.0)
    hf.save_model(merged, cfg, str(tmp_path / "merged"), tokenizer=tiny.make_tokenizer())
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                                    torch_dtype=torch.float32).eval()
    tokens, mask = tiny.left_padded_batch((6, 4, 2), 6, cfg.vocab_size)
    ours = np.asarray(tfm.forward(merged, cfg, tokens, mask).logits, np.float64)
    theirs = tiny.hf_logits(torch_model, tokens, mask)
    np.testing.assert_allclose(ours * mask[..., None], theirs * mask[..., None], rtol=1e-4, atol=1e-4)
    base = np.asarray(tfm.forward(params, cfg, tokens, mask).logits, np.float64)
    assert np.abs(theirs - base)[mask == 1].max() > 1e-2  # the adapters changed the model that loads


def test_config_validation():
    import ml_collections
    p = ml_collections.ConfigDict(dict(lora_rank=2, lora_alpha=16.0, lora_targets=["q", "wq"]))
    with pytest.raises(ValueError, match=r"lora_targets has \['wq'\]"):
        lora.validate_config(p)
    p.lora_targets, p.lora_rank = ["q"], -1
    with pytest.raises(ValueError, match="lora_rank=-1 must be an int >= 0"):
        lora.validate_config(p)


def test_critic_lora_needs_a_separate_critic():
    """critic.lora_rank adapts a separate critic's backbone: refused with a value head (or no critic), not ignored;
    the critic's LoRA fields are checked under their own section's name."""
    from rlaif_jax import config as config_lib
    validate_critic = config_lib.section_validators()["critic"]
    cr = config_lib.base_config().critic
    cr.lora_rank = 2
    with pytest.raises(ValueError, match=r"config.critic.lora_rank=2 adapts a separate critic's backbone, and "
                                         r"config.critic.kind='value_head'"):
        validate_critic(cr)
    cr.kind = "separate"
    validate_critic(cr)
    cr.lora_targets = ["q", "wq"]
    with pytest.raises(ValueError, match=r"config.critic.lora_targets has \['wq'\]"):
        validate_critic(cr)
