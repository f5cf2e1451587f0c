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

from rlaif_jax import errors, judging, reward_model, reward_model_stage
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
def world(hf_folder, tmp_path_factory):
    """The stage's inputs: 128 training pairs, 64 held-out pairs and 16 reference responses (JSONL files)."""
    rng = np.random.RandomState(0)
    root = tmp_path_factory.mktemp("rm_world")
    files = {"train": make_pairs(rng, 128), "eval": make_pairs(rng, 64),
             "references": [dict(prompt=r["prompt"], completion=r["response_a"]) for r in make_pairs(rng, 16)]}
    for name, records in files.items():
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return str(root), files


def stage_config(hf_folder, root):
    """40 steps of 16 pairs (2 micro-batches of 8, one per fake device), held-out evaluation every 20 steps,
    checkpoints every 10, and normalisation to the references."""
    c = reward_model_stage.base_config()
    c.seed = 5  # a value head that ranks the held-out pairs at chance (0.48) before training: the rise is training's
    c.policy.path = hf_folder
    c.judge.max_len = 24
    c.data.path, c.data.eval_path = f"{root}/train.jsonl", f"{root}/eval.jsonl"
    c.data.normalize_to = f"{root}/references.jsonl"
    c.train.batch_size, c.train.steps = 16, 40
    c.optim.learning_rate, c.optim.grad_accum = 2e-3, 2
    c.eval.every, c.eval.batch_size = 20, 32
    c.checkpoint.every_steps, c.checkpoint.max_to_keep = 10, 2
    c.logging.progress_bar = False
    c.lock()
    return c


def metric_records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def trained(hf_folder, world, tmp_path_factory):
    """The stage's run, uninterrupted: (workdir, its reward-model folder)."""
    workdir = str(tmp_path_factory.mktemp("rm_run"))
    assert reward_model_stage.launch(stage_config(hf_folder, world[0]), workdir) == 0
    return workdir, os.path.join(workdir, "reward_model")


def test_soft_bradley_terry_loss_and_gradient_against_numpy():
    r_a, r_b, p = np.array([1.0, -0.5, 2.0, 0.3]), np.array([0.0, 0.5, 2.0, -1.2]), np.array([0.9, 0.2, 0.5, 1.0])
    d = r_a - r_b
    log_sig = lambda x: -np.log1p(np.exp(-x))
    want = -np.mean(p * log_sig(d) + (1 - p) * log_sig(-d))
    # dL/dr_a = -(p - sigmoid(d)) / N = -dL/dr_b
    want_grad = -(p - 1 / (1 + np.exp(-d))) / len(d)
    loss, (grad_a, grad_b) = jax.value_and_grad(reward_model.soft_bradley_terry_loss, argnums=(0, 1))(
        jnp.asarray(r_a), jnp.asarray(r_b), jnp.asarray(p))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(grad_a, want_grad, rtol=1e-5)
    np.testing.assert_allclose(grad_b, -want_grad, rtol=1e-5)
    assert reward_model.ranking_accuracy(np.array([1., 0, 3]), np.array([0., 1, 1]), np.array([.9, .8, .5])) == 0.5


def test_stage_loss_falls_and_held_out_accuracy_rises(trained, world):
    workdir, _ = trained
    records = metric_records(workdir)
    train = [r for r in records if "rm/loss" in r]
    held_out = {r["step"]: r for r in records if "eval/rm_accuracy" in r}
    assert [r["step"] for r in train] == list(range(1, 41)) and sorted(held_out) == [0, 20, 40]
    # The soft labels bound the loss from below by their mean binary entropy (about 0.46 nats here).
    p = np.asarray([r["p_a_better"] for r in world[1]["train"]])
    floor = -np.mean(p * np.log(p) + (1 - p) * np.log(1 - p))
    losses = np.asarray([r["rm/loss"] for r in train])
    assert losses[0] > floor + 0.1, (losses[0], floor)
    assert losses[-10:].mean() < floor + 0.05, (losses[-10:].mean(), floor)
    assert held_out[0]["eval/rm_accuracy"] < 0.6 and held_out[40]["eval/rm_accuracy"] >= 0.9, held_out
    assert held_out[40]["eval/rm_loss"] < held_out[0]["eval/rm_loss"] - 0.2, held_out
    assert all(r["guard/skipped_updates"] == 0 for r in train)


def test_stage_resumes_after_an_interruption_as_if_uninterrupted(hf_folder, world, trained, tmp_path, monkeypatch):
    """A run that dies at step 25 (checkpoints at 10 and 20) and is launched again finishes with the metrics and the
    reward-model files of the uninterrupted run, bit for bit. (Both launches load the compiled programs of the
    `trained` run from the session's compilation cache, tests/conftest.py.)"""
    from rlaif_jax import metrics as metrics_lib

    full, _ = trained
    workdir = str(tmp_path / "run")
    write = metrics_lib.MetricsWriter.write

    def dies_at_step_25(self, step, metrics):
        if step == 25:
            raise KeyboardInterrupt("killed")  # not an Exception: nothing on the way may catch it
        return write(self, step, metrics)

    with monkeypatch.context() as patched:
        patched.setattr(metrics_lib.MetricsWriter, "write", dies_at_step_25)
        with pytest.raises(KeyboardInterrupt):
            reward_model_stage.launch(stage_config(hf_folder, world[0]), workdir)
    assert max(r["step"] for r in metric_records(workdir)) == 24 and not os.path.exists(f"{workdir}/reward_model")
    assert reward_model_stage.launch(stage_config(hf_folder, world[0]), workdir) == 0
    assert open(f"{workdir}/metrics.jsonl").read() == open(f"{full}/metrics.jsonl").read()
    for name in ("model.safetensors", reward_model.VALUE_HEAD_FILE, reward_model.REWARD_MODEL_META_FILE):
        assert open(f"{workdir}/reward_model/{name}", "rb").read() == open(f"{full}/reward_model/{name}", "rb").read()


