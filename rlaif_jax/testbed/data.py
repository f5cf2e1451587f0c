"""Training data of the testbed: noisy SFT demonstrations and noisily labelled judge examples.

Responses are drawn from a mixture of *modes*:
  good        follows the instruction: on topic, has the asked adjective, well formed, harmless;
  off_topic   a good response about another topic, or (for "describe a <adj> <topic>") without the adjective;
  incoherent  a good response corrupted: a stuttered word, a missing or extra ".", a looping phrase, too short;
  harmful     a good response with a forbidden word in it;
  salad       (judge data only) random response words, with or without a final ".";
  runaway     (judge data only) a looping response cut at the length limit, never terminated.
The mode is only how a response was made; its labels always come from grader.grade, the ground truth.

The SFT policy imitates the noisy mixture (so it starts well below a perfect pass rate); the judge is trained
as a language model on the rubric questions, the pointwise score and the pairwise comparison of
world.JUDGE_*_TEMPLATE, with labels flipped at random (so it agrees with the ground truth imperfectly, as a real
LLM judge does).
All sampling uses a numpy Generator, so a seed fixes the data.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import ml_collections
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax.testbed import grader, world

MODES = ("good", "off_topic", "incoherent", "harmful", "salad", "runaway")

# Good-response templates. {T}: topic, {R1} {R2}: two distinct related words, {A}: adjective.
# Every filled template passes the grader (tested); templates with {A} serve "describe a <adj> <topic>".
GOOD_TEMPLATES_WITH_ADJECTIVE = (
    "the {T} is {A} .",
    "the {T} is very {A} .",
    "the {A} {T} has {R1} .",
    "a {A} {T} has {R1} and {R2} .",
    "i like the {A} {T} and its {R1} .",
    "the {T} has {A} {R1} .",
    "it is a {A} {T} with {R1} .",
    "{R1} and {R2} are always {A} .",
    "some {A} {R1} are in the {T} .",
)
GOOD_TEMPLATES_NO_ADJECTIVE = (
    "the {T} has {R1} and {R2} .",
    "i like {R1} .",
    "its {R1} is in the {T} .",
    "many {R1} have {R2} .",
)
# Harmful templates; {F} is a forbidden word. Otherwise they obey every rule (relevant, coherent).
HARMFUL_TEMPLATES = ("i {F} the {A} {T} .", "the {A} {T} is {F} .", "{F} the {A} {T} and its {R1} .")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # SFT demonstrations: mode -> probability (good, off_topic, incoherent, harmful). About a third good, so the
    # SFT policy's ground-truth pass rate (sampled at temperature 1) starts around 0.4 and RL has room to grow.
    c.sft_mode_probs = (0.35, 0.25, 0.2, 0.2)
    # Judge examples: mode -> probability over all MODES; broader than the SFT mixture so that the judge has
    # seen the kinds of mistakes an RL policy drifts into. Off-topic responses are frequent because telling
    # them apart (comparing the response's topic with the instruction's) is the hardest skill to learn.
    c.judge_mode_probs = (0.25, 0.35, 0.15, 0.1, 0.1, 0.05)
    # Judge questions: probability of each of JUDGE_QUESTIONS (relevant, coherent, harmless, score, pairwise);
    # the harmless question (spotting a forbidden word) is learnt from few examples, relevance needs many. The
    # pairwise question takes a quarter; the others keep their old proportions (0.4, 0.3, 0.1, 0.2) in the rest.
    c.judge_question_probs = (0.3, 0.225, 0.075, 0.15, 0.25)
    c.label_noise = 0.12  # probability that a judge training label is replaced by a wrong one
    # The judge's deliberate bias, like a real judge's taste for keywords: the noise on a "relevant" label is
    # label_noise * relevance_noise_decay ** (topic-word mentions - 1), so the judge grows surer that a response
    # is relevant the more topic words it stuffs in (even when it is incoherent). 1.0 = no bias.
    c.relevance_noise_decay = 0.5
    c.eos_in_judge_prob = 0.5  # terminated responses are shown to the judge with / without their <eos>
    # The judge is also trained to predict the response's tokens, with this weight per token (the answer
    # token has weight 1): modelling which words go with which instruction teaches it what "relevant" means.
    c.response_lm_weight = 0.1
    c.max_response_tokens = 16  # runaway responses are cut here (the grader's MAX_WORDS + "." fits)
    c.sft_max_len = 24  # <bos> + instruction (<= 4) + response (<= 16) + <eos>, left-padded
    # Judge template + instruction + response(s) + answer, left-padded: the longest is the pairwise question,
    # <bos> + 11 template words + 4 instruction words + 2 x (20 + <eos>) + answer = 59 (incoherent responses run
    # to 20 words, past max_response_tokens).
    c.judge_max_len = 60
    return c


class Sample(NamedTuple):
    """One (instruction, response) pair with its ground-truth grade."""
    instruction: world.Instruction
    words: list[str]  # response words, without <eos>
    terminated: bool  # whether the response ends with <eos>
    mode: str
    grade: grader.GradeResult


class LMBatch(NamedTuple):
    """A left-padded batch of sequences for next-token training; numpy arrays.

    tokens_bt int32 (B, T); mask_bt int32 (B, T), 1 = real token; loss_mask_bt float32 (B, T), 1 where the token
    is a training target (the model predicts tokens_bt[:, t] from positions < t).
    clean_targets_bt int32 (B, T): the noise-free target where loss_mask_bt is 1 (equal to tokens_bt for SFT),
    used to measure agreement with the ground truth.
    """
    tokens_bt: np.ndarray
    mask_bt: np.ndarray
    loss_mask_bt: np.ndarray
    clean_targets_bt: np.ndarray


# ---------------------------------------------------------------------------- responses
def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _fill(template: str, rng: np.random.Generator, topic: str, adjective: str,
          forbidden: str | None = None) -> list[str]:
    r1, r2 = rng.choice(world.TOPICS[topic], size=2, replace=False)
    return template.format(T=topic, A=adjective, R1=r1, R2=r2, F=forbidden).split()


def good_response(rng: np.random.Generator, instruction: world.Instruction) -> list[str]:
    """A response that passes the grader for this instruction."""
    if instruction.adjective is not None:
        template = _choice(rng, GOOD_TEMPLATES_WITH_ADJECTIVE)
        adjective = instruction.adjective
    else:
        template = _choice(rng, GOOD_TEMPLATES_WITH_ADJECTIVE + GOOD_TEMPLATES_NO_ADJECTIVE)
        adjective = _choice(rng, world.train_adjectives(instruction.topic))
    return _fill(template, rng, instruction.topic, adjective)


def off_topic_response(rng: np.random.Generator, instruction: world.Instruction) -> list[str]:
    """A well-formed response about another topic, one that mixes in another topic's words, or (when an
    adjective is asked for) one with another adjective or none at all."""
    if rng.random() < 0.3:  # mixed topics: each topic word swapped for another topic's with probability 1/2
        words = good_response(rng, instruction)
        other = world.TOPICS[_choice(rng, [t for t in world.TOPICS if t != instruction.topic])]
        related = [i for i, w in enumerate(words) if w in world.RELATED_TO_TOPIC]
        swap = [i for i in related if rng.random() < 0.5] or [related[int(rng.integers(len(related)))]]
        for i in swap:  # a word not in the response yet, so no word repeats (coherence stays intact)
            words[i] = _choice(rng, [w for w in other if w not in words])
        return words
    if instruction.adjective is not None and rng.random() < 0.6:
        if rng.random() < 0.5:
            return _fill(_choice(rng, GOOD_TEMPLATES_NO_ADJECTIVE), rng, instruction.topic, "")
        other_adjective = _choice(rng, [a for a in world.train_adjectives(instruction.topic)
                                        if a != instruction.adjective])
        return _fill(_choice(rng, GOOD_TEMPLATES_WITH_ADJECTIVE), rng, instruction.topic, other_adjective)
    # Another topic, with the asked adjective only where that composition is a training one (world.train_adjectives).
    other_topic = _choice(rng, [t for t in world.TOPICS if t != instruction.topic and (
        instruction.adjective is None or instruction.adjective in world.train_adjectives(t))])
    return good_response(rng, world.Instruction(instruction.template, other_topic, instruction.adjective))


def incoherent_response(rng: np.random.Generator, instruction: world.Instruction) -> list[str]:
    """A good response broken in one of seven ways that the coherence rule rejects."""
    body = good_response(rng, instruction)[:-1]  # without the final "."
    kind = int(rng.integers(7))
    if kind == 5:  # the final "." repeated
        return body + [world.PERIOD] * int(rng.integers(2, 4))
    if kind == 6:  # several breakages at once: the shapes a policy drifting from the data produces
        words = body + [world.PERIOD]
        for _ in range(int(rng.integers(2, 4))):
            i = int(rng.integers(len(words) + 1))
            edit = int(rng.integers(3))
            if edit == 0:  # a cluster of "."
                words = words[:i] + [world.PERIOD] * int(rng.integers(1, 4)) + words[i:]
            elif edit == 1:  # a span said again
                j = int(rng.integers(len(words)))
                words = words[:i] + words[j:j + int(rng.integers(1, 4))] + words[i:]
            else:  # a word dropped
                words = words[:i] + words[i + 1:] if i < len(words) else words[:-1]
        if coherence_ok(words):  # rare: the edits cancelled out; break it surely
            words = words + [world.PERIOD]
        return words[:20]
    if kind == 0:  # stutter: one word immediately repeated
        i = int(rng.integers(len(body)))
        return body[:i + 1] + body[i:] + [world.PERIOD]
    if kind == 1:  # no final "."
        return body
    if kind == 2:  # a "." in the middle as well as at the end
        i = int(rng.integers(1, len(body)))
        return body[:i] + [world.PERIOD] + body[i:] + [world.PERIOD]
    if kind == 3:  # looping phrase: a two-word phrase said three times
        i = int(rng.integers(len(body) - 1))
        return body[i:i + 2] * 3 + [world.PERIOD]
    return [body[-1], world.PERIOD]  # too short: one word


def coherence_ok(words: Sequence[str]) -> bool:
    return grader.coherence(words, True) == 1.0


def harmful_response(rng: np.random.Generator, instruction: world.Instruction) -> list[str]:
    """A relevant, well-formed response containing a forbidden word."""
    forbidden = _choice(rng, world.FORBIDDEN)
    adjective = instruction.adjective or _choice(rng, world.train_adjectives(instruction.topic))
    if rng.random() < 0.5:
        return _fill(_choice(rng, HARMFUL_TEMPLATES), rng, instruction.topic, adjective, forbidden)
    body = good_response(rng, instruction)[:-1]
    i = int(rng.integers(len(body) + 1))
    return body[:i] + [forbidden] + body[i:] + [world.PERIOD]


_SALAD_WORDS = sorted(world.RESPONSE_WORDS - {world.PERIOD})


def salad_response(rng: np.random.Generator, instruction: world.Instruction) -> list[str]:
    """Random response words (the instruction is ignored), usually ending with "."."""
    n = int(rng.integers(1, 12))
    words = [str(w) for w in rng.choice(_SALAD_WORDS, size=n)]
    return words + [world.PERIOD] if rng.random() < 0.7 else words


def runaway_response(rng: np.random.Generator, instruction: world.Instruction, max_tokens: int) -> list[str]:
    """A looping phrase that never stops: max_tokens words and no <eos>."""
    body = good_response(rng, instruction)[:-1]
    i = int(rng.integers(len(body) - 1))
    phrase = body[i:i + 2 + int(rng.integers(2))]
    return (phrase * max_tokens)[:max_tokens]


def sample_response(rng: np.random.Generator, instruction: world.Instruction, mode: str,
                    max_tokens: int = 16) -> tuple[list[str], bool]:
    """(response words, terminated) for one mode."""
    if mode == "runaway":
        return runaway_response(rng, instruction, max_tokens), False
    makers = {"good": good_response, "off_topic": off_topic_response, "incoherent": incoherent_response,
              "harmful": harmful_response, "salad": salad_response}
    return makers[mode](rng, instruction), True


def sample_pairs(rng: np.random.Generator, n: int, mode_probs: Sequence[float], max_tokens: int = 16,
                 split: str = "train") -> list[Sample]:
    """n (instruction, response) pairs: instructions uniform over the split's (world.split_instructions; the
    training data of both models only ever draw from "train"), modes from mode_probs (over MODES[:len(mode_probs)]),
    each graded by the ground-truth grader."""
    instructions = world.split_instructions(split)
    probs = np.asarray(mode_probs, np.float64)
    modes = MODES[:len(probs)]
    out = []
    for _ in range(n):
        instruction = instructions[int(rng.integers(len(instructions)))]
        mode = modes[int(rng.choice(len(modes), p=probs / probs.sum()))]
        words, terminated = sample_response(rng, instruction, mode, max_tokens)
        out.append(Sample(instruction, words, terminated, mode, grader.grade(instruction, words, terminated)))
    return out


# ---------------------------------------------------------------------------- sequences and batches
def sft_sequence(sample: Sample) -> tuple[list[int], list[float]]:
    """Ids `<bos> instruction response [<eos>]` and the loss mask (1 on response tokens and <eos>)."""
    prompt = sample.instruction.prompt_ids()
    response = world.words_to_ids(sample.words) + ([world.EOS_ID] if sample.terminated else [])
    return prompt + response, [0.0] * len(prompt) + [1.0] * len(response)


def judge_prompt_words(instruction: world.Instruction, response_words: Sequence[str], question: str,
                       response_b_words: Sequence[str] | None = None) -> list[str]:
    """The judge's input words for one question: a criterion of world.RUBRIC_CRITERIA, "score", or "pairwise"
    (which compares response_words, shown first as "A", with response_b_words, shown second as "B")."""
    response = " ".join(response_words)
    if question == "pairwise":
        text = world.JUDGE_PAIRWISE_TEMPLATE.format(prompt=instruction.text, response=response,
                                                    response_b=" ".join(response_b_words))
    elif question == "score":
        text = world.JUDGE_POINTWISE_TEMPLATE.format(prompt=instruction.text, response=response)
    else:
        text = world.JUDGE_RUBRIC_TEMPLATE.format(prompt=instruction.text, response=response, criterion=question)
    return world.split_words(text)


def quality(grade: grader.GradeResult) -> int:
    """The ground truth's order of responses: the number of rules satisfied (relevance, coherence,
    harmlessness), plus 1 when all three hold (pass beats fail, then more rules satisfied beats fewer).
    0, 1, 2 or 4; the pointwise score is 1 + quality and the better of two responses has the higher quality."""
    return int(grade.relevance + grade.coherence + grade.harmlessness + grade.passed)


def true_answer(grade: grader.GradeResult, question: str, grade_b: grader.GradeResult | None = None) -> str:
    """The ground-truth answer word. Rubric: "Yes"/"No". Score: 1 + quality(grade), so "5" means "passes" and 4
    never occurs. Pairwise: "A" when the first response (grade) is better than the second (grade_b), "B" when
    it is worse; a tie has no answer (an error)."""
    if question == "pairwise":
        a, b = quality(grade), quality(grade_b)
        if a == b:
            raise ValueError(f"a pairwise question needs responses of different quality (both are {a})")
        return world.PAIRWISE_ANSWERS[0] if a > b else world.PAIRWISE_ANSWERS[1]
    if question == "score":
        return str(1 + quality(grade))
    value = grade[world.RUBRIC_CRITERIA.index(question)]
    return world.JUDGE_ANSWERS[0] if value else world.JUDGE_ANSWERS[1]


def noisy_answer(rng: np.random.Generator, answer: str, label_noise: float) -> str:
    """With probability label_noise, a wrong answer of the same kind (the other of Yes/No or A/B, another
    score)."""
    if rng.random() >= label_noise:
        return answer
    pool = next(p for p in (world.JUDGE_ANSWERS, world.PAIRWISE_ANSWERS, world.SCORE_WORDS) if answer in p)
    return _choice(rng, [a for a in pool if a != answer])


JUDGE_QUESTIONS = (*world.RUBRIC_CRITERIA, "score", "pairwise")


def topic_mentions(words: Sequence[str]) -> int:
    """How many words of the response are a topic or a topic's related word (repeats counted)."""
    return sum(w in world.RELATED_TO_TOPIC for w in words)


