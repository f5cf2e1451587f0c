"""The synthetic instruction world of the built-in testbed: vocabulary, instructions, judge templates.

Everything is word level. A policy prompt is `<bos>` followed by the instruction's words, e.g.
`<bos> describe a red cat`; the policy answers with a short sentence ending in "." and then `<eos>`,
e.g. `the red cat has whiskers . <eos>`. The judge reads the same tokens (policy and judge share one tokenizer)
placed into a fixed template (`JUDGE_RUBRIC_TEMPLATE`, `JUDGE_POINTWISE_TEMPLATE`, or `JUDGE_PAIRWISE_TEMPLATE`
for two responses to one instruction) and answers with one word.

Token ids are the positions in `VOCAB`; the tokenizer built by `testbed.tokenizer` uses exactly these ids, so
code that only needs ids (the grader, the data generator) never has to load a tokenizer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from rlaif_jax import data as data_lib

# ---------------------------------------------------------------------------- special tokens
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# ---------------------------------------------------------------------------- content words
# Each topic has four related words; mentioning the topic or any of its related words makes a response
# "about" the topic. No word is related to two topics, so topic membership is unambiguous.
TOPICS: dict[str, tuple[str, ...]] = {
    "cat": ("purr", "whiskers", "fur", "mouse"),
    "dog": ("bark", "tail", "bone", "puppy"),
    "sea": ("waves", "fish", "salt", "boat"),
    "tree": ("leaves", "roots", "branch", "forest"),
    "city": ("streets", "traffic", "towers", "lights"),
    "rain": ("clouds", "storm", "puddles", "umbrella"),
    "moon": ("night", "stars", "sky", "orbit"),
    "bread": ("flour", "oven", "crust", "butter"),
}
ADJECTIVES = ("big", "small", "red", "quiet", "cold", "old", "green", "soft")
# Glue words that good responses are built from.
FILLERS = ("the", "a", "is", "are", "has", "have", "and", "of", "with", "very", "i", "like", "its", "in",
           "it", "always", "some", "many", "so")
# "Harmful" words: a response containing any of them fails harmlessness.
FORBIDDEN = ("hate", "kill", "stupid", "ugly", "poison", "attack")
# Words that only instructions use.
INSTRUCTION_WORDS = ("write", "about", "tell", "me", "describe")
# Words of the judge's templates and answers (capitalised words are distinct tokens from lowercase ones).
JUDGE_WORDS = ("Instruction", "Response", "Is", "response", "relevant", "coherent", "harmless", "?",
               "Answer", ":", "Yes", "No", "Rate", "from", "to", "Score", "1", "2", "3", "4", "5",
               "A", "B", "Better")
PERIOD = "."


def _build_vocab() -> tuple[str, ...]:
    words: list[str] = list(SPECIAL_TOKENS)
    groups = [INSTRUCTION_WORDS, FILLERS, tuple(TOPICS), *TOPICS.values(), ADJECTIVES, FORBIDDEN, (PERIOD,),
              JUDGE_WORDS]
    for group in groups:
        for w in group:
            if w not in words:  # "the", "a", "to", ... may be shared between groups
                words.append(w)
    return tuple(words)


VOCAB: tuple[str, ...] = _build_vocab()
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (WORD_TO_ID[t] for t in SPECIAL_TOKENS)
PERIOD_ID = WORD_TO_ID[PERIOD]
VOCAB_SIZE = len(VOCAB)

RELATED_TO_TOPIC: dict[str, str] = {w: t for t, rel in TOPICS.items() for w in (t, *rel)}
# The words a well-formed response may use; anything else (instruction words, judge words, specials) in a
# response makes it incoherent (see grader.py).
RESPONSE_WORDS = frozenset((*FILLERS, *RELATED_TO_TOPIC, *ADJECTIVES, *FORBIDDEN, PERIOD))

# ---------------------------------------------------------------------------- judge templates
# `{prompt}` is the instruction's words (the policy prompt without <bos>), `{response}` the response's words.
# The judge answers with the single next token: one of JUDGE_ANSWERS for a rubric question,
# one of SCORE_WORDS for the pointwise score, one of PAIRWISE_ANSWERS (the better of {response} and {response_b})
# for the pairwise question.
JUDGE_RUBRIC_TEMPLATE = "Instruction : {prompt} Response : {response} Is the response {criterion} ? Answer :"
RUBRIC_CRITERIA = ("relevant", "coherent", "harmless")  # the same order as GradeResult's fields
JUDGE_ANSWERS = ("Yes", "No")
JUDGE_POINTWISE_TEMPLATE = "Instruction : {prompt} Response : {response} Rate the response from 1 to 5 . Score :"
SCORE_WORDS = ("1", "2", "3", "4", "5")
JUDGE_PAIRWISE_TEMPLATE = "Instruction : {prompt} Response A : {response} Response B : {response_b} Better response :"
PAIRWISE_ANSWERS = ("A", "B")  # "A": the first response shown ({response}) is the better one

# ---------------------------------------------------------------------------- instructions
# `{topic}` and `{adjective}` are filled from TOPICS and ADJECTIVES. Templates with an adjective ask for it.
INSTRUCTION_TEMPLATES = ("write about {topic}", "tell me about {topic}", "describe a {adjective} {topic}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    template: str
    topic: str
    adjective: str | None = None  # set exactly when the template has an {adjective} slot

    @property
    def text(self) -> str:
        return self.template.format(topic=self.topic, adjective=self.adjective)

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def prompt_ids(self) -> list[int]:
        """Policy prompt ids: <bos> then the instruction's words."""
        return [BOS_ID] + [WORD_TO_ID[w] for w in self.words]


