"""The built-in testbed: world, ground-truth grader, tokenizer, data generator, and a fast build of the SFT
policy and judge checked through transformers (PyTorch), an implementation independent of ours."""
import collections
import json
import os

import numpy as np
import pytest

from rlaif_jax.testbed import build, data, grader, tokenizer, world


# ---------------------------------------------------------------------------- world
def test_vocabulary_has_specials_first_and_judge_words():
    assert world.VOCAB[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert len(set(world.VOCAB)) == len(world.VOCAB)
    assert 60 <= world.VOCAB_SIZE <= 150
    for w in ("Instruction", "Response", "Is", "the", "response", "relevant", "coherent", "harmless", "?",
              "Answer", ":", "Yes", "No", "1", "5", ".", "A", "B", "Better"):
        assert w in world.WORD_TO_ID
    # No related word belongs to two topics.
    related = [w for rel in world.TOPICS.values() for w in rel]
    assert len(related) == len(set(related))


def test_instructions_round_trip_and_prompt_ids():
    instructions = world.all_instructions()
    assert len(instructions) == 8 + 8 + 8 * 8
    for ins in instructions:
        assert world.parse_instruction(ins.text) == ins
        assert world.parse_instruction(world.ids_to_words([world.PAD_ID] + ins.prompt_ids())) == ins
        assert ins.prompt_ids()[0] == world.BOS_ID and len(ins.prompt_ids()) <= 5
    tokens, mask = world.prompt_arrays(instructions[-2:])
    np.testing.assert_array_equal(tokens, [world.words_to_ids(["<bos>", "describe", "a", "green", "bread"]),
                                           world.words_to_ids(["<bos>", "describe", "a", "soft", "bread"])])
    tokens, mask = world.prompt_arrays(instructions[:1], length=6)
    np.testing.assert_array_equal(tokens, [[0, 0] + world.words_to_ids(["<bos>", "write", "about", "cat"])])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1, 1]])
    ins = world.parse_instruction("describe a red cat")
    assert (ins.topic, ins.adjective) == ("cat", "red")
    with pytest.raises(ValueError):
        world.parse_instruction("describe a cat")
    with pytest.raises(ValueError):
        world.parse_instruction("write about purr")  # a related word is not a topic


def test_splits_hold_out_unseen_compositions():
    splits = {s: world.split_instructions(s) for s in world.SPLITS}
    assert {s: len(v) for s, v in splits.items()} == {"train": 64, "validation": 8, "test": 8}
    assert sorted(map(str, sum(splits.values(), []))) == sorted(map(str, world.all_instructions()))
    held_out = {(i.adjective, i.topic) for s in ("validation", "test") for i in splits[s]}
    assert len(held_out) == 16 and all(a is not None for a, _ in held_out)
    # Every topic and every adjective is seen in training, in 6 compositions each; held-out ones never.
    train = [(i.adjective, i.topic) for i in splits["train"] if i.adjective]
    assert collections.Counter(t for _, t in train) == {t: 6 for t in world.TOPICS}
    assert collections.Counter(a for a, _ in train) == {a: 6 for a in world.ADJECTIVES}
    assert world.split_of(world.parse_instruction("describe a big cat")) == "test"  # (0 - 0) mod 8 = 0
    assert world.split_of(world.parse_instruction("describe a small cat")) == "validation"  # (1 - 0) mod 8 = 1
    assert world.split_of(world.parse_instruction("describe a red cat")) == "train"
    with pytest.raises(ValueError, match="splits"):
        world.split_instructions("dev")
    # The training data of both models: train instructions only, and the responses pair a topic with an adjective
    # only in training compositions (word salads, random words, aside).
    cfg = data.default_config()
    rng = np.random.default_rng(11)
    samples = data.sample_pairs(rng, 3000, cfg.sft_mode_probs) + [
        e.sample for e in data.judge_examples(rng, 3000, cfg)] + [
        e.sample_b for e in data.judge_examples(rng, 3000, cfg) if e.sample_b is not None]
    assert {world.split_of(s.instruction) for s in samples} == {"train"}
    assert not [s.words for s in samples if s.mode != "salad"
                and any((a, b) in held_out for a, b in zip(s.words, s.words[1:]))]
    assert {world.split_of(s.instruction) for s in data.sample_pairs(rng, 200, cfg.sft_mode_probs, split="test")
            } == {"test"}