def label_noise_for(sample: Sample, question: str, label_noise: float, relevance_noise_decay: float) -> float:
    """The probability of a wrong label for this question (see default_config: relevance_noise_decay)."""
    if question != "relevant":
        return label_noise
    return label_noise * relevance_noise_decay ** max(topic_mentions(sample.words) - 1, 0)


def shown_words(sample: Sample, show_eos: bool) -> list[str]:
    """The response as the judge reads it: its words, then its <eos> when it has one and show_eos."""
    return list(sample.words) + ([world.EOS] if sample.terminated and show_eos else [])


def judge_sequence(rng: np.random.Generator, sample: Sample, question: str, label_noise: float,
                   eos_in_judge_prob: float, response_lm_weight: float = 0.0, sample_b: Sample | None = None
                   ) -> tuple[list[int], list[float], int]:
    """Ids `<bos> template(instruction, response[, response_b]) answer`, the loss mask (1 on the answer,
    response_lm_weight on the responses' tokens, 0 elsewhere) and the clean (noise-free) answer id. `label_noise`
    is this example's probability of a wrong answer; sample_b is the second response of a pairwise question.
    Both responses of a pair are shown with their <eos> or both without, as a judge configured either way reads
    them (a lone <eos> would tell a terminated response from a runaway one)."""
    show_eos = rng.random() < eos_in_judge_prob
    response = shown_words(sample, show_eos)
    response_b = shown_words(sample_b, show_eos) if sample_b is not None else None
    clean = true_answer(sample.grade, question, sample_b.grade if sample_b is not None else None)
    prompt_words = judge_prompt_words(sample.instruction, response, question, response_b)
    ids = [world.BOS_ID] + world.words_to_ids(prompt_words)
    ids.append(world.WORD_TO_ID[noisy_answer(rng, clean, label_noise)])
    loss_mask = [0.0] * (len(ids) - 1) + [1.0]
    # Each response follows the first ":" after its header ("Response :", "Response A :", "Response B :").
    header = 1 + len(world.split_words("Instruction :")) + len(sample.instruction.words)
    for words in (response, response_b):
        if words is None:
            continue
        start = header + prompt_words[header - 1:].index(":") + 1
        loss_mask[start:start + len(words)] = [response_lm_weight] * len(words)
        header = start + len(words)
    return ids, loss_mask, world.WORD_TO_ID[clean]


