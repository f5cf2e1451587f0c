"""The reward model (rlaif_jax/reward_model.py: loss, training, files) and the judge's reward_model mode.

A tiny random Llama is built with transformers and saved as an HF folder; the synthetic preferences prefer the
response whose last word is a "good" word. References: NumPy for the loss, HF PyTorch for the reward values of
the saved model.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlaif_jax import judging, reward_model
from rlaif_jax.models import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = [f"w{i}" for i in range(16)]
GOOD = [f"g{i}" for i in range(4)]
BAD = [f"b{i}" for i in range(4)]


def make_tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in ["Prompt", ":", "Response"] + WORDS + GOOD + BAD:
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def rm_judge_config(**overrides):
    c = judging.default_config("reward_model")
    c.update(overrides)
    return c


def make_pairs(rng, n):
    """The preferred response ends with a good word, the other with a bad one; soft labels in [.7, .95],
    positions randomised."""
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS, rng.randint(1, 5)))
        good = " ".join(list(rng.choice(WORDS, rng.randint(1, 4))) + [rng.choice(GOOD)])
        bad = " ".join(list(rng.choice(WORDS, rng.randint(1, 4))) + [rng.choice(BAD)])
        p = rng.uniform(0.7, 0.95)
        if rng.rand() < 0.5:
            out.append(dict(prompt=prompt, response_a=good, response_b=bad, p_a_better=p))
        else:
            out.append(dict(prompt=prompt, response_a=bad, response_b=good, p_a_better=1 - p))
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, max_position_embeddings=128)
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("rm_base"))
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(hf_folder, tmp_path_factory):
    rng = np.random.RandomState(0)
    train_records, eval_records = make_pairs(rng, 128), make_pairs(rng, 64)
    path = str(tmp_path_factory.mktemp("prefs") / "prefs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train_records)
    records = reward_model.read_preferences(path)
    rm_config = rm_judge_config(max_len=24)
    cfg, backbone = hf.load_model(hf_folder, dtype=rm_config.dtype, param_dtype=rm_config.param_dtype)
    tok = hf.load_tokenizer(hf_folder)
    spec = judging.make_spec(rm_config, tok)
    result = reward_model.train(cfg, backbone, judging.encode_pairs(spec, tok, records), steps=40, batch_size=16,
                                learning_rate=2e-3, seed=0, eval_data=judging.encode_pairs(spec, tok, eval_records),
                                log_every=0)
    out = str(tmp_path_factory.mktemp("rm_out"))
    reward_model.save_reward_model(out, cfg, result.params.model, result.params.value_head, tok, spec)
    return result, out, eval_records, train_records


def test_soft_bradley_terry_loss_against_numpy():
    r_a, r_b, p = np.array([1.0, -0.5, 2.0]), np.array([0.0, 0.5, 2.0]), np.array([0.9, 0.2, 0.5])
    d = r_a - r_b
    log_sig = lambda x: -np.log1p(np.exp(-x))
    want = -np.mean(p * log_sig(d) + (1 - p) * log_sig(-d))
    np.testing.assert_allclose(reward_model.soft_bradley_terry_loss(jnp.asarray(r_a), jnp.asarray(r_b), jnp.asarray(p)),
                               want, rtol=1e-6)
    assert reward_model.ranking_accuracy(np.array([1., 0, 3]), np.array([0., 1, 1]), np.array([.9, .8, .5])) == 0.5


def test_loss_decreases_and_ranks_held_out_pairs(trained):
    result, _, _, train_records = trained
    losses = np.asarray(result.losses)
    # The soft labels bound the loss from below by their mean binary entropy (about 0.46 nats here).
    p = np.asarray([r["p_a_better"] for r in train_records])
    floor = -np.mean(p * np.log(p) + (1 - p) * np.log(1 - p))
    last = losses[-10:].mean()
    assert losses[0] > floor + 0.1, (losses[0], floor)
    assert last < floor + 0.05, (last, floor)
    assert result.eval_accuracy >= 0.8, result.eval_accuracy  # chance is 0.5


def test_reward_model_mode_matches_hf_torch(trained):
    import torch
    from transformers import AutoModelForCausalLM
    result, out, eval_records, _ = trained
    config = rm_judge_config(max_len=24, path=out)
    judge = judging.load_judge(config)
    assert isinstance(judge.params, reward_model.RewardModelParams)
    records = eval_records[:6]
    prompts, responses = [r["prompt"] for r in records], [r["response_a"] for r in records]
    scores, metrics = judging.score_texts(judge.params, judge.cfg, judge.spec, judge.tokenizer, prompts, responses,
                                          jax.random.key(0))
    # Reference: HF PyTorch hidden state of the rendered text (unpadded) at its last token, times the head.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    head = {k: np.asarray(v) for k, v in judge.params.value_head.items()}
    want = []
    for p, r in zip(prompts, responses):
        ids = judge.tokenizer(f"Prompt : {p}\nResponse : {r}")["input_ids"]
        with torch.no_grad():
            h = model.model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        want.append(h @ head["kernel"] + head["bias"])
    np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4, atol=1e-4)
    assert int(metrics.summary(judge.spec)["judge/truncated_count"]) == 0
    # The folder refuses a template it was not trained with.
    with pytest.raises(ValueError, match=r"trained with config.judge.template='Prompt : \{prompt\}\\nResponse : "
                                         r"\{response\}' .*this run has '\{prompt\} ; \{response\}'"):
        judging.load_judge(rm_judge_config(max_len=24, path=out, template="{prompt} ; {response}"))


@pytest.mark.parametrize("setting,value,saved,fix", [("max_len", 32, "24", "24"),
                                                     ("truncation", "response_right", "'prompt_left'", "prompt_left"),
                                                     ("include_stop_token", True, "False", "False")])
def test_reward_model_refuses_other_read_settings(trained, setting, value, saved, fix):
    """Each setting that changes the rows a reward model reads must equal the one it was trained with (max_len=24,
    the defaults otherwise): another value is refused in one line naming the setting, its saved value, this
    run's and the fix."""
    _, out, _, _ = trained
    with pytest.raises(ValueError) as error:
        judging.load_judge(rm_judge_config(**{"max_len": 24, "path": out, setting: value}))
    message = str(error.value)
    assert "\n" not in message
    assert f"was trained with config.judge.{setting}={saved} (" in message
    assert f"this run has {value!r}" in message and f"set --config.judge.{setting}={fix}," in message


