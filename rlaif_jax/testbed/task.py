"""The testbed as an RLAIF task: its prompt file and its ground truth, which the judge never sees.

`ground_truth` is the training program's `config.eval.ground_truth` hook: it grades decoded responses with the
programmatic grader (relevance, coherence, harmlessness; pass = all three) during evaluation only. Neither the
policy's reward nor the judge ever reads it.
"""
from __future__ import annotations

import json
from typing import Sequence

from rlaif_jax.testbed import grader, world


def ground_truth(prompt_texts: Sequence[str], response_texts: Sequence[str], stopped: Sequence[bool]
                 ) -> dict[str, list[float]]:
    """Per-example grades: pass_rate (1 if all three criteria hold), relevance, coherence, harmlessness, and
    score, the graded ground truth in [0, 1] (grader.graded_score, 1 exactly when the response passes).
    A response that never emitted <eos> is not terminated, hence incoherent."""
    rows = [(world.parse_instruction(p), world.split_words(r), bool(s))
            for p, r, s in zip(prompt_texts, response_texts, stopped)]
    grades = [grader.grade(*row) for row in rows]
    return {"pass_rate": [float(g.passed) for g in grades],
            "score": [grader.graded_score(*row) for row in rows],
            "relevance": [float(g.relevance) for g in grades],
            "coherence": [float(g.coherence) for g in grades],
            "harmlessness": [float(g.harmlessness) for g in grades]}


def format_rule(prompts: Sequence[str], completions: Sequence[str], stopped: Sequence[bool], **columns
                ) -> list[float]:
    """A rule reward as a Python function (`reward.functions`, TRL's signature; experiments/testbed.py rule=W):
    1 if the response ended with the stop token and repeats no word immediately ("the cat cat"), else 0. It targets
    the judge's known blind spot, the doubled word it calls coherent; it is not the ground truth (which also checks
    relevance, the "." and the length)."""
    out = []
    for text, s in zip(completions, stopped):
        words = world.split_words(text)
        out.append(float(bool(s) and all(a != b for a, b in zip(words, words[1:]))))
    return out


def write_prompts(path: str, split: str) -> str:
    """The instructions of one split (world.SPLITS) as JSONL {"prompt": text}: "train" is the RL prompts, the
    others are the held-out evaluation prompts (build.build writes all three into a build, whose folder only becomes
    visible once whole)."""
    with open(path, "w") as f:
        for instruction in world.split_instructions(split):
            f.write(json.dumps({"prompt": instruction.text}) + "\n")
    return path


def write_judge_eval_file(path: str, n: int = 512, seed: int = 1234, pairwise: bool = False, split: str = "test"
                          ) -> str:
    """Fresh (instruction, response) pairs drawn like the SFT data but for the instructions of `split` (the test
    split by default, which neither model trained on), labelled 1 / 0 by the ground truth's pass,
    in scripts/judge_eval.py's format: {"prompt", "response", "label"}. Unterminated responses are left out
    (their text cannot show the missing <eos>; training scores them with the missing-stop rule instead).
    pairwise: {"prompt", "response_a", "response_b", "label"}, each response paired with a second one to the same
    instruction of another ground-truth quality (`data.pairwise_partner`), label 1 when a is the better."""
    import numpy as np

    from rlaif_jax.testbed import data

    rng = np.random.default_rng(seed)
    probs = data.default_config().sft_mode_probs
    samples = [s for s in data.sample_pairs(rng, 2 * n, probs, split=split) if s.terminated][:n]
    with open(path, "w") as f:
        for s in samples:
            if not pairwise:
                record = {"prompt": s.instruction.text, "response": " ".join(s.words), "label": float(s.grade.passed)}
            else:
                b = data.pairwise_partner(rng, s, probs)
                while not b.terminated:
                    b = data.pairwise_partner(rng, s, probs)
                record = {"prompt": s.instruction.text, "response_a": " ".join(s.words),
                          "response_b": " ".join(b.words),
                          "label": float(data.quality(s.grade) > data.quality(b.grade))}
            f.write(json.dumps(record) + "\n")
    return path