def pairwise_partner(rng: np.random.Generator, sample: Sample, mode_probs: Sequence[float], max_tokens: int = 16,
                     max_tries: int = 100) -> Sample:
    """A second response to sample's instruction, from the same mode mixture, of a different quality: exact ties
    (same quality) are resampled, not shown, because the pairwise answer has no word for "equal" and a tie
    labelled at random would only teach noise. So the judge learns strict preferences; at judging time, its
    P(A better) on a tie is whatever its two readings give (about 1/2 when it reads them alike)."""
    probs = np.asarray(mode_probs, np.float64)
    modes = MODES[:len(probs)]
    for _ in range(max_tries):
        mode = modes[int(rng.choice(len(modes), p=probs / probs.sum()))]
        words, terminated = sample_response(rng, sample.instruction, mode, max_tokens)
        grade = grader.grade(sample.instruction, words, terminated)
        if quality(grade) != quality(sample.grade):
            return Sample(sample.instruction, words, terminated, mode, grade)
    raise RuntimeError(f"no response of another quality than {sample} in {max_tries} draws")  # needs a bad mixture


def collate(seqs: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[float]], length: int,
            clean_targets: Sequence[Sequence[int]] | None = None) -> LMBatch:
    """Sequences (each with its loss mask and, for judge data, its clean targets) left-padded to `length` (an
    error if one is longer)."""
    tokens_bt, mask_bt = data_lib.left_pad(seqs, length, world.PAD_ID)
    loss_mask_bt, _ = data_lib.left_pad(loss_masks, length, 0.0, np.float32)
    clean_bt = (tokens_bt.copy() if clean_targets is None
                else data_lib.left_pad(clean_targets, length, world.PAD_ID)[0])
    return LMBatch(tokens_bt, mask_bt, loss_mask_bt, clean_bt)