def test_sample_pairs_writes_two_policy_responses_per_prompt(tmp_path):
    """scripts/sample_pairs.py, the first step of distilled RLAIF, on the tiny world of tests/tiny.py."""
    import importlib.util
    import json

    from tests import tiny
    from tests.tiny_config import get_config

    tiny.make_world(str(tmp_path / "world"))
    spec = importlib.util.spec_from_file_location("sample_pairs", os.path.join(ROOT, "scripts", "sample_pairs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = str(tmp_path / "pairs.jsonl")
    assert module.sample_pairs(get_config(str(tmp_path / "world")), out, num_prompts=10, seed=0) == 10
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 10 and all(set(r) == {"prompt", "response_a", "response_b"} for r in rows)
    assert all(w in tiny.WORDS for r in rows for w in (r["response_a"] + " " + r["response_b"]).split())
    assert sum(r["response_a"] != r["response_b"] for r in rows) >= 8  # two independent samples per prompt


def test_normalize_to_references_centres_references_and_shifts_every_score(hf_folder):
    """After normalisation the references score 0 on average, and any other row's score moves by exactly the
    references' mean (computed here in NumPy from the scores before)."""
    from rlaif_jax.models import transformer as tfm
    rm_config = rm_judge_config(max_len=24)
    cfg, backbone = hf.load_model(hf_folder, dtype=rm_config.dtype, param_dtype=rm_config.param_dtype)
    tok = hf.load_tokenizer(hf_folder)
    spec = judging.make_spec(rm_config, tok)
    head = tfm.init_value_head(cfg, jax.random.key(1))
    head["bias"] = jnp.asarray(0.3, head["bias"].dtype)
    params = reward_model.RewardModelParams(backbone, head)
    pairs = make_pairs(np.random.RandomState(3), 5)
    prompts = [r["prompt"] for r in pairs]
    ref_tokens, ref_mask = judging.encode_responses(spec, tok, prompts, [r["response_a"] for r in pairs])
    other_tokens, other_mask = judging.encode_responses(spec, tok, prompts, [r["response_b"] for r in pairs])
    before_refs = reward_model.row_rewards(params, cfg, ref_tokens, ref_mask, batch_size=2)  # 5 rows: a padded batch
    before_other = reward_model.row_rewards(params, cfg, other_tokens, other_mask, batch_size=2)
    assert abs(before_refs.mean()) > 1e-2  # something to remove

    normalized, mean = reward_model.normalize_to_references(params, cfg, ref_tokens, ref_mask, batch_size=2)
    np.testing.assert_allclose(mean, before_refs.astype(np.float64).mean(), rtol=1e-6)
    after_refs = reward_model.row_rewards(normalized, cfg, ref_tokens, ref_mask, batch_size=2)
    after_other = reward_model.row_rewards(normalized, cfg, other_tokens, other_mask, batch_size=2)
    np.testing.assert_allclose(after_refs.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(after_other - before_other, -mean, atol=1e-6)
    np.testing.assert_allclose(float(normalized.value_head["bias"]), 0.3 - mean, rtol=1e-6)


def test_encode_responses_ends_complete_responses_with_eos_only_with_include_stop_token(hf_folder):
    tok = hf.load_tokenizer(hf_folder)
    for include, last in ((True, tok.eos_token_id), (False, tok.convert_tokens_to_ids("g1"))):
        spec = judging.make_spec(rm_judge_config(max_len=24, include_stop_token=include), tok)
        tokens, mask = judging.encode_responses(spec, tok, ["w1 w2"], ["w3 g1"])
        assert tokens[0, -1] == last and mask[0, -1] == 1


def test_scalar_model_folder_of_the_ppo_reproduction_loads_as_a_reward_model(tmp_path):
    """A reward model saved as the summarize-from-feedback reproductions save theirs (`ScalarModel`: a GPT-NeoX
    `AutoModel` under "lm_backbone.", a (1, D) "scalar_head", config.json with "base_config" and "bias") loads as
    judge.mode="reward_model" params, and scores rows as torch does: scalar_head(hidden_states[-1]) - bias."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    neox = transformers.GPTNeoXConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=64)
    backbone = transformers.GPTNeoXModel(neox).eval()
    head = torch.nn.Linear(32, 1)
    with torch.no_grad():
        for p in list(backbone.parameters()) + list(head.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    tensors = {f"lm_backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors.update({f"scalar_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["ScalarModel"], "base_model": "EleutherAI/pythia-160m", "base_config": neox.to_dict(),
        "hidden_size": 32, "bias": 0.25}))

    cfg, params = hf.load_model(str(tmp_path))
    assert cfg.family == "gpt_neox" and cfg.tie_word_embeddings  # no LM head: never used by a reward model
    rm = reward_model.RewardModelParams(params, reward_model.load_value_head(str(tmp_path), cfg))
    tokens = np.random.default_rng(0).integers(3, 61, (3, 7)).astype(np.int32)
    ours = np.asarray(reward_model.reward_values(rm, cfg, tokens, np.ones_like(tokens)))
    with torch.no_grad():
        hidden = backbone(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states[-1]
        want = (head(hidden)[:, -1, 0] - 0.25).numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4)