def test_export_scores_in_reward_model_mode_as_the_stage_evaluated_it(trained, world):
    """judge.mode="reward_model" reads the exported folder: its scores of the held-out pairs give the loss and
    accuracy the stage logged after the last step (NumPy Bradley-Terry), and the references score 0 on average."""
    workdir, out = trained
    _, files = world
    judge = judging.load_judge(rm_judge_config(max_len=24, path=out))

    def scores(prompts, responses):
        return np.asarray(judging.score_texts(judge.params, judge.cfg, judge.spec, judge.tokenizer, prompts,
                                              responses, jax.random.key(0))[0], np.float64)

    held_out = files["eval"]
    prompts = [r["prompt"] for r in held_out]
    r_a = scores(prompts, [r["response_a"] for r in held_out])
    r_b = scores(prompts, [r["response_b"] for r in held_out])
    p = np.asarray([r["p_a_better"] for r in held_out])
    d = r_a - r_b
    loss = -np.mean(p * -np.log1p(np.exp(-d)) + (1 - p) * -np.log1p(np.exp(d)))
    logged = metric_records(workdir)[-1]
    assert logged["step"] == 40
    np.testing.assert_allclose(loss, logged["eval/rm_loss"], rtol=1e-5)
    assert np.mean((r_a > r_b) == (p > 0.5)) == logged["eval/rm_accuracy"]
    references = files["references"]
    reference_scores = scores([r["prompt"] for r in references], [r["completion"] for r in references])
    assert abs(reference_scores.mean()) < 1e-5 and reference_scores.std() > 0.1


def test_reward_model_mode_matches_hf_torch(trained, world):
    import torch
    from transformers import AutoModelForCausalLM
    _, out = trained
    eval_records = world[1]["eval"]
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
    _, out = trained
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

    normalized, mean = reward_model.normalize_to_references(params, before_refs)
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


@pytest.mark.parametrize("section,field,value,message", [
    ("judge", "mode", "pairwise", "config.judge.mode='pairwise': the reward-model stage renders rows of a "
                                  "reward_model judge"),
    ("judge", "path", "/some/rm", r"config.judge.path='/some/rm' is not read by the reward-model stage"),
    ("judge", "dtype", "bfloat16", "config.judge.dtype='bfloat16' is not read .* set it to 'float32'"),
    ("judge", "template", "{prompt} only", r"config.judge.template has no \{response\} slot"),
    ("label_judge", "path", "/judge", None),  # a pairwise label judge is accepted ...
    ("label_judge", "ensemble_paths", ("/j2",), r"config.label_judge.ensemble_paths=\('/j2',\): this program asks "
                                                 "one judge"),
    ("data", "path", "", "config.data.path is empty"),
    ("train", "batch_size", 12, "config.train.batch_size=12 cannot be split into optim.grad_accum=2 .* use a "
                                "multiple of 16"),  # 8 devices
    ("eval", "batch_size", 4, "config.eval.batch_size=4 .* use a multiple of 8"),
    ("eval", "every", -1, "config.eval.every=-1 must be >= 0"),
    ("optim", "schedule", "step", "config.optim.schedule='step'"),
])
def test_stage_validation_refuses(hf_folder, world, section, field, value, message):
    c = stage_config(hf_folder, world[0])
    c.unlock()
    c[section][field] = value
    if message is None:
        reward_model_stage.validate(c)
        c.label_judge.mode = "pointwise"  # ... a label judge of another mode is not
        message = "config.label_judge.mode='pointwise': pairs are labelled by a pairwise judge's P"
    with pytest.raises(errors.ConfigError, match=message):
        reward_model_stage.validate(c)


def test_stage_refuses_unlabelled_pairs_without_a_label_judge_in_one_line(hf_folder, world, tmp_path, capsys):
    root, files = world
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "p_a_better" or i % 2})
                                  + "\n" for i, r in enumerate(files["train"])))
    c = stage_config(hf_folder, root)
    c.unlock()
    c.data.path = str(unlabelled)
    with pytest.raises(SystemExit) as exit_info:
        reward_model_stage.launch(c, str(tmp_path / "run"))
    assert exit_info.value.code == errors.EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("FATAL data error: pairs without p_a_better (64 of 128 in config.data.path): set "
                          "config.label_judge.path") and err.count("\n") == 1
    c.data.path, c.data.normalize_to = f"{root}/train.jsonl", str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit):
        reward_model_stage.launch(c, str(tmp_path / "run2"))
    assert capsys.readouterr().err.startswith("FATAL data error: config.data.normalize_to=")
    assert not os.path.exists(tmp_path / "run2")  # refused before anything was written