def sft_batch(rng: np.random.Generator, batch_size: int, cfg: ml_collections.ConfigDict) -> LMBatch:
    samples = sample_pairs(rng, batch_size, cfg.sft_mode_probs, cfg.max_response_tokens)
    seqs, masks = zip(*(sft_sequence(s) for s in samples))
    return collate(seqs, masks, cfg.sft_max_len)


class JudgeExample(NamedTuple):
    """One judge training / evaluation sequence."""
    ids: list[int]  # <bos> template(instruction, response[, response_b]) answer
    loss_mask: list[float]  # 1 on the answer, response_lm_weight on the responses
    clean_answer_id: int  # the noise-free answer
    question: str  # a criterion of world.RUBRIC_CRITERIA, "score" or "pairwise"
    sample: Sample  # the response (pairwise: the one shown first, as "A")
    sample_b: Sample | None = None  # pairwise: the response shown second, as "B"


def judge_examples(rng: np.random.Generator, n: int, cfg: ml_collections.ConfigDict,
                   label_noise: float | None = None, split: str = "train") -> list[JudgeExample]:
    """n judge examples, each with a question drawn from JUDGE_QUESTIONS with cfg.judge_question_probs.
    label_noise defaults to cfg.label_noise (pass 0 for clean evaluation labels); split names the instructions'
    split (world.SPLITS: training draws from "train", measurements from a held-out one). A pairwise question pairs the
    drawn response with a second one to the same instruction (pairwise_partner) and shows the two in random
    order, so the better one is "A" about half the time."""
    noise = cfg.label_noise if label_noise is None else label_noise
    q_probs = np.asarray(cfg.judge_question_probs, np.float64)
    if len(q_probs) != len(JUDGE_QUESTIONS):
        raise ValueError(f"judge_question_probs={tuple(q_probs)} needs one probability per question of "
                         f"{JUDGE_QUESTIONS}")
    out = []
    for s in sample_pairs(rng, n, cfg.judge_mode_probs, cfg.max_response_tokens, split):
        question = JUDGE_QUESTIONS[int(rng.choice(len(JUDGE_QUESTIONS), p=q_probs / q_probs.sum()))]
        s_b = None
        if question == "pairwise":
            s_b = pairwise_partner(rng, s, cfg.judge_mode_probs, cfg.max_response_tokens)
            if rng.random() < 0.5:
                s, s_b = s_b, s
        p_wrong = label_noise_for(s, question, noise, cfg.relevance_noise_decay)
        ids, m, clean_id = judge_sequence(rng, s, question, p_wrong, cfg.eos_in_judge_prob, cfg.response_lm_weight,
                                          s_b)
        out.append(JudgeExample(ids, m, clean_id, question, s, s_b))
    return out


def judge_batch(rng: np.random.Generator, batch_size: int, cfg: ml_collections.ConfigDict,
                label_noise: float | None = None) -> LMBatch:
    """A left-padded batch of judge_examples (clean_targets_bt holds the noise-free answers)."""
    examples = judge_examples(rng, batch_size, cfg, label_noise)
    return collate_judge(examples, cfg.judge_max_len)


def collate_judge(examples: Sequence[JudgeExample], length: int) -> LMBatch:
    return collate([e.ids for e in examples], [e.loss_mask for e in examples], length,
                   [e.ids[:-1] + [e.clean_answer_id] for e in examples])


def swap_pairwise(example: JudgeExample) -> JudgeExample:
    """A pairwise example with its two responses' places exchanged, with the clean answer (label noise off) and
    each response shown as in `example` (with its <eos> or without); for measuring both presentation orders."""
    show_eos = float(world.EOS_ID in example.ids)
    ids, mask, clean_id = judge_sequence(np.random.default_rng(0), example.sample_b, "pairwise", 0.0, show_eos,
                                         0.0, example.sample)
    return JudgeExample(ids, mask, clean_id, "pairwise", example.sample_b, example.sample)
