"""The preference labeller (rlaif_jax/labelling.py): per-order probabilities, soft labels and position consistency
against HF PyTorch's forward of the same judge on texts rendered here by hand (few-shot exemplars included); chain
of thought against HF's greedy generate and a forward after the generated rationale; a run interrupted mid-line
resumed to the uninterrupted run's file; validation refusals."""
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from rlaif_jax import errors, judging
from rlaif_jax import labelling as lab
from tests import tiny

TEMPLATE = "Q : {prompt} R : {response} R : {response_b} S :"
COT_TEMPLATE = "Q : {prompt} R : {response} R : {response_b} Q :"  # asks for the rationale
ANSWER_PROMPT = " S :"
EXEMPLARS = ({"prompt": "b c", "response_a": "a a", "response_b": "d", "better": "a"},
             {"prompt": "e", "response_a": "f g", "response_b": "a h", "better": "b"})
# The few-shot block as the judge must see it: each exemplar's filled question and its better option.
FEW_SHOT_TEXT = "Q : b c R : a a R : d S : 1\n\nQ : e R : f g R : a h S : 2\n\n"
COT_EXEMPLAR = {"prompt": "b", "response_a": "c", "response_b": "d", "better": "b", "rationale": "d e"}
COT_FEW_SHOT_TEXT = "Q : b R : c R : d Q : d e S : 2\n\n"
NO_COT = dict(judging.reasoning.default_config())
COT = dict(NO_COT, enabled=True)  # the judge's chain of thought (config.judge.cot)
NUM_PAIRS, BATCH = 11, 8  # two batches on the 8 fake devices, the second padded


def judge_cfg(folder: str, **kw) -> ml_collections.ConfigDict:
    j = judging.default_config("pairwise")
    j.update({**dict(path=folder, template=TEMPLATE, option_tokens=("1", "2"), max_len=64), **kw})
    return j


def settings(**kw) -> ml_collections.ConfigDict:
    c = lab.default_config()
    c.update({**dict(batch_size=BATCH, progress_bar=False, few_shot=EXEMPLARS), **kw})
    return c


