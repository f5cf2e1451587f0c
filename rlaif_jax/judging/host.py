"""The host path: judging from text, for a judge whose tokenizer differs from the policy's.

The rollout's tokens are decoded with the policy tokenizer (`decode_spans`), the template is rendered as text
and tokenised with the judge's (`encode_texts`, which cuts too-long rows by the same `kept_lengths` rule as token
space, counted in judge tokens), then the same jitted judge forward and scoring run (`score_queries`). With the
same tokenizer and whitespace slot boundaries both paths give the same rows (tested).

Text in, scores out, is also what `scripts/judge_eval.py`, the preference labelling (`rlaif_jax.labelling`, through
`encode_queries`) and the reward model's training data (`encode_pairs`) use. Rows are query-major as in token space.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax import reward_model
from rlaif_jax.judging.assembly import (SlotSource, ended_with_stop, kept_lengths, mask_span, prompt_source,
                                        rationale_key, response_source, sample_principles, score_jit)
from rlaif_jax.judging.scoring import JudgeMetrics, score_queries_jit
from rlaif_jax.judging.spec import JudgeSpec, render, text_ids
from rlaif_jax.models.config import ModelConfig

_sample_principles_jit = jax.jit(sample_principles, static_argnums=(0, 2, 3))


def encode_texts(spec: JudgeSpec, judge_tok, slot_texts: dict[str, Sequence[str]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host rendering of query rows: slot texts -> judge tokens (N, max_len) left-padded, mask, truncated (N,).

    Too-long rows are cut by the same rule as token space (`kept_lengths`), measured in judge tokens: each slot
    text is cut at a token boundary (offsets), then the template is rendered and tokenised as a whole. Should
    re-tokenisation of the whole still exceed max_len (tokens merging across boundaries), the oldest tokens after
    the special prefix go too.
    """
    n_rows = len(next(iter(slot_texts.values())))
    encodings = {s: judge_tok(list(slot_texts[s]), add_special_tokens=False, return_offsets_mapping=True)
                 for s in spec.slots}
    lengths = {s: jnp.asarray([len(ids) for ids in encodings[s]["input_ids"]], jnp.int32) for s in spec.slots}
    kept, truncated = kept_lengths(spec, lengths)
    kept = {s: np.asarray(v) for s, v in kept.items()}
    truncated = np.asarray(truncated).copy()
    prefix = list(spec.special_prefix_ids)
    rows = []
    for n in range(n_rows):
        texts = {}
        for s in spec.slots:
            text, offsets, full, keep = (slot_texts[s][n], encodings[s]["offset_mapping"][n],
                                         len(encodings[s]["input_ids"][n]), int(kept[s][n]))
            if keep < full:
                if s == "prompt":
                    text = text[offsets[full - keep][0]:] if keep else ""
                else:
                    text = text[:offsets[keep - 1][1]] if keep else ""
            texts[s] = text
        ids = list(text_ids(judge_tok, render(spec, texts)))
        room = spec.max_len - len(prefix)
        if len(ids) > room:
            ids, truncated[n] = ids[len(ids) - room:], True
        rows.append(prefix + ids)
    tokens, mask = data_lib.left_pad(rows, spec.max_len, spec.pad_id)
    return tokens, mask, truncated