# ---------------------------------------------------------------------------- grader, hand-checked
@pytest.mark.parametrize("instruction,response,expected", [
    # (relevance, coherence, harmlessness, passed)
    ("describe a red cat", "the red cat has whiskers .", (1, 1, 1, 1)),
    ("write about moon", "stars are very quiet .", (1, 1, 1, 1)),  # a related word is enough
    ("tell me about cat", "the cat purr .", (1, 1, 1, 1)),  # exactly MIN_WORDS words
    # relevance
    ("describe a red cat", "the cat has whiskers .", (0, 1, 1, 0)),  # the adjective is missing
    ("describe a red cat", "the big cat has whiskers .", (0, 1, 1, 0)),  # a different adjective
    ("write about cat", "the cat and the dog .", (0, 1, 1, 0)),  # another topic is mentioned too
    ("write about cat", "the dog has a bone .", (0, 1, 1, 0)),  # off topic
    ("write about cat", "it is very big .", (0, 1, 1, 0)),  # no topic at all
    ("write about cat", "the old fur is soft .", (1, 1, 1, 1)),  # a related word of the topic
    # coherence
    ("write about cat", "the cat cat is big .", (1, 0, 1, 0)),  # immediate repetition
    ("write about cat", "cat is big and cat is cat .", (1, 0, 1, 0)),  # a word three times
    ("write about cat", "the cat is the big cat .", (1, 1, 1, 1)),  # twice is allowed
    ("write about cat", "the cat is big", (1, 0, 1, 0)),  # no final "."
    ("write about cat", "the cat . is big .", (1, 0, 1, 0)),  # "." twice
    ("write about cat", "cat big .", (1, 0, 1, 0)),  # too short (2 words)
    ("write about cat", "the cat is Yes .", (1, 0, 1, 0)),  # a judge word
    ("write about cat", "describe the cat now .", (1, 0, 1, 0)),  # an instruction word and an unknown word
    ("write about cat", ".", (0, 0, 1, 0)),
    ("write about cat", "", (0, 0, 1, 0)),
    # harmlessness
    ("write about cat", "the cat is stupid .", (1, 1, 0, 0)),
    ("describe a red cat", "i hate the red cat .", (1, 1, 0, 0)),
])
def test_grade_hand_checked(instruction, response, expected):
    assert tuple(grader.grade(instruction, response)) == tuple(float(x) for x in expected)


@pytest.mark.parametrize("instruction,response,expected", [
    # (relevance, coherence, harmlessness) with partial credit; the score is their mean
    ("describe a red cat", "the red cat has whiskers .", (1, 1, 1)),
    ("describe a red cat", "the big cat has whiskers .", (1 / 2, 1, 1)),  # topic right, adjective missing
    ("describe a red cat", "the red cat and the dog .", (3 / 4, 1, 1)),  # another topic too: half the topic part
    ("write about cat", "the dog has a bone .", (0, 1, 1)),
    ("write about cat", "the cat cat is big .", (1, 5 / 6, 1)),  # one of the six coherence conditions fails
    ("write about cat", "the cat cat is the big cat", (1, 3 / 6, 1)),  # a repeat, a word thrice, no "."
    ("write about cat", "the cat is big", (1, 5 / 6, 1)),  # only the final "." is missing
    ("write about cat", "i hate the cat .", (1, 1, 1 / 2)),  # one forbidden word
    ("write about cat", "kill the cat and hate it .", (1, 1, 0)),  # two
])
def test_graded_score_hand_checked(instruction, response, expected):
    assert grader.graded_score(instruction, response) == pytest.approx(sum(expected) / 3)


def test_graded_score_is_one_exactly_when_passing():
    rng = np.random.default_rng(12)
    samples = data.sample_pairs(rng, 2000, data.default_config().judge_mode_probs)
    scores = np.asarray([grader.graded_score(s.instruction, s.words, s.terminated) for s in samples])
    passed = np.asarray([s.grade.passed for s in samples])
    np.testing.assert_array_equal(scores == 1.0, passed == 1.0)
    assert ((0 <= scores) & (scores <= 1)).all() and len(np.unique(scores)) > 5
    assert grader.graded_score("write about cat", "the cat is big .", terminated=False) == pytest.approx(
        (1 + 5 / 6 + 1) / 3)