def write_pairs(path: str) -> str:
    rng = np.random.default_rng(4)
    words = lambda: " ".join(rng.choice(tiny.CONTENT, size=rng.integers(1, 5)))  # noqa: E731
    with open(path, "w") as f:
        for i in range(NUM_PAIRS):
            f.write(json.dumps({"prompt": words(), "response_a": words(), "response_b": words(), "id": f"p{i}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch
    import transformers
    root = str(tmp_path_factory.mktemp("labelling"))
    # Random judges are strongly position-biased; this one prefers the same response in both orders for some pairs.
    judge = tiny.write_opinionated_judge(os.path.join(root, "judge"), seed=2, head_scale=5.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(judge, dtype=torch.float64).eval()
    pairs = write_pairs(os.path.join(root, "pairs.jsonl"))
    out = os.path.join(root, "labels.jsonl")
    summary = lab.run_cli(judge_cfg(judge), settings(), lab.mesh_config(), pairs, out)
    return dict(root=root, judge=judge, model=model, pairs=pairs, out=out, summary=summary)


def read_lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def torch_first_option(model, ids: list[int], threshold: float = 0.05) -> float:
    """p("1") / (p("1") + p("2")) after the token ids (HF PyTorch, float64, no padding); 1/2 below the neutral
    threshold (judging's rule)."""
    import torch
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1).numpy()
    one, two = p[tiny.WORDS.index("1")], p[tiny.WORDS.index("2")]
    return one / (one + two) if one + two >= threshold else 0.5


def expected_labels(p_ab_first: float, p_ba_first: float) -> dict:
    """The record's label fields from the two orders' P(first option), computed by hand."""
    p_ab, p_ba = p_ab_first, 1.0 - p_ba_first  # P(A better) in each order
    decided = p_ab_first != 0.5 and p_ba_first != 0.5
    return {"p_a_better_ab": p_ab, "p_a_better_ba": p_ba, "p_a_better": (p_ab + p_ba) / 2,
            "position_consistent": decided and (p_ab - 0.5) * (p_ba - 0.5) > 0}


def check_labels(record: dict, want: dict) -> None:
    for key in ("p_a_better_ab", "p_a_better_ba", "p_a_better"):
        assert record[key] == pytest.approx(want[key], abs=2e-5), key
    assert record["position_consistent"] == want["position_consistent"]


# ------------------------------------------------------------------------------------------------ labels
def test_soft_labels_match_torch_in_both_orders(world):
    tok = tiny.make_tokenizer()
    records = [json.loads(line) for line in read_lines(world["out"])]
    pairs = [json.loads(line) for line in read_lines(world["pairs"])]
    assert [r["pair_index"] for r in records] == list(range(NUM_PAIRS))
    consistent = []
    for r, pair in zip(records, pairs):
        assert {k: r[k] for k in pair} == pair  # the input's fields are carried over
        p, a, b = pair["prompt"], pair["response_a"], pair["response_b"]
        first = [torch_first_option(world["model"], tok(FEW_SHOT_TEXT + f"Q : {p} R : {x} R : {y} S :")["input_ids"])
                 for x, y in ((a, b), (b, a))]
        want = expected_labels(*first)
        check_labels(r, want)
        assert r["neutral_orders"] == sum(x == 0.5 for x in first) and r["truncated"] is False
        assert "rationale_ab" not in r
        consistent.append(want["position_consistent"])
    # Both kinds of pair occur, so the consistency check above could fail either way.
    assert 0 < sum(consistent) < NUM_PAIRS
    assert world["summary"]["position_consistency"] == pytest.approx(np.mean(consistent))
    assert world["summary"]["labelled"] == NUM_PAIRS


def test_label_preferences_fills_only_missing_labels_unsharded(world):
    """The in-memory labeller of the reward-model stage (`labelling.label_preferences`), a judge loaded without
    a mesh: the pairs without p_a_better get the sharded file run's labels, the labelled ones are left alone."""
    judge = judging.load_judge(lab.judge_config(settings(), judge_cfg(world["judge"])))
    pairs = [json.loads(line) for line in read_lines(world["pairs"])]
    pairs[1]["p_a_better"] = 1.0
    labelled = lab.label_preferences([dict(p) for p in pairs], judge, BATCH, 0)
    assert labelled[1] == pairs[1]
    for i, want in enumerate(json.loads(line) for line in read_lines(world["out"])):
        if i != 1:
            r = labelled[i]
            for key in ("p_a_better", "p_a_better_ab", "p_a_better_ba"):
                assert r[key] == pytest.approx(want[key], abs=1e-6)
            assert r["position_consistent"] == want["position_consistent"]


def test_few_shot_exemplars_head_the_judge_template(world):
    c, j = settings(), judge_cfg(world["judge"])
    assert lab.render_exemplars(c, j) == FEW_SHOT_TEXT
    assert lab.judge_config(c, j).template == FEW_SHOT_TEXT + TEMPLATE
    cot = dict(COT, answer_prompt=ANSWER_PROMPT)
    assert lab.render_exemplars(settings(few_shot=(COT_EXEMPLAR,)),
                                judge_cfg(world["judge"], template=COT_TEMPLATE, cot=cot)) == COT_FEW_SHOT_TEXT


def test_chain_of_thought_rationale_is_the_greedy_generate_and_the_answer_follows_it(world):
    import torch
    tok = tiny.make_tokenizer()
    cot = dict(COT, answer_prompt=ANSWER_PROMPT, max_new_tokens=4)
    c = settings(few_shot=(COT_EXEMPLAR,))
    labeller = lab.load_labeller(c, judge_cfg(world["judge"], template=COT_TEMPLATE, cot=cot), *_mesh())
    pairs = [json.loads(line) for line in read_lines(world["pairs"])][:BATCH]
    records = lab.label_preferences([dict(p) for p in pairs], labeller, BATCH, 0)
    answer = tok(ANSWER_PROMPT, add_special_tokens=False)["input_ids"]
    lengths = []
    for r, pair in zip(records, pairs):
        p, a, b = pair["prompt"], pair["response_a"], pair["response_b"]
        first = []
        for (x, y), name in (((a, b), "rationale_ab"), ((b, a), "rationale_ba")):
            ids = tok(COT_FEW_SHOT_TEXT + f"Q : {p} R : {x} R : {y} Q :")["input_ids"]
            with torch.no_grad():
                out = world["model"].generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                              eos_token_id=tiny.EOS, pad_token_id=tiny.PAD)
            rationale = out[0, len(ids):].tolist()
            rationale = rationale[:rationale.index(tiny.EOS)] if tiny.EOS in rationale else rationale
            assert r[name] == tok.decode(rationale, skip_special_tokens=True), name
            lengths.append(len(rationale))
            first.append(torch_first_option(world["model"], ids + rationale + answer))
        check_labels(r, expected_labels(*first))
    assert max(lengths) == 4 and sum(lengths) > 0


def _mesh():
    return lab.shd.mesh_from_config(lab.mesh_config())


# ------------------------------------------------------------------------------------------------ resume
def test_a_run_killed_mid_line_resumes_to_the_uninterrupted_file(world):
    out = os.path.join(world["root"], "resumed.jsonl")
    with open(world["out"], "rb") as f:
        content = f.read()
    lines = content.split(b"\n")
    cut = sum(len(line) + 1 for line in lines[:5]) + len(lines[5]) // 2  # 5 whole lines, half of the 6th
    with open(out, "wb") as f:
        f.write(content[:cut])
    shutil.copy(world["out"] + lab.SETTINGS_SUFFIX, out + lab.SETTINGS_SUFFIX)
    summary = lab.run_cli(judge_cfg(world["judge"]), settings(), lab.mesh_config(), world["pairs"], out)
    assert summary["labelled"] == NUM_PAIRS - 5
    assert read_lines(out) == read_lines(world["out"])
    # Run again: nothing left to do, the file unchanged.
    assert lab.run_cli(judge_cfg(world["judge"]), settings(), lab.mesh_config(), world["pairs"], out)["labelled"] == 0
    assert read_lines(out) == read_lines(world["out"])
    # Other settings on the same file are refused, naming the difference.
    with pytest.raises(errors.ConfigError, match=r"labelling.seed: 0 there, 1 now"):
        lab.run_cli(judge_cfg(world["judge"]), settings(seed=1), lab.mesh_config(), world["pairs"], out)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("judge_kw, settings_kw, message", [
    (dict(mode="pointwise"), {}, "--judge.mode='pointwise': the labeller asks the pairwise question"),
    (dict(template="Q : {prompt} {reference} R : {response} R : {response_b} S :"), {},
     "a labelling template fills {prompt} {response} {response_b} only"),
    ({}, dict(batch_size=0), "--labelling.batch_size=0 must be an int >= 1"),
    (dict(cot=dict(NO_COT, max_new_tokens=8)), {},
     "--judge.cot.max_new_tokens is set but --judge.cot.enabled is False"),
    (dict(cot=dict(COT, greedy=False, temperature=0.0)), dict(few_shot=()),
     "--judge.cot.temperature=0.0 must be finite and > 0"),
    (dict(cot=dict(COT, top_p=0.9)), dict(few_shot=()),
     "--judge.cot.top_p is set but --judge.cot.greedy is True"),
    ({}, dict(few_shot=(dict(EXEMPLARS[0], better="c"),)), "--labelling.few_shot[0].better='c'; use 'a' or 'b'"),
    ({}, dict(few_shot=(COT_EXEMPLAR,)), "has a rationale but --judge.cot.enabled is False"),
    (dict(cot=COT), dict(few_shot=EXEMPLARS),
     "--labelling.few_shot[0] has keys ['better', 'prompt', 'response_a', 'response_b']; an exemplar has exactly"),
    ({}, dict(few_shot=(dict(EXEMPLARS[0], prompt="b {response} c"),)),
     "--labelling.few_shot[0].prompt contains {response}"),
])
def test_settings_are_refused_with_one_line(tmp_path, judge_kw, settings_kw, message):
    with pytest.raises(errors.ConfigError) as err:
        lab.run_cli(judge_cfg("/unused", **judge_kw), settings(**settings_kw), lab.mesh_config(), "/unused",
                    str(tmp_path / "out.jsonl"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batches_the_mesh_cannot_split_and_labelled_inputs_are_refused(world, tmp_path):
    with pytest.raises(errors.ConfigError, match="batch_size=4 is not divisible by the mesh's batch shards"):
        lab.run_cli(judge_cfg(world["judge"]), settings(batch_size=4), lab.mesh_config(), world["pairs"],
                    str(tmp_path / "out.jsonl"))
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"prompt": "a", "response_a": "b", "response_b": "c", "p_a_better": 1.0}) + "\n")
    with pytest.raises(errors.DataError, match=r"already has \['p_a_better'\], which the labeller writes"):
        lab.read_pairs(str(labelled))