def encode_queries(spec: JudgeSpec, judge_tok, prompts: Sequence[str], responses: Sequence[str],
                   principle_index_b: np.ndarray | None = None, *, responses_b: Sequence[str] | None = None,
                   references: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The query rows of B examples from their texts, query-major (row n = q * B + b): each query's slots filled
    with the example's inputs the mode's `Query` names (pairwise: (a, b) then (b, a)), rendered and tokenised by
    `encode_texts`. Returns tokens (Q * B, max_len), mask, truncated (Q * B,)."""
    B = len(prompts)
    inputs: dict[str, list[str]] = {"prompt": list(prompts), "response": list(responses)}
    if "response_b" in spec.slots:
        if responses_b is None:
            raise ValueError("the judge template has {response_b}; pass responses_b")
        inputs["response_b"] = list(responses_b)
    if "reference" in spec.slots:
        if references is None:
            raise ValueError("the judge template has {reference}; pass references")
        inputs["reference"] = list(references)
    if principle_index_b is not None:
        inputs["principle"] = [spec.principle_texts[i] for i in np.asarray(principle_index_b)]
    slot_texts = {}
    for slot in spec.slots:
        if slot == "criterion":
            slot_texts[slot] = [spec.criterion_texts[q.criterion] for q in spec.queries for _ in range(B)]
        else:
            slot_texts[slot] = [text for name in spec.slot_inputs(slot) for text in inputs[name]]
    return encode_texts(spec, judge_tok, slot_texts)


def score_texts(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, judge_tok, prompts: Sequence[str],
                responses: Sequence[str], rng: jax.Array, *, rows_per_prompt: int = 1,
                responses_b: Sequence[str] | None = None, references: Sequence[str] | None = None
                ) -> tuple[jax.Array, JudgeMetrics]:
    """Judging from text (host rendering + the jitted judge forward and scoring). Used by the host path and
    `scripts/judge_eval.py`; the preference labelling (`rlaif_jax.labelling`) renders with `encode_queries` too.
    rows_per_prompt: as in `score` (one principle per prompt)."""
    principle_index_b = _sample_principles_jit(spec, rng, len(prompts), rows_per_prompt)
    tokens, mask, truncated = encode_queries(spec, judge_tok, prompts, responses, principle_index_b,
                                             responses_b=responses_b, references=references)
    return score_queries_jit(judge_params, judge_cfg, spec, jnp.asarray(tokens), jnp.asarray(mask),
                             jnp.asarray(truncated), principle_index_b, rationale_key(rng))


def decode_spans(spec: JudgeSpec, policy_tok, tokens: np.ndarray, source: SlotSource,
                 ended: np.ndarray | None = None) -> list[str]:
    """The text of each row's span (special tokens skipped); with include_stop_token, rows that ended with a stop
    token get the judge tokenizer's EOS text appended."""
    start, length = np.asarray(source.start), np.asarray(source.length)
    texts = [policy_tok.decode(tokens[n, start[n]:start[n] + length[n]].tolist(), skip_special_tokens=True)
             for n in range(tokens.shape[0])]
    if ended is not None and spec.include_stop_token:
        texts = [t + spec.stop_text if e else t for t, e in zip(texts, ended)]
    return texts


def score_host(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, policy_tok, judge_tok,
               prompts_bp, prompt_mask_bp, responses_br, response_mask_br, rng: jax.Array, *,
               rows_per_prompt: int = 1, responses_b_br=None, response_b_mask_br=None, references_bf=None,
               reference_mask_bf=None) -> tuple[jax.Array, JudgeMetrics]:
    """The host path: decode the rollout's tokens with the policy tokenizer, render, re-tokenise with the judge's,
    then the same jitted judge forward + scoring as token space (arguments as `score`'s). Arrays must be
    addressable from this process."""
    prompts_bp, prompt_mask_bp = np.asarray(prompts_bp), np.asarray(prompt_mask_bp)
    prompts = decode_spans(spec, policy_tok, prompts_bp, prompt_source(spec, prompts_bp, prompt_mask_bp))

    def responses_text(tokens, mask):
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        src = response_source(dataclasses.replace(spec, include_stop_token=False), tokens, mask)
        return decode_spans(spec, policy_tok, tokens, src, np.asarray(ended_with_stop(spec, tokens, mask)))

    responses = responses_text(responses_br, response_mask_br)
    responses_b = None if responses_b_br is None else responses_text(responses_b_br, response_b_mask_br)
    references = None
    if references_bf is not None:
        references_bf = np.asarray(references_bf)
        start, length = mask_span(np.asarray(reference_mask_bf))
        references = decode_spans(spec, policy_tok, references_bf, SlotSource(references_bf, start, length))
    return score_texts(judge_params, judge_cfg, spec, judge_tok, prompts, responses, rng,
                       rows_per_prompt=rows_per_prompt, responses_b=responses_b, references=references)


def score_outside_jit(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, policy_tok, judge_tok, prompts_bp,
                      prompt_mask_bp, responses_br, response_mask_br, rng: jax.Array, **kwargs
                      ) -> tuple[jax.Array, JudgeMetrics]:
    """Judging of rollout arrays called from Python (not inside a jit), on the path `spec.path` names (decided
    once, by `choose_path` in `make_spec`): the jitted token-space `score`, or `score_host`. kwargs: `score`'s
    keyword arguments. The held-out evaluation judges through it."""
    args = (judge_params, judge_cfg, spec)
    arrays = (prompts_bp, prompt_mask_bp, responses_br, response_mask_br, rng)
    if spec.path == "token_space":
        return score_jit(*args, *arrays, **kwargs)
    return score_host(*args, policy_tok, judge_tok, *arrays, **kwargs)


# ================================================================================================ preference pairs
def encode_responses(spec: JudgeSpec, tok, prompts: Sequence[str], responses: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of reward-model rows of complete text responses (a preference file's, a dataset's
    references). A complete response ended, so with `include_stop_token` its row ends with the judge's EOS text
    (`spec.stop_text`), as the row of a sample that stopped does when the reward model scores it in training."""
    texts = [r + spec.stop_text for r in responses]
    tokens, mask, _ = encode_texts(spec, tok, {"prompt": list(prompts), "response": texts})
    return tokens, mask


def encode_pairs(spec: JudgeSpec, tok, records: Sequence[dict[str, Any]]) -> reward_model.PairBatch:
    """Both responses of every labelled pair rendered with the reward model's template (one row each)."""
    prompts = [r["prompt"] for r in records]
    tokens_a, mask_a = encode_responses(spec, tok, prompts, [r["response_a"] for r in records])
    tokens_b, mask_b = encode_responses(spec, tok, prompts, [r["response_b"] for r in records])
    return reward_model.PairBatch(tokens_a, mask_a, tokens_b, mask_b,
                                  np.asarray([r["p_a_better"] for r in records], np.float32))