def test_grade_length_limits_and_termination():
    body14 = "the cat is very big and its fur has some old soft purr whiskers".split()
    assert len(body14) == grader.MAX_WORDS
    assert grader.grade("write about cat", body14 + ["."]).coherence == 1.0
    assert grader.grade("write about cat", body14 + ["in", "."]).coherence == 0.0
    assert grader.grade("write about cat", "the cat is big .", terminated=False) == (1.0, 0.0, 1.0, 0.0)


def _row(words, length, left=False):
    ids = world.words_to_ids(words)
    pad = [world.PAD_ID] * (length - len(ids))
    return pad + ids if left else ids + pad


def test_grade_token_batch_and_rates():
    prompts = np.asarray([_row(["<bos>", "write", "about", "cat"], 5, left=True),
                          _row(["<bos>", "describe", "a", "red", "dog"], 5, left=True),
                          _row(["<bos>", "tell", "me", "about", "sea"], 5, left=True),
                          _row(["<bos>", "write", "about", "cat"], 5, left=True)])
    responses = np.asarray([
        _row(["the", "cat", "is", "big", ".", "<eos>", "kill", "."], 9),  # passes; what follows <eos> is ignored
        _row(["the", "red", "dog", "has", "a", "bone", ".", "<eos>"], 9),  # passes
        _row(["the", "sea", "has", "hate", ".", "<eos>"], 9),  # harmful
        _row(["the", "cat", "is", "big", ".", "the", "cat", "is", "big"], 9),  # never emits <eos>
    ])
    g = grader.grade_token_batch(prompts, responses)
    np.testing.assert_array_equal(g.passed, [1, 1, 0, 0])
    np.testing.assert_array_equal(g.relevance, [1, 1, 1, 1])
    np.testing.assert_array_equal(g.coherence, [1, 1, 1, 0])
    np.testing.assert_array_equal(g.harmlessness, [1, 1, 0, 1])
    r = grader.rates(g)
    assert r == grader.GradeRates(pass_rate=0.5, relevance=1.0, coherence=0.75, harmlessness=0.75)


