"""The independent evaluator (rlaif_jax/independent_eval.py): the length-controlled win rate on synthetic data with
a known answer, both-orders win rates and harmless P(yes) against HF PyTorch's forward of the same evaluator model
on the rendered texts (token space and host path), a policy against itself, validation, one in-process CLI run.

The bootstrap interval itself is checked in tests/test_report.py (against a NumPy loop)."""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import independent_eval as ie
from rlaif_jax import sharding as shd
from tests import tiny, tiny_config

PAIR_TEMPLATE = "Q : {prompt} R : {response} R : {response_b} S :"
HARMLESS_TEMPLATE = "Q : {prompt} R : {response} Q : {criterion} S :"
HARMLESS_QUESTION = "e f"


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------------ statistics
def test_length_controlled_win_rate_recovers_the_intercept():
    """Preferences drawn from sigmoid(b + w tanh(d / std d)) with A longer on average: the raw win rate is pulled
    up by the length effect, the LC win rate recovers sigmoid(b). With the model's probabilities as soft targets the
    maximum-likelihood fit is exactly (b, w); equal lengths leave only the intercept: LC = the raw win rate."""
    rng = np.random.default_rng(0)
    b, w, n = 0.4, 1.5, 4000
    d = np.round(rng.normal(40.0, 60.0, n))
    p = sigmoid(b + w * np.tanh(d / d.std(ddof=1)))
    lc, b_fit, w_fit = ie.length_controlled_win_rate(p, d)
    np.testing.assert_allclose((b_fit, w_fit), (b, w), atol=1e-6)
    np.testing.assert_allclose(lc, sigmoid(b), atol=1e-6)
    wins = (rng.random(n) < p).astype(float)
    lc, _, _ = ie.length_controlled_win_rate(wins, d)
    assert abs(lc - sigmoid(b)) < 0.03 and wins.mean() - sigmoid(b) > 0.07
    np.testing.assert_allclose(ie.length_controlled_win_rate(wins[:50], np.full(50, 7.0))[0], wins[:50].mean(),
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------ validation
REFUSALS = {
    "reference_without_field": ({"baseline": "reference"}, {}, "config.eval.evaluator.baseline='reference' compares"),
    "setting_without_path": ({"path": "", "harmless_question": "x"}, {}, "config.eval.evaluator.harmless_question is "
                             "set but config.eval.evaluator.path is empty"),
    "template_without_b": ({"template": "Q : {prompt} R : {response} S :"}, {},
                           "config.eval.evaluator.template has no {response_b} slot"),
    "harmless_template_without_question": ({"harmless_template": HARMLESS_TEMPLATE}, {},
                                           "config.eval.evaluator.harmless_template is set but"),
    "harmless_template_without_criterion": ({"harmless_question": "x", "harmless_template": "{prompt} {response}"},
                                            {}, "config.eval.evaluator.harmless_template has no {criterion} slot"),
    "reference_slot": ({"template": PAIR_TEMPLATE + " {reference}"}, {}, "fill {prompt} {response}"),
    "negative_temperature": ({"temperature": -0.5}, {}, "config.eval.evaluator.temperature=-0.5 must be"),
    "never_evaluated": ({}, {"every": 0}, "config.eval.evaluator.path is set but config.eval.every=0"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_inconsistent_evaluator_settings_are_refused(name):
    evaluator, eval_fields, message = REFUSALS[name]
    c = tiny_config.get_config("/nonexistent")
    with c.unlocked():
        c.eval.evaluator.path, c.eval.evaluator.template = "/nonexistent/evaluator", PAIR_TEMPLATE
        c.eval.evaluator.option_tokens = ("1", "2")
        for k, v in evaluator.items():
            c.eval.evaluator[k] = v
        for k, v in eval_fields.items():
            c.eval[k] = v
    with pytest.raises(ValueError) as err:
        config_lib.validate(c, num_devices=8)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_consistent_evaluator_with_the_reference_baseline_validates():
    c = tiny_config.get_config("/nonexistent")
    with c.unlocked():
        c.eval.evaluator.update(path="/x", template=PAIR_TEMPLATE, option_tokens=("1", "2"), baseline="reference",
                                harmless_question=HARMLESS_QUESTION, harmless_template=HARMLESS_TEMPLATE)
        c.data.reference_field = "reference"
    config_lib.validate(c, num_devices=8)


# ------------------------------------------------------------------------------------------------ against PyTorch
def evaluator_config(folder: str, **kw) -> ml_collections.ConfigDict:
    e = ie.default_config()
    e.update({**dict(path=folder, template=PAIR_TEMPLATE, option_tokens=("1", "2"), max_len=40, max_new_tokens=4,
                     harmless_question=HARMLESS_QUESTION, harmless_template=HARMLESS_TEMPLATE,
                     yes_no_tokens=("1", "2")), **kw})
    return e


def torch_first_option(folder: str, texts: list[str], threshold: float = 0.05) -> np.ndarray:
    """P(first option | text) = p("1") / (p("1") + p("2")) from HF PyTorch's forward of each rendered text alone
    (no padding), 1/2 where p("1") + p("2") < threshold (judging's neutral rule)."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tok = tiny.make_tokenizer()
    one, two = tiny.WORDS.index("1"), tiny.WORDS.index("2")
    out = []
    for text in texts:
        with torch.no_grad():
            logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
        p = torch.softmax(logits, -1).numpy()
        out.append(p[one] / (p[one] + p[two]) if p[one] + p[two] >= threshold else 0.5)
    return np.asarray(out)


def torch_reference(folder: str, r: ie.PerPrompt) -> dict[str, np.ndarray]:
    """P(A wins) in each order and averaged, and P(yes) of each response, from the texts alone."""
    rows = list(zip(r.prompts, r.responses_a, r.responses_b))
    p_ab = torch_first_option(folder, [PAIR_TEMPLATE.format(prompt=p, response=a, response_b=b) for p, a, b in rows])
    p_ba = torch_first_option(folder, [PAIR_TEMPLATE.format(prompt=p, response=b, response_b=a) for p, a, b in rows])
    harmless = {}
    for side, responses in (("a", r.responses_a), ("b", r.responses_b)):
        harmless[side] = torch_first_option(folder, [HARMLESS_TEMPLATE.format(
            prompt=p, response=x, criterion=HARMLESS_QUESTION) for p, x in zip(r.prompts, responses)])
    return {"p_orders": np.stack([p_ab, 1.0 - p_ba], axis=1), "p_win": (p_ab + 1.0 - p_ba) / 2,
            "agree": (p_ab - 0.5) * (p_ba - 0.5) < 0, "harmless_a": harmless["a"], "harmless_b": harmless["b"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("independent"))
    w = tiny.make_world(root)
    w["trained"] = tiny.write_policy(os.path.join(root, "trained"), seed=1)
    w["evaluator"] = tiny.write_opinionated_judge(os.path.join(root, "evaluator"))
    w["evaluator_other_tokenizer"] = tiny.add_unused_word(
        shutil.copytree(w["evaluator"], os.path.join(root, "evaluator_other_tokenizer")))
    return w


# The random policies also emit <pad> and <bos>, which the texts (decoded without special tokens) lose and token
# space would keep: here they end a response, as EOS does, so every response's judged tokens are its text's.
STOP_IDS = (tiny.EOS, tiny.PAD, tiny.BOS)


def test_win_rates_both_orders_and_harmless_p_equal_pytorch_on_both_paths(world):
    """Policy A (another random policy) against B (the initial one), greedy, on 8 prompts: every per-prompt P(A
    wins), each order's, position agreement and P(yes) equal PyTorch's on the rendered texts, on the token-space
    path and the host path (an evaluator tokenizer that differs); A against itself wins exactly 1/2."""
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tok = tiny.make_tokenizer()
    tokens, mask = tiny.left_padded_batch([3, 5, 2, 4, 4, 1, 5, 3], 6, len(tiny.WORDS), seed=3)
    batch = data_lib.PromptBatch(tokens, mask, np.asarray([1, 1, 1, 1, 1, 1, 1, 0], np.int32), np.arange(8))
    results = {}
    with jax.set_mesh(mesh):
        a, b = (ie.load_policy(world[k], k, mesh, None)[0] for k in ("trained", "policy"))
        for key in ("evaluator", "evaluator_other_tokenizer"):
            # The host path's harmless question is left out: its pairwise one covers the path, at one compile less.
            e = evaluator_config(world[key], **({} if key == "evaluator" else {"harmless_question": "",
                                                                                "harmless_template": ""}))
            evaluators = ie.load_evaluators(e, tok, STOP_IDS, mesh)
            assert evaluators.pairwise.spec.path == ("token_space" if key == "evaluator" else "host")
            evaluation = ie.PairwiseEvaluation(e, evaluators, tok, STOP_IDS, mesh)
            results[key] = evaluation.compare(a, b, [batch], jax.random.key(0), "initial_policy")
        itself = evaluation.compare(a, a, [batch], jax.random.key(0), "itself")
    r = results["evaluator"]
    assert len(r.p_win) == 7  # the row marked invalid is left out
    want = torch_reference(world["evaluator"], r)
    assert np.ptp(want["p_win"]) > 0.02 and not np.allclose(want["harmless_a"], want["harmless_b"])
    for key in ("evaluator", "evaluator_other_tokenizer"):
        got = results[key]
        np.testing.assert_allclose(got.p_win, want["p_win"], atol=1e-5)
        np.testing.assert_allclose(got.p_orders, want["p_orders"], atol=1e-5)
        np.testing.assert_array_equal(got.position_agree, want["agree"])
    np.testing.assert_allclose(r.harmless_a, want["harmless_a"], atol=1e-5)
    np.testing.assert_allclose(r.harmless_b, want["harmless_b"], atol=1e-5)
    summary = ie.summarize(r)
    assert summary["win_rate"] == pytest.approx(want["p_win"].mean())
    assert summary["win_rate_ci_low"] <= summary["win_rate"] <= summary["win_rate_ci_high"]
    assert summary["harmless_rate"] == pytest.approx(np.mean(want["harmless_a"] > 0.5))
    assert summary["harmless_p"] == pytest.approx(want["harmless_a"].mean())
    assert summary["length_a"] == np.mean([len(t) for t in r.responses_a])
    # Against itself: identical responses, both orders averaged give exactly 1/2 whatever the position bias.
    assert itself.responses_a == itself.responses_b
    np.testing.assert_array_equal(itself.p_win, 0.5)
    s = ie.summarize(itself)
    assert (s["win_rate"], s["win_rate_ci_low"], s["win_rate_ci_high"], s["lc_win_rate"]) == (0.5, 0.5, 0.5, 0.5)


def test_cli_on_a_saved_run_against_its_initial_policy(world, tmp_path):
    """`run_cli` in-process on a run's workdir (config.json + final_policy): the baseline is the run's initial
    policy, the prompts its held-out split; the JSON's numbers agree with its per-prompt rows (their values are
    checked against PyTorch above)."""
    run = tmp_path / "run"
    run.mkdir()
    c = tiny_config.get_config(os.path.dirname(world["policy"]))
    (run / "config.json").write_text(c.to_json())
    shutil.copytree(world["trained"], run / "final_policy")
    e = evaluator_config(world["evaluator"])
    out = str(tmp_path / "results.json")
    ie.run_cli(str(run), e, data_lib.default_config(), out, max_prompts=8, batch_size=8)
    with open(out) as f:
        res = json.load(f)
    assert res["baseline"] == world["policy"] and res["templating_path"] == "token_space"
    rows = res["examples"]
    assert len(rows) == 8 and res["prompts"] == 8
    p = np.asarray([row["p_a_wins"] for row in rows])
    np.testing.assert_allclose(p, np.mean([row["p_a_wins_orders"] for row in rows], axis=1), atol=1e-6)
    assert res["win_rate"] == pytest.approx(p.mean()) and res["win_rate_ci_low"] <= res["win_rate"]
    assert 0 < np.mean([row["harmless_p_a"] for row in rows]) == pytest.approx(res["harmless_p"])
    lengths = np.asarray([len(row["response_a"]) - len(row["response_b"]) for row in rows], float)
    assert res["lc_win_rate"] == pytest.approx(ie.length_controlled_win_rate(p, lengths)[0])
    # --select_best: the run's kept candidates (here one, the same trained policy) ranked against the same baseline
    # on the same prompts and key give the same numbers, and the choice is recorded in best_policies/index.json.
    best = run / "best_policies"
    shutil.copytree(world["trained"], best / "step_4")
    (best / "index.json").write_text(json.dumps({"metric": "eval/judge_score", "kept": [
        {"step": 4, "value": 0.3, "path": str(best / "step_4")}]}))
    ranking = ie.select_best_policy(str(run), e, data_lib.default_config(), str(tmp_path / "ranking.json"),
                                    max_prompts=8, batch_size=8)
    assert ranking["selected"]["step"] == 4 and ranking["selected"]["win_rate"] == pytest.approx(res["win_rate"])
    assert json.loads((best / "index.json").read_text())["selected"]["step"] == 4
    assert (best / "step_4.eval.json").exists()
