"""A reasoning judge: Lee et al. 2023's two-step chain of thought ("RLAIF vs. RLHF", arXiv:2309.00267, sec. 3.1).

  1. Every judge row is continued by the judge itself with our sampler (`rollout.rollout`): a rationale of at
     most cot.max_new_tokens tokens, greedy or at temperature / top-k / top-p, ended by the judge's EOS (which
     is dropped). The row's template asks for it: with cot.enabled and no config.judge.template, the mode's
     `cot_template` ("... Explain ... .\nRationale :").
  2. The rationale's tokens and those of cot.answer_prompt (tokenised on their own; "" = the mode's, e.g.
     "\nBetter response :") are appended to the row, and the mode reads its answer tokens after them exactly as
     without reasoning. The judge reads its own tokens, not a re-tokenisation of their text.

`config.judge.cot` holds the settings; `make_spec` turns them into `JudgeSpec.reasoning` (a static `Reasoning`),
and `scoring.score_queries` runs `reason` before the judge forward whenever it is set. So every caller of the
judge gets it alike: the compiled train step (token space and host paths), the evaluation, plan mode and the
preference labeller. Modes with answer tokens only (pointwise, principles, pairwise, rubric); not reward_model or
remote.

Cost: a rollout of the judge over all its rows (one prefill of max_len tokens, then up to max_new_tokens decode
steps, leaving early when every row has ended), then the answer forward over max_len + max_new_tokens + len(answer)
tokens instead of max_len. `scripts/bench_step.py --judge_cot N` measures it per training step.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax import rollout as rollout_lib
from rlaif_jax.models.config import ModelConfig

# Modes whose score is read from answer tokens, so that a rationale can come before them.
MODES_WITH_ANSWER = ("pointwise", "principles", "pairwise", "rubric")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of `config.judge.cot`."""
    c = ml_collections.ConfigDict()
    c.enabled = False  # two steps: a sampled rationale, then the answer after it
    c.answer_prompt = ""  # appended after the rationale; "" = the mode's (spec.MODES[mode].cot_answer_prompt)
    c.max_new_tokens = 64  # the rationale's budget (tokens)
    c.greedy = True  # argmax decoding; False samples at temperature / top_k / top_p
    c.temperature = 1.0
    c.top_k = 0
    c.top_p = 1.0
    return c


def sampling(c: ml_collections.ConfigDict, stop_ids: Sequence[int]) -> rollout_lib.SamplingConfig:
    """The rationale's sampling: one sample per judge row, ended by `stop_ids` (validated on construction)."""
    return rollout_lib.SamplingConfig(
        max_new_tokens=c.max_new_tokens, temperature=float(c.temperature), top_k=c.top_k, top_p=float(c.top_p),
        greedy=bool(c.greedy), n_samples=1, stop_ids=tuple(int(i) for i in stop_ids), cache_phases=1)


def validate_config(c: ml_collections.ConfigDict, mode: str, where: str = "config.judge.cot") -> None:
    """Checks `config.judge.cot` for a judge of `mode`; ValueError names the setting to change."""
    defaults = default_config()
    if set(c.keys()) != set(defaults.keys()):
        unknown = sorted(set(c.keys()) - set(defaults.keys()))
        raise ValueError(f"{where} has {unknown or 'missing'} keys; its settings are {sorted(defaults.keys())}")
    if not c.enabled:
        changed = sorted(k for k, v in defaults.items() if k != "enabled" and c[k] != v)
        if changed:
            raise ValueError(f"{where}.{changed[0]} is set but {where}.enabled is False: enable chain of thought "
                             "or clear it")
        return
    if mode not in MODES_WITH_ANSWER:
        raise ValueError(f"{where}.enabled: a rationale is read before answer tokens, which mode {mode!r} has "
                         f"none of; use one of {MODES_WITH_ANSWER}, or disable chain of thought")
    if c.greedy:
        sampled = sorted(k for k in ("temperature", "top_k", "top_p") if c[k] != defaults[k])
        if sampled:
            raise ValueError(f"{where}.{sampled[0]} is set but {where}.greedy is True (argmax ignores it): set "
                             f"{where}.greedy=False to sample the rationale, or clear it")
    try:
        sampling(c, ())
    except ValueError as e:
        raise ValueError(str(e).replace("rollout.max_new_tokens", f"{where}.max_new_tokens")
                         .replace("rollout.", f"{where}.")) from None


@dataclasses.dataclass(frozen=True)
class Reasoning:
    """Static chain-of-thought settings of a judge (part of its `JudgeSpec`)."""
    sampling: rollout_lib.SamplingConfig
    answer_ids: tuple[int, ...]  # the answer prompt's tokens, appended after the rationale


def answer_rows(question_nt: jax.Array, question_mask_nt: jax.Array, rationale_nr: jax.Array,
                rationale_mask_nr: jax.Array, answer_ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """[question, rationale, answer prompt] as left-padded rows (N, T + R + A): the three pieces concatenated, then
    each row's real tokens moved to its end in order (a stable sort by the mask), so no gap of unused rationale
    slots sits between them (positions and sliding windows count slots)."""
    N = question_nt.shape[0]
    answer_na = jnp.broadcast_to(jnp.asarray(answer_ids, jnp.int32), (N, len(answer_ids)))
    tokens = jnp.concatenate([question_nt.astype(jnp.int32), rationale_nr.astype(jnp.int32), answer_na], axis=1)
    mask = jnp.concatenate([question_mask_nt.astype(jnp.int32), rationale_mask_nr.astype(jnp.int32),
                            jnp.ones_like(answer_na)], axis=1)
    order = jnp.argsort(mask, axis=1, stable=True)
    return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def reason(params, cfg: ModelConfig, reasoning: Reasoning, tokens_nt: jax.Array, mask_nt: jax.Array,
           key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Step 1 and the rows of step 2: the judge's rationale after each row, then [row, rationale, answer prompt].
    Returns (answer rows (N, T + R + A), their mask, rationale tokens (N, R), rationale mask (N, R): 1 on its
    tokens, not on the stop token or padding)."""
    roll = rollout_lib.rollout(params, cfg, tokens_nt, mask_nt, key, reasoning.sampling)
    stops = jnp.asarray(reasoning.sampling.stop_ids, jnp.int32)
    keep_nr = (roll.response_mask_br > 0) & ~jnp.isin(roll.response_tokens_br, stops)
    tokens, mask = answer_rows(tokens_nt, mask_nt, roll.response_tokens_br, keep_nr, reasoning.answer_ids)
    return tokens, mask, roll.response_tokens_br, keep_nr.astype(jnp.int32)
