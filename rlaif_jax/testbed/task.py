"""The testbed as an RLAIF task: its prompt file and its ground truth, which the judge never sees.

`ground_truth` is the training program's `config.eval.ground_truth` hook: it grades decoded responses with the
programmatic grader (relevance, coherence, harmlessness; pass = all three) during evaluation only. Neither the
policy's reward nor the judge ever reads it.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from rlaif_jax.testbed import grader, world


def ground_truth(prompt_texts: Sequence[str], response_texts: Sequence[str], stopped: Sequence[bool]
                 ) -> dict[str, list[float]]:
    """Per-example grades: pass_rate (1 if all three criteria hold), relevance, coherence, harmlessness.
    A response that never emitted <eos> is not terminated, hence incoherent."""
    grades = [grader.grade(world.parse_instruction(p), world.split_words(r), bool(s))
              for p, r, s in zip(prompt_texts, response_texts, stopped)]
    return {"pass_rate": [float(g.passed) for g in grades],
            "relevance": [float(g.relevance) for g in grades],
            "coherence": [float(g.coherence) for g in grades],
            "harmlessness": [float(g.harmlessness) for g in grades]}


def write_prompts(path: str) -> str:
    """Every instruction of the world as JSONL {"prompt": text} (written once, atomically)."""
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            for instruction in world.all_instructions():
                f.write(json.dumps({"prompt": instruction.text}) + "\n")
        os.replace(tmp, path)
    return path