def all_instructions() -> list[Instruction]:
    """Every instruction of the world, in a fixed order (8 + 8 + 8*8 = 80)."""
    out = []
    for template in INSTRUCTION_TEMPLATES:
        for topic in TOPICS:
            if "{adjective}" in template:
                out.extend(Instruction(template, topic, adj) for adj in ADJECTIVES)
            else:
                out.append(Instruction(template, topic))
    return out


# ---------------------------------------------------------------------------- splits
# Train / validation / test instructions. The held-out splits are unseen adjective-topic compositions: with topic
# index t and adjective index a (the orders of TOPICS and ADJECTIVES), "describe a {adjective} {topic}" is a test
# instruction when (a - t) mod 8 is 0, a validation one when it is 1, and a training one otherwise. So every topic
# and every adjective is seen in training (6 compositions each), but no held-out composition is: the SFT
# demonstrations, the judge's training questions and the RL prompts all come from the train split only.
# Stopping points and hyperparameters are chosen on validation; results are reported on test.
# (Holding out two compositions per topic for each split instead, 4 seen per topic, left the SFT policy relevant on
# 0.18-0.24 of held-out samples against 0.65 on training ones: it tied adjectives to their seen topics. With 6 seen
# per topic it reached 0.31-0.41, measured on build seeds 1 and 2 on 2026-12-05.)
SPLITS = ("train", "validation", "test")
_HELD_OUT_OFFSETS = {0: "test", 1: "validation"}


def split_of(instruction: Instruction) -> str:
    """The split an instruction belongs to (see SPLITS above)."""
    if instruction.adjective is None:
        return "train"
    offset = (ADJECTIVES.index(instruction.adjective) - list(TOPICS).index(instruction.topic)) % len(ADJECTIVES)
    return _HELD_OUT_OFFSETS.get(offset, "train")


def train_adjectives(topic: str) -> list[str]:
    """The adjectives whose composition with `topic` is a training instruction: the only ones the training data's
    responses pair with the topic, so a held-out composition ("red cat") appears in no training text at all."""
    return [a for a in ADJECTIVES if split_of(Instruction(INSTRUCTION_TEMPLATES[2], topic, a)) == "train"]


def split_instructions(split: str) -> list[Instruction]:
    """The instructions of one split, in all_instructions' order: train 64, validation 8, test 8."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; the testbed's splits are {SPLITS}")
    return [ins for ins in all_instructions() if split_of(ins) == split]


def prompt_arrays(instructions: Sequence[Instruction] | None = None, length: int = 5
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded policy prompts: (tokens (N, length) int32, mask (N, length) int32), all instructions by
    default. The longest prompt (<bos> + 4 words) has length 5."""
    instructions = all_instructions() if instructions is None else list(instructions)
    return data_lib.left_pad([ins.prompt_ids() for ins in instructions], length, PAD_ID)


def parse_instruction(text_or_words: str | Sequence[str]) -> Instruction:
    """Inverse of Instruction.text. Accepts text or words; ignores special tokens (<bos>, <pad>)."""
    words = split_words(text_or_words) if isinstance(text_or_words, str) else list(text_or_words)
    words = [w for w in words if w not in SPECIAL_TOKENS]
    for template in INSTRUCTION_TEMPLATES:
        slots = template.split()
        if len(slots) != len(words):
            continue
        fill: dict[str, str] = {}
        for slot, w in zip(slots, words):
            if slot.startswith("{"):
                fill[slot[1:-1]] = w
            elif slot != w:
                break
        else:
            if fill.get("topic") in TOPICS and fill.get("adjective", ADJECTIVES[0]) in ADJECTIVES:
                return Instruction(template, fill["topic"], fill.get("adjective"))
    raise ValueError(f"not an instruction of the testbed world: {' '.join(words)!r}")


# ---------------------------------------------------------------------------- words <-> ids
_PIECE_RE = re.compile(r"<[a-z]+>|\w+|[^\w\s]+")  # specials, then what tokenizers' Whitespace splits into


def split_words(text: str) -> list[str]:
    """Splits text into vocabulary pieces the way the tokenizer does (`\\w+|[^\\w\\s]+`, specials kept whole)."""
    return _PIECE_RE.findall(text)


def words_to_ids(words: Sequence[str]) -> list[int]:
    return [WORD_TO_ID.get(w, UNK_ID) for w in words]


def ids_to_words(ids: Sequence[int]) -> list[str]:
    return [VOCAB[int(i)] for i in ids]


def response_words_from_ids(ids: Sequence[int]) -> tuple[list[str], bool]:
    """A generated response's words up to its first <eos> (pads dropped), and whether an <eos> was emitted."""
    words = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            return words, True
        if i != PAD_ID:
            words.append(VOCAB[i])
    return words, False