# ---------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = tokenizer.save_tokenizer(str(tmp_path_factory.mktemp("tok")))
    assert os.path.exists(os.path.join(folder, "tokenizer.json"))
    assert os.path.exists(os.path.join(folder, "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(folder)


def test_tokenizer_loads_through_autotokenizer(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok) == world.VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (world.PAD_ID, world.BOS_ID, world.EOS_ID)
    assert tok.padding_side == "left"
    # Ids are positions in world.VOCAB, for every word.
    assert tok.convert_tokens_to_ids(list(world.VOCAB)) == list(range(world.VOCAB_SIZE))
    ids = tok("describe a red cat")["input_ids"]
    assert ids == world.Instruction("describe a {adjective} {topic}", "cat", "red").prompt_ids()
    text = "the red cat has whiskers."  # "." splits off at the word boundary
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == world.words_to_ids(["the", "red", "cat", "has", "whiskers", "."])
    assert tok.decode(ids) == "the red cat has whiskers ."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == "the red cat has whiskers ."
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [world.UNK_ID]
    batch = tok(["write about cat", "describe a red cat"], padding=True)
    assert batch["input_ids"][0] == [world.PAD_ID] + world.words_to_ids(["<bos>", "write", "about", "cat"])


def test_tokenizer_is_compositional_at_whitespace(hf_tokenizer):
    """tokens(A + " " + B) == tokens(A) + tokens(B): what token-space judge templating needs."""
    tok = hf_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    prefix, suffix = world.JUDGE_RUBRIC_TEMPLATE.split("{prompt}")[0], "Is the response relevant ? Answer :"
    rng = np.random.default_rng(0)
    for s in data.sample_pairs(rng, 50, data.default_config().judge_mode_probs):
        instruction, response = s.instruction.text, " ".join(s.words)
        whole = world.JUDGE_RUBRIC_TEMPLATE.format(prompt=instruction, response=response, criterion="relevant")
        parts = enc(prefix.strip()) + enc(instruction) + enc("Response :") + enc(response) + enc(suffix)
        assert enc(whole) == parts
        assert enc(whole) == world.words_to_ids(data.judge_prompt_words(s.instruction, s.words, "relevant"))
    # <eos> inside text is the special token.
    assert enc("the cat is big . <eos>")[-1] == world.EOS_ID


def test_pairwise_template_is_single_known_tokens(hf_tokenizer):
    """Every word of the pairwise template (and its answers) is one token of its own, none <unk>; "A" is not
    "a"; the judging module's check that the template tokenises piecewise passes without a warning."""
    import warnings

    import ml_collections

    from rlaif_jax import judging
    tok = hf_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    fixed = world.JUDGE_PAIRWISE_TEMPLATE.format(prompt="", response="", response_b="").split()
    assert fixed == ["Instruction", ":", "Response", "A", ":", "Response", "B", ":", "Better", "response", ":"]
    for w in fixed + list(world.PAIRWISE_ANSWERS):
        assert enc(w) == [world.WORD_TO_ID[w]] and world.WORD_TO_ID[w] != world.UNK_ID
    assert world.WORD_TO_ID["A"] != world.WORD_TO_ID["a"]
    assert not set(world.PAIRWISE_ANSWERS + ("Better",)) & world.RESPONSE_WORDS  # a response never holds them
    s = data.sample_pairs(np.random.default_rng(0), 2, data.default_config().judge_mode_probs)
    text = world.JUDGE_PAIRWISE_TEMPLATE.format(prompt=s[0].instruction.text, response=" ".join(s[0].words),
                                                response_b=" ".join(s[1].words))
    assert enc(text) == world.words_to_ids(data.judge_prompt_words(s[0].instruction, s[0].words, "pairwise",
                                                                   s[1].words))
    cfg = ml_collections.ConfigDict(judging.default_config("pairwise").to_dict())
    cfg.template, cfg.option_tokens, cfg.max_len = world.JUDGE_PAIRWISE_TEMPLATE, world.PAIRWISE_ANSWERS, 56
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = judging.make_spec(cfg, tok, tok)
    assert spec.score_ids == tuple(world.words_to_ids(world.PAIRWISE_ANSWERS))


# ---------------------------------------------------------------------------- data generation
def test_mode_proportions_and_their_grades():
    cfg = data.default_config()
    n = 6000
    samples = data.sample_pairs(np.random.default_rng(1), n, cfg.judge_mode_probs)
    counts = collections.Counter(s.mode for s in samples)
    for mode, p in zip(data.MODES, cfg.judge_mode_probs):
        assert abs(counts[mode] / n - p) < 4 * np.sqrt(p * (1 - p) / n), (mode, counts[mode] / n, p)
    by_mode = collections.defaultdict(list)
    for s in samples:
        by_mode[s.mode].append(s)
    # Each mode breaks exactly what it claims to break.
    assert all(s.grade.passed == 1 for s in by_mode["good"])
    assert all(s.grade.relevance == 0 and s.grade.coherence == 1 and s.grade.harmlessness == 1
               for s in by_mode["off_topic"])
    assert all(s.grade.coherence == 0 and s.grade.harmlessness == 1 for s in by_mode["incoherent"])
    assert all(s.grade.harmlessness == 0 and s.grade.relevance == 1 and s.grade.coherence == 1
               for s in by_mode["harmful"])
    assert all(not s.terminated and s.grade.coherence == 0 for s in by_mode["runaway"])
    assert all(len(s.words) <= cfg.max_response_tokens for s in samples)
    # The SFT mixture's pass rate is its "good" share.
    sft = data.sample_pairs(np.random.default_rng(2), 4000, cfg.sft_mode_probs)
    assert {s.mode for s in sft} == {"good", "off_topic", "incoherent", "harmful"}
    assert abs(np.mean([s.grade.passed for s in sft]) - cfg.sft_mode_probs[0]) < 0.035


def test_good_templates_pass_for_every_instruction():
    rng = np.random.default_rng(3)
    for ins in world.all_instructions():
        for _ in range(10):
            assert grader.grade(ins, data.good_response(rng, ins)).passed == 1.0


def test_sft_batch_left_padded_with_response_loss_mask():
    cfg = data.default_config()
    b = data.sft_batch(np.random.default_rng(4), 32, cfg)
    assert b.tokens_bt.shape == (32, cfg.sft_max_len) and b.tokens_bt.dtype == np.int32
    for tokens, mask, loss in zip(b.tokens_bt, b.mask_bt, b.loss_mask_bt):
        n = int(mask.sum())
        assert mask[-n:].all() and not mask[:-n].any()  # left padding
        assert (tokens[:-n] == world.PAD_ID).all() and tokens[-n] == world.BOS_ID and tokens[-1] == world.EOS_ID
        words = world.ids_to_words(tokens[-n:])
        try:
            ins = world.parse_instruction(words[:5])
        except ValueError:
            ins = world.parse_instruction(words[:4])
        n_prompt = len(ins.prompt_ids())
        # Loss on the response and its <eos>, not on the prompt or the padding.
        np.testing.assert_array_equal(loss, [0] * (len(tokens) - n + n_prompt) + [1] * (n - n_prompt))
    np.testing.assert_array_equal(b.clean_targets_bt, b.tokens_bt)


def test_judge_examples_format_and_label_noise():
    cfg = data.default_config()
    cfg.relevance_noise_decay = 1.0  # uniform noise, so every question's flip rate is label_noise
    examples = data.judge_examples(np.random.default_rng(5), 4000, cfg)
    flips = collections.defaultdict(list)
    for e in examples:
        words = world.ids_to_words(e.ids)
        assert words[:3] == ["<bos>", "Instruction", ":"]
        if e.question == "pairwise":  # its format: test_pairwise_examples_label_both_orders_by_the_grader
            flips[e.question].append(words[-1] != world.VOCAB[e.clean_answer_id])
            continue
        # Loss: 1 on the answer, response_lm_weight on the response (with its <eos> when shown), 0 elsewhere.
        start = words.index("Response") + 2
        end = len(words) - (11 if e.question == "score" else 8)
        assert words[end] in ("Is", "Rate") and words[start:end] in (e.sample.words, e.sample.words + ["<eos>"])
        expected = [0.0] * start + [cfg.response_lm_weight] * (end - start) + [0.0] * (len(words) - end - 1)
        assert e.loss_mask == expected + [1.0]
        truth = data.true_answer(e.sample.grade, e.question)
        assert world.VOCAB[e.clean_answer_id] == truth
        if e.question == "score":
            assert words[-3:-1] == ["Score", ":"] and words[-1] in world.SCORE_WORDS
        else:
            assert words[-5:-1] == [e.question, "?", "Answer", ":"]
            assert words[-1] in world.JUDGE_ANSWERS
        flips[e.question].append(words[-1] != truth)
    assert set(flips) == set(data.JUDGE_QUESTIONS)
    for q, f in flips.items():
        assert abs(np.mean(f) - cfg.label_noise) < 0.03, (q, np.mean(f))
    # Scores: 5 exactly when the response passes.
    g = grader.GradeResult(1.0, 1.0, 1.0, 1.0)
    assert data.true_answer(g, "score") == "5"
    assert data.true_answer(grader.GradeResult(1.0, 0.0, 1.0, 0.0), "score") == "3"
    assert data.true_answer(grader.GradeResult(0.0, 0.0, 0.0, 0.0), "score") == "1"
    assert data.true_answer(grader.GradeResult(1.0, 0.0, 1.0, 0.0), "coherent") == "No"


def test_pairwise_examples_label_both_orders_by_the_grader():
    """With label noise off, the answer of a pairwise question is the response that the grader ranks higher
    (pass beats fail, then more rules satisfied), in both presentation orders; ties are never shown."""
    cfg = data.default_config()
    cfg.judge_question_probs = (0.0, 0.0, 0.0, 0.0, 1.0)
    examples = data.judge_examples(np.random.default_rng(8), 600, cfg, label_noise=0.0)
    firsts = []
    for e in examples:
        assert e.question == "pairwise" and e.sample_b.instruction == e.sample.instruction
        rank_a, rank_b = (sum(g[:3]) + 10 * g.passed for g in (e.sample.grade, e.sample_b.grade))  # by hand
        assert rank_a != rank_b
        words = world.ids_to_words(e.ids)
        assert words[-1] == ("A" if rank_a > rank_b else "B") == world.VOCAB[e.clean_answer_id]
        a, b, end = words.index("A"), words.index("B"), words.index("Better")
        assert words[:a - 1] == ["<bos>", "Instruction", ":"] + e.sample.instruction.words
        assert words[a - 1:a + 2] == ["Response", "A", ":"] and words[b - 1:b + 2] == ["Response", "B", ":"]
        shown_a, shown_b = words[a + 2:b - 1], words[b + 2:end]
        assert shown_a in (e.sample.words, e.sample.words + ["<eos>"])
        assert shown_b in (e.sample_b.words, e.sample_b.words + ["<eos>"])
        assert ("<eos>" in shown_a) == ("<eos>" in shown_b) or not (e.sample.terminated and e.sample_b.terminated)
        assert words[end:] == ["Better", "response", ":", words[-1]]
        # Loss: the answer, and response_lm_weight on both responses.
        expected = ([0.0] * (a + 2) + [cfg.response_lm_weight] * len(shown_a) + [0.0] * 3
                    + [cfg.response_lm_weight] * len(shown_b) + [0.0] * 3 + [1.0])
        assert e.loss_mask == expected
        swapped = data.swap_pairwise(e)
        assert world.ids_to_words(swapped.ids[:-1]) == (words[:a + 2] + shown_b + ["Response", "B", ":"] + shown_a
                                                        + ["Better", "response", ":"])
        assert world.VOCAB[swapped.clean_answer_id] == ("B" if rank_a > rank_b else "A")
        firsts.append(rank_a > rank_b)
    assert 0.4 < np.mean(firsts) < 0.6  # the better response is shown first about half the time
    assert max(len(e.ids) for e in examples) <= cfg.judge_max_len
    with pytest.raises(ValueError):
        data.true_answer(grader.GradeResult(1.0, 0.0, 1.0, 0.0), "pairwise", grader.GradeResult(0.0, 1.0, 1.0, 0.0))


def test_relevance_noise_decays_with_topic_mentions():
    s = data.sample_pairs(np.random.default_rng(6), 1, (1.0,))[0]
    stuffed = s._replace(words="cat purr fur mouse .".split())
    assert data.topic_mentions(stuffed.words) == 4
    assert data.label_noise_for(stuffed, "relevant", 0.12, 0.5) == pytest.approx(0.12 * 0.5 ** 3)
    assert data.label_noise_for(stuffed, "coherent", 0.12, 0.5) == 0.12


# ---------------------------------------------------------------------------- build
def test_training_is_deterministic_and_learns():
    """Two runs from one seed give identical losses; the loss falls. (The fast build's SFT settings, so the
    compiled step is shared with the build below.)"""
    cfg = build.fast_config()
    model_cfg = build.model_config(cfg.policy)

    def run():
        rng = np.random.default_rng(0)
        _, losses = build.train_lm(model_cfg, cfg.sft, lambda step: data.sft_batch(rng, cfg.sft.batch_size, cfg.data),
                                   build.jax.random.PRNGKey(0), "t", show_progress=False, stop_after=30)
        return losses

    a, b = run(), run()
    assert len(a) == 30 and a == b
    assert np.mean(a[-5:]) < 0.75 * a[0]


def test_masked_next_token_loss_matches_numpy():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    tokens = rng.integers(0, 5, size=(2, 4)).astype(np.int32)
    loss_mask = np.asarray([[0, 0, 1, 1], [0, 1, 0, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [-logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 4) if loss_mask[b, t]]
    got = float(build.masked_next_token_loss(logits, tokens, loss_mask))
    assert got == pytest.approx(np.mean(terms), rel=1e-5)


def mechanics_config():
    """The fast build cut to a few steps: what a build writes and how the cache is reused, not what it learns."""
    c = build.fast_config()
    c.sft.steps = c.judge_train.steps = 8
    c.sft.warmup_steps = c.judge_train.warmup_steps = 2
    c.eval_examples = 64
    return c


@pytest.fixture(scope="module")
def mechanics_build(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("testbed") / "build")
    messages = []
    art = build.build(mechanics_config(), out_dir=root, show_progress=False, log=messages.append)
    return art, messages


@pytest.fixture(scope="module")
def default_build():
    """The demo's build, from the cache (built here on a machine that has none yet; the demo test shares it):
    what the tests of a build's quality measure, so they check the models the demo and the README use."""
    return build.build(build.default_config(), show_progress=False, log=lambda m: None)


def test_build_writes_hf_folders_and_reuses_cache(mechanics_build):
    art, messages = mechanics_build
    assert build.is_complete(art.root)
    assert any("step" in m and "loss" in m for m in messages)  # progress lines
    for folder in (art.policy_dir, art.judge_dir):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert os.path.exists(os.path.join(folder, name)), (folder, name)
    with open(os.path.join(art.root, build.BUILD_INFO)) as f:
        info = json.load(f)
    assert info["cache_key"] == build.cache_key(mechanics_config())
    # The judge's held-out agreement covers every question, the pairwise one in both orders.
    agreement = info["judge"]["agreement"]
    for name in (*data.JUDGE_QUESTIONS, "rubric", "chance", "pairwise_both_orders", "pairwise_consistency"):
        assert 0.0 <= agreement[name] <= 1.0, name
    assert any("pairwise" in m for m in messages)
    for split, path in (("train", art.prompts_file), ("validation", art.validation_prompts_file),
                        ("test", art.test_prompts_file)):
        with open(path) as f:
            assert [json.loads(line)["prompt"] for line in f] == [i.text for i in world.split_instructions(split)]
    again = []
    art2 = build.build(mechanics_config(), out_dir=art.root, log=again.append)
    assert art2 == art and again == [f"reusing the testbed built in {art.root}"]
    # A folder without the COMPLETE marker is not a finished build.
    assert not build.is_complete(os.path.dirname(art.root))


def test_cache_key_depends_on_settings():
    a, b = build.fast_config(), build.fast_config()
    b.cache_dir = "/elsewhere"
    assert build.cache_key(a) == build.cache_key(b)
    b.seed = a.seed + 1
    assert build.cache_key(a) != build.cache_key(b)


def test_sft_policy_loads_in_transformers_and_is_mostly_well_formed(default_build):
    import torch
    from transformers import AutoModelForCausalLM
    art = default_build
    model = AutoModelForCausalLM.from_pretrained(art.policy_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    prompts, mask = world.prompt_arrays()
    prompts, mask = np.concatenate([prompts] * 2).astype(np.int64), np.concatenate([mask] * 2)
    torch.manual_seed(0)
    kw = dict(attention_mask=torch.tensor(mask), max_new_tokens=16,
              pad_token_id=world.PAD_ID, eos_token_id=world.EOS_ID)
    with torch.no_grad():
        sampled = model.generate(torch.tensor(prompts), do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **kw)
        greedy = model.generate(torch.tensor(prompts), do_sample=False, **kw)
    s = grader.rates(grader.grade_token_batch(prompts, sampled[:, prompts.shape[1]:].numpy()))
    g = grader.rates(grader.grade_token_batch(prompts, greedy[:, prompts.shape[1]:].numpy()))
    # Sampling imitates the noisy mixture: mostly well formed, well below perfect on the ground truth.
    assert s.coherence > 0.6, s
    assert 0.15 < s.pass_rate < 0.7, s
    assert g.coherence > 0.9, g


def test_judge_agrees_with_grader_above_chance(default_build):
    """P(Yes) from the judge, run in PyTorch on fresh examples, against the ground truth."""
    import torch
    from transformers import AutoModelForCausalLM
    art = default_build
    judge = AutoModelForCausalLM.from_pretrained(art.judge_dir).eval()
    cfg = data.default_config()
    samples = data.sample_pairs(np.random.default_rng(123), 300, cfg.judge_mode_probs, split="test")  # unseen
    yes, no = world.WORD_TO_ID["Yes"], world.WORD_TO_ID["No"]
    hits, majority = [], []
    for criterion in world.RUBRIC_CRITERIA:
        seqs = [[world.BOS_ID] + world.words_to_ids(data.judge_prompt_words(s.instruction, s.words, criterion))
                for s in samples]
        b = data.collate(seqs, [[0.0] * len(x) for x in seqs], cfg.judge_max_len)
        with torch.no_grad():
            logits = judge(input_ids=torch.tensor(b.tokens_bt, dtype=torch.long),
                           attention_mask=torch.tensor(b.mask_bt)).logits[:, -1].numpy()
        p_yes = 1 / (1 + np.exp(logits[:, no] - logits[:, yes]))
        truth = np.asarray([s.grade[world.RUBRIC_CRITERIA.index(criterion)] for s in samples])
        correct = (p_yes > 0.5) == (truth == 1)
        chance = max(truth.mean(), 1 - truth.mean())
        hits.append(correct.mean())
        majority.append(chance)
        assert correct.mean() > chance + 0.05 or correct.mean() > 0.95, (criterion, correct.mean(), chance)
        # The Yes/No answers carry most of the next-token probability mass.
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        assert (probs[:, yes] + probs[:, no]).mean() > 0.9
    assert np.mean(hits) > np.mean(majority) + 0.05, (hits, majority)
