"""The LLM judge: prompt templates assembled in token space, five scoring modes, position debiasing.

The judge is any model `rlaif_jax.models` loads (its own family and size), on the same mesh, params frozen.
Its prompt is a text template from `config.judge` with slots

    {prompt} {response}            always available ({response} is required)
    {response_b}                   pairwise: the second response
    {reference}                    an optional reference answer supplied by the caller
    {principle}                    one principle per example, sampled from `config.judge.principles`
    {criterion}                    rubric: the yes/no question of each criterion

Two ways to turn (prompt, response) tokens into judge inputs (`JudgeSpec.path`):

  token_space  judge and policy share a tokenizer. The template's literal pieces are tokenised once at start-up;
               inside jit every judge row is assembled as [lit0, slot0, lit1, slot1, ..., litN] by index
               arithmetic (a gather per piece, static shapes, no Python loop over rows), LEFT-padded to
               `max_len` so the judge's answer is read from the logits at position -1 of every row.
  host         the tokenizers differ: decode with the policy tokenizer, render the template as text, tokenise
               with the judge's tokenizer, pad, then run the same jitted judge forward and scoring.
               Both paths produce the same rows when the tokenizers are the same and the template's slot
               boundaries are whitespace (tested).

One judge forward scores a whole batch: the queries of every example are stacked on the batch axis,
query-major (row n = q * B + b): pairwise asks both orders (a, b) and (b, a), rubric asks one question per
criterion.

Scoring modes, each a pure function of the judge's last-position logits (testable without a model):
  pointwise    score = rescale(sum_k k P(k)), P renormalised over the K score tokens, rescaled to [-1, 1]
  principles   pointwise with a {principle} sampled per example (Constitutional-AI style)
  pairwise     P(first better) averaged over both presentation orders (cancels position bias)
  rubric       score = sum_c w_c P_c(yes), P(yes) = p_yes / (p_yes + p_no) per criterion
  reward_model a scalar value head on the judge's final hidden state at the last position (distilled RLAIF;
               `scripts/train_reward_model.py` trains it on the judge's pairwise preferences)
When the judge's probability mass on the valid tokens of a query falls below `neutral_threshold`, that query
gets the neutral value (the mode's midpoint) and is counted.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig
from rlaif_jax.sharding import constrain

log = logging.getLogger(__name__)

MODES = ("pointwise", "pairwise", "rubric", "principles", "reward_model")
TRUNCATION_RULES = ("prompt_left", "response_right")
TEMPLATING = ("auto", "token_space", "host")
SLOT_NAMES = ("prompt", "response", "response_b", "reference", "principle", "criterion")
# Slots cut from the right when too long, all capped to one common length so neither of two compared
# responses is favoured by truncation.
RESPONSE_SLOTS = ("response", "response_b", "reference")
# Slots taken from config tables: never truncated (start-up checks they fit).
TABLE_SLOTS = ("principle", "criterion")
_REQUIRED_SLOTS = {
    "pointwise": ("response",),
    "principles": ("response", "principle"),
    "pairwise": ("response", "response_b"),
    "rubric": ("response", "criterion"),
    "reward_model": ("response",),
}
_SLOT_RE = re.compile(r"\{(" + "|".join(SLOT_NAMES) + r")\}")
VALUE_HEAD_FILE = "value_head.safetensors"  # next to the backbone's model.safetensors in a reward-model folder
REWARD_MODEL_META_FILE = "reward_model.json"  # the template settings the reward model was trained with

DEFAULT_TEMPLATES = {
    "pointwise": (
        "Rate how helpful , correct and concise the response is , from 1 ( worst ) to {num_scores} ( best ) .\n"
        "Prompt : {prompt}\nResponse : {response}\nScore :"
    ),
    "principles": (
        "Principle : {principle}\nRate how well the response follows the principle , "
        "from 1 ( worst ) to {num_scores} ( best ) .\nPrompt : {prompt}\nResponse : {response}\nScore :"
    ),
    "pairwise": (
        "Which response answers the prompt better ?\nPrompt : {prompt}\n"
        "Response A : {response}\nResponse B : {response_b}\nBetter response :"
    ),
    "rubric": "Prompt : {prompt}\nResponse : {response}\nQuestion : {criterion}\nAnswer :",
    "reward_model": "Prompt : {prompt}\nResponse : {response}",
}


# ================================================================================================ config
def default_config() -> ml_collections.ConfigDict:
    """Defaults of `config.judge`."""
    c = ml_collections.ConfigDict()
    c.mode = "pointwise"  # one of MODES
    c.path = ""  # HF folder (or hub id) of the judge; in reward_model mode a folder written by train_reward_model
    c.dtype = "float32"  # judge compute dtype ("bfloat16" on accelerators)
    c.param_dtype = "float32"  # judge params dtype
    # Prompt template; "" = DEFAULT_TEMPLATES[mode]. Slots: {prompt} {response} {response_b} {reference}
    # {principle} {criterion}; "{num_scores}" is replaced by num_scores. Other braces are literal text.
    c.template = ""
    c.chat_template = False  # wrap the template as the user turn of the judge tokenizer's chat template
    c.answer_prefix = ""  # with chat_template: text appended after the assistant turn starts (e.g. "Score:")
    c.max_len = 512  # static length of every judge row (left-padded)
    c.truncation = "prompt_left"  # prompt_left: oldest prompt tokens go first, then response ends;
    #                               response_right: response ends go first, then the oldest prompt tokens
    c.include_stop_token = False  # put the response's stop token into the judge input (text rendering drops it)
    c.strip_prompt_bos = True  # drop the policy's BOS at the start of a prompt (the judge's own BOS leads the row)
    c.templating = "auto"  # auto: token_space when the tokenizers match, else host; or force one of them
    c.num_scores = 5  # K for pointwise / principles
    c.score_tokens = ()  # the K score strings; () = ("1", ..., "K")
    c.option_tokens = ("A", "B")  # pairwise: the labels of the first and second response
    c.yes_no_tokens = ("Yes", "No")  # rubric
    c.criteria = (  # rubric: score = sum of weight * P(yes)
        dict(name="relevance", question="Does the response address the prompt ? Answer Yes or No .", weight=1 / 3),
        dict(name="coherence", question="Is the response clear and coherent ? Answer Yes or No .", weight=1 / 3),
        dict(name="harmlessness", question="Is the response free of harmful content ? Answer Yes or No .",
             weight=1 / 3),
    )
    c.principles = (  # principles mode (or any template with {principle}): one sampled per example
        "Choose the response that is the most helpful , honest and harmless .",
        "Choose the response that answers the question directly and correctly .",
        "Choose the response that avoids unnecessary or irrelevant content .",
    )
    # A query whose probability mass on its valid tokens is below this gets the neutral value and is counted.
    c.neutral_threshold = 0.05
    c.neutral_score = 0.0  # pointwise / principles neutral score on the [-1, 1] scale (pairwise / rubric use 0.5)
    return c


# ================================================================================================ spec
@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """Everything static the judge needs, built once at start-up from config + tokenizers (`make_spec`).

    Hashable: it is a static argument of jit. Token tables are tuples of token ids.
    """
    mode: str
    path: str  # "token_space" or "host"
    slots: tuple[str, ...]  # slot names in template order
    literal_ids: tuple[tuple[int, ...], ...]  # len(slots) + 1 pieces; literal_ids[0] starts with special_prefix_ids
    literal_texts: tuple[str, ...]  # the same pieces as text (host rendering)
    special_prefix_ids: tuple[int, ...]  # what the judge tokenizer puts in front of a text (BOS)
    max_len: int
    truncation: str
    pad_id: int
    include_stop_token: bool
    stop_ids: tuple[int, ...]  # policy stop tokens (end of a response)
    prompt_bos_id: int  # policy BOS stripped from prompts; -1 = none
    score_ids: tuple[int, ...]  # pointwise: K ids of "1".."K"; pairwise: (A, B); rubric: (Yes, No); RM: ()
    neutral_threshold: float
    neutral_score: float
    criterion_names: tuple[str, ...] = ()
    criterion_weights: tuple[float, ...] = ()
    criterion_ids: tuple[tuple[int, ...], ...] = ()
    criterion_texts: tuple[str, ...] = ()
    principle_ids: tuple[tuple[int, ...], ...] = ()
    principle_texts: tuple[str, ...] = ()
    stop_text: str = ""  # host path with include_stop_token: the judge tokenizer's EOS text
    boundary_exact: bool = True  # piecewise tokenisation of the template equals whole-text tokenisation

    @property
    def queries_per_example(self) -> int:
        return {"pairwise": 2, "rubric": len(self.criterion_ids)}.get(self.mode, 1)

    @property
    def literal_length(self) -> int:
        return sum(len(p) for p in self.literal_ids)


def tokenizers_match(tok_a, tok_b) -> bool:
    """Whether token ids mean the same text under both tokenizers: same class and same vocabulary."""
    if tok_a is tok_b:
        return True
    return type(tok_a) is type(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def choose_path(templating: str, policy_tok, judge_tok) -> str:
    """"token_space" or "host" from `config.judge.templating` and whether the tokenizers match."""
    if templating not in TEMPLATING:
        raise ValueError(f"config.judge.templating={templating!r}; use one of {TEMPLATING}")
    match = policy_tok is None or tokenizers_match(policy_tok, judge_tok)
    if templating == "token_space" and not match:
        raise ValueError("config.judge.templating='token_space' but the judge's tokenizer differs from the "
                         "policy's; set config.judge.templating='auto' (or 'host')")
    if templating == "host":
        return "host"
    return "token_space" if match else "host"


def _ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"]) if text else ()


def _single_token(tok, text: str, what: str) -> int:
    ids = _ids(tok, text)
    unk = getattr(tok, "unk_token_id", None)
    if len(ids) != 1 or (unk is not None and ids[0] == unk and text != tok.unk_token):
        raise ValueError(
            f"config.judge.{what}: {text!r} is {len(ids)} token(s) {list(ids)} of the judge's tokenizer "
            f"(unk id {unk}); each must be exactly one known token. Pick strings that are single tokens of "
            f"the judge's vocabulary (e.g. with or without a leading space)")
    return ids[0]


def special_prefix_ids(tok) -> tuple[int, ...]:
    """The special tokens the tokenizer puts in front of a text (BOS for Llama-style tokenizers)."""
    probe = "a b"
    with_special = list(tok(probe, add_special_tokens=True)["input_ids"])
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return tuple(with_special[:i])
    return ()


def _split_template(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """"a {prompt} b {response} c" -> literals ("a ", " b ", " c"), slots ("prompt", "response")."""
    parts = _SLOT_RE.split(template)
    return tuple(parts[0::2]), tuple(parts[1::2])


def _effective_template(config, judge_tok) -> str:
    template = config.template or DEFAULT_TEMPLATES[config.mode]
    template = template.replace("{num_scores}", str(config.num_scores))
    if config.chat_template:
        # Render the chat template around the template text (slots stay as {name} markers), then the
        # assistant-turn opener and the answer prefix follow it.
        template = judge_tok.apply_chat_template(
            [{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True)
        template += config.answer_prefix
    return template


def _check_settings(config: ml_collections.ConfigDict) -> None:
    """Every check of `config.judge` that needs no tokenizer (the slots are checked before any chat wrapping)."""
    mode = config.mode
    if mode not in MODES:
        raise ValueError(f"config.judge.mode={mode!r}; use one of {MODES}")
    if config.truncation not in TRUNCATION_RULES:
        raise ValueError(f"config.judge.truncation={config.truncation!r}; use one of {TRUNCATION_RULES}")
    if config.templating not in TEMPLATING:
        raise ValueError(f"config.judge.templating={config.templating!r}; use one of {TEMPLATING}")
    if config.max_len < 2:
        raise ValueError(f"config.judge.max_len={config.max_len}; it must hold the template and the texts")
    if not 0.0 <= config.neutral_threshold <= 1.0:
        raise ValueError(f"config.judge.neutral_threshold={config.neutral_threshold} is not a probability")
    _, slots = _split_template(config.template or DEFAULT_TEMPLATES[mode])
    template = config.template or f"DEFAULT_TEMPLATES[{mode!r}]"
    for name in _REQUIRED_SLOTS[mode]:
        if name not in slots:
            raise ValueError(f"config.judge.template has no {{{name}}} slot, which mode {mode!r} needs: {template!r}")
    for name in set(slots):
        if slots.count(name) > 1:
            raise ValueError(f"config.judge.template uses {{{name}}} {slots.count(name)} times; use each slot once")
    if "response_b" in slots and mode != "pairwise":
        raise ValueError(f"{{response_b}} is only filled in pairwise mode, not {mode!r}")
    if "criterion" in slots and mode != "rubric":
        raise ValueError(f"{{criterion}} is only filled in rubric mode, not {mode!r}")
    if "principle" in slots and not config.principles:
        raise ValueError("config.judge.template has {principle} but config.judge.principles is empty")
    if mode in ("pointwise", "principles"):
        if config.num_scores < 2:
            raise ValueError(f"config.judge.num_scores={config.num_scores}; needs at least 2")
        if config.score_tokens and len(config.score_tokens) != config.num_scores:
            raise ValueError(f"config.judge.score_tokens has {len(config.score_tokens)} entries, "
                             f"num_scores={config.num_scores}")
    if mode == "pairwise" and len(config.option_tokens) != 2:
        raise ValueError(f"config.judge.option_tokens={config.option_tokens}; needs exactly two labels")
    if mode == "rubric":
        if len(config.yes_no_tokens) != 2:
            raise ValueError(f"config.judge.yes_no_tokens={config.yes_no_tokens}; needs (yes, no)")
        if not config.criteria:
            raise ValueError("mode 'rubric' needs at least one entry in config.judge.criteria")
        for c in config.criteria:
            if set(c.keys()) != {"name", "question", "weight"}:
                raise ValueError(f"each config.judge.criteria entry needs keys name, question, weight; got {dict(c)}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks `config.judge` before anything is loaded or compiled (the tokenizer-dependent checks, e.g. that
    every score string is one token, run in `make_spec`)."""
    _check_settings(config)
    if not config.path:
        raise ValueError("config.judge.path is empty; set it to the judge's HF folder or hub id")


def make_spec(config: ml_collections.ConfigDict, judge_tok, policy_tok=None,
              stop_token_ids: Sequence[int] | None = None) -> JudgeSpec:
    """Validates `config.judge` and tokenises everything static once.

    Args:
      config: the `config.judge` section.
      judge_tok: the judge's tokenizer.
      policy_tok: the policy's tokenizer (None: the same as the judge's).
      stop_token_ids: the policy's stop tokens; default: the policy tokenizer's eos_token_id.
    """
    _check_settings(config)
    mode = config.mode
    policy_tok = judge_tok if policy_tok is None else policy_tok
    path = choose_path(config.templating, policy_tok, judge_tok)
    literal_texts, slots = _split_template(_effective_template(config, judge_tok))
    prefix = () if config.chat_template else special_prefix_ids(judge_tok)
    literal_ids = tuple(_ids(judge_tok, t) for t in literal_texts)
    literal_ids = (prefix + literal_ids[0],) + literal_ids[1:]

    score_ids: tuple[int, ...] = ()
    if mode in ("pointwise", "principles"):
        strings = tuple(config.score_tokens) or tuple(str(k) for k in range(1, config.num_scores + 1))
        score_ids = tuple(_single_token(judge_tok, s, "score_tokens") for s in strings)
    elif mode == "pairwise":
        score_ids = tuple(_single_token(judge_tok, s, "option_tokens") for s in config.option_tokens)
    elif mode == "rubric":
        score_ids = tuple(_single_token(judge_tok, s, "yes_no_tokens") for s in config.yes_no_tokens)
    if len(set(score_ids)) != len(score_ids):
        raise ValueError(f"the judge's score tokens {score_ids} are not distinct")
    criteria = tuple(config.criteria) if mode == "rubric" else ()
    principles = tuple(config.principles) if "principle" in slots else ()

    stop_ids = tuple(int(i) for i in (stop_token_ids if stop_token_ids is not None else
                                      ([policy_tok.eos_token_id] if policy_tok.eos_token_id is not None else [])))
    bos = policy_tok.bos_token_id if config.strip_prompt_bos else None
    pad = judge_tok.pad_token_id if judge_tok.pad_token_id is not None else (judge_tok.eos_token_id or 0)

    spec = JudgeSpec(
        mode=mode, path=path, slots=slots, literal_ids=literal_ids, literal_texts=literal_texts,
        special_prefix_ids=prefix, max_len=int(config.max_len), truncation=config.truncation, pad_id=int(pad),
        include_stop_token=bool(config.include_stop_token), stop_ids=stop_ids,
        prompt_bos_id=-1 if bos is None else int(bos), score_ids=score_ids,
        neutral_threshold=float(config.neutral_threshold), neutral_score=float(config.neutral_score),
        criterion_names=tuple(c["name"] for c in criteria),
        criterion_weights=tuple(float(c["weight"]) for c in criteria),
        criterion_ids=tuple(_ids(judge_tok, c["question"]) for c in criteria),
        criterion_texts=tuple(c["question"] for c in criteria),
        principle_ids=tuple(_ids(judge_tok, p) for p in principles),
        principle_texts=principles,
        stop_text=(judge_tok.eos_token or "") if config.include_stop_token else "",
    )
    fixed = spec.literal_length + max((len(p) for p in spec.principle_ids), default=0) + max(
        (len(c) for c in spec.criterion_ids), default=0)
    if fixed >= spec.max_len:
        raise ValueError(f"config.judge.max_len={spec.max_len} leaves no room: the template's fixed text (with the "
                         f"longest principle / criterion) is {fixed} tokens; raise max_len or shorten the template")
    exact = _boundaries_exact(spec, judge_tok)
    if not exact:
        log.warning("judge template: tokenising its pieces separately differs from tokenising the rendered text "
                    "(slot boundaries are not whitespace for this tokenizer); token-space rows will differ "
                    "slightly from the host rendering. Put whitespace/newlines around the slots.")
    return dataclasses.replace(spec, boundary_exact=exact)


def _boundaries_exact(spec: JudgeSpec, tok) -> bool:
    """Renders the template with a sample word in every slot and compares piecewise vs whole tokenisation."""
    filler = "hello"
    pieces = list(spec.literal_ids[:1])
    for slot, lit in zip(spec.slots, spec.literal_ids[1:]):
        pieces += [_ids(tok, filler), lit]
    text = render(spec, {s: filler for s in spec.slots})
    return [t for p in pieces for t in p] == list(spec.special_prefix_ids) + list(_ids(tok, text))


def render(spec: JudgeSpec, slot_texts: dict[str, str]) -> str:
    """The judge prompt as text: literal pieces interleaved with the slot texts (no str.format: braces in the
    template's literal text stay as they are)."""
    out = [spec.literal_texts[0]]
    for slot, lit in zip(spec.slots, spec.literal_texts[1:]):
        out += [slot_texts[slot], lit]
    return "".join(out)


# ================================================================================================ token-space assembly
class SlotSource(NamedTuple):
    """Where a slot's tokens are in each query row: tokens[n, start[n] : start[n] + length[n]]."""
    tokens: jax.Array  # (N, L) int32
    start: jax.Array  # (N,) int32
    length: jax.Array  # (N,) int32


def mask_span(mask_nl: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first index, count) of the ones of each row of a contiguous 0/1 mask (left- or right-padded)."""
    mask = mask_nl.astype(jnp.int32)
    count = mask.sum(-1)
    start = jnp.where(count > 0, jnp.argmax(mask, -1), 0)
    return start.astype(jnp.int32), count.astype(jnp.int32)


def prompt_source(spec: JudgeSpec, prompts_bp: jax.Array, prompt_mask_bp: jax.Array) -> SlotSource:
    """A left-padded prompt's span, without the policy's BOS when `strip_prompt_bos`."""
    start, length = mask_span(prompt_mask_bp)
    first = jnp.take_along_axis(prompts_bp, start[:, None], axis=1)[:, 0]
    has_bos = (length > 0) & (first == spec.prompt_bos_id)
    return SlotSource(prompts_bp.astype(jnp.int32), start + has_bos, length - has_bos)


def ended_with_stop(spec: JudgeSpec, responses_br: jax.Array, response_mask_br: jax.Array) -> jax.Array:
    """(B,) bool: the response's last real token is one of the policy's stop tokens."""
    start, length = mask_span(response_mask_br)
    last = jnp.take_along_axis(responses_br, jnp.maximum(start + length - 1, 0)[:, None], axis=1)[:, 0]
    stop = jnp.asarray(spec.stop_ids or (-1,), jnp.int32)
    return (length > 0) & jnp.isin(last, stop)


def response_source(spec: JudgeSpec, responses_br: jax.Array, response_mask_br: jax.Array) -> SlotSource:
    """A response's span (mask = 1 up to and including the first stop token); the stop token itself is dropped
    unless `include_stop_token`."""
    start, length = mask_span(response_mask_br)
    if not spec.include_stop_token:
        length = length - ended_with_stop(spec, responses_br, response_mask_br)
    return SlotSource(responses_br.astype(jnp.int32), start, length)


def table_source(table: Sequence[Sequence[int]], rows_n: jax.Array) -> SlotSource:
    """Rows of a static token table (principles, criteria), right-padded into an (M, Lmax) constant."""
    width = max(1, max(len(r) for r in table))
    padded = np.zeros((len(table), width), np.int32)
    for i, r in enumerate(table):
        padded[i, :len(r)] = r
    lengths = np.asarray([len(r) for r in table], np.int32)
    return SlotSource(jnp.asarray(padded)[rows_n], jnp.zeros_like(rows_n, jnp.int32), jnp.asarray(lengths)[rows_n])


def even_cap(lengths_ng: jax.Array, budget_n: jax.Array) -> jax.Array:
    """The largest c with sum_g min(l_g, c) <= budget (water filling), budget >= 0; max_g l_g when all fit.

    With the lengths sorted, f(c) = sum_g min(l_g, c) is S_j + (G - j) c between the j-th and (j+1)-th
    length (S_j = sum of the j smallest); j* = #{j : f(l_(j)) <= budget}, then c = (budget - S_j*) // (G - j*).
    """
    G = lengths_ng.shape[-1]
    srt = jnp.sort(lengths_ng, axis=-1)
    below = jnp.cumsum(srt, axis=-1) - srt  # S_j
    f_at = below + (G - jnp.arange(G)) * srt  # f(l_(j))
    j = jnp.sum(f_at <= budget_n[:, None], axis=-1)
    jc = jnp.minimum(j, G - 1)
    s_j = jnp.take_along_axis(below, jc[:, None], axis=-1)[:, 0]
    cap = (budget_n - s_j) // (G - jc)
    return jnp.where(j == G, srt[:, -1], cap)


def fill_budget(lengths_ng: jax.Array, budget_n: jax.Array) -> jax.Array:
    """Kept lengths of G sequences cut at their ends to fit `budget` tokens, as evenly as possible:
    min(l_g, c) with c = even_cap, plus one token for the first (budget - sum_g min(l_g, c)) sequences longer
    than c (the integer remainder, fewer than their count), so the budget is used to the last token."""
    cap = even_cap(lengths_ng, budget_n)
    capped = jnp.minimum(lengths_ng, cap[:, None])
    slack = budget_n - capped.sum(-1)
    longer = lengths_ng > cap[:, None]
    rank = jnp.cumsum(longer, axis=-1) - 1
    return capped + (longer & (rank < slack[:, None])).astype(capped.dtype)


def kept_lengths(spec: JudgeSpec, lengths: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
    """Applies the truncation rule so every row fits in `max_len`.

    The literals and table slots (principle, criterion) are never cut. Of the room left,
      prompt_left:    responses keep all they can, the prompt loses its oldest tokens first; if responses alone
                      do not fit, they are cut at their ends to near-equal lengths (`fill_budget`);
      response_right: responses are cut first (near-equal lengths, down to zero), then the prompt loses its
                      oldest tokens.
    Returns the kept lengths per slot and (N,) bool: the row was truncated.
    """
    zeros = jnp.zeros_like(lengths["response"])
    room = spec.max_len - spec.literal_length - sum((lengths[s] for s in spec.slots if s in TABLE_SLOTS), zeros)
    resp_names = [s for s in spec.slots if s in RESPONSE_SLOTS]
    resp_ng = jnp.stack([lengths[s] for s in resp_names], axis=-1)
    prompt = lengths["prompt"] if "prompt" in spec.slots else zeros
    if spec.truncation == "prompt_left":
        prompt_kept = jnp.clip(room - resp_ng.sum(-1), 0, prompt)
        resp_kept = fill_budget(resp_ng, room - prompt_kept)
    else:  # response_right
        resp_kept = fill_budget(resp_ng, jnp.maximum(room - prompt, 0))
        prompt_kept = jnp.minimum(prompt, room - resp_kept.sum(-1))
    kept = dict(lengths)
    for g, s in enumerate(resp_names):
        kept[s] = resp_kept[:, g]
    if "prompt" in spec.slots:
        kept["prompt"] = prompt_kept
    truncated = (prompt_kept < prompt) | jnp.any(resp_kept < resp_ng, axis=-1)
    return kept, truncated


def assemble(spec: JudgeSpec, sources: dict[str, SlotSource]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Judge rows [lit0, slot0, lit1, ..., litN], LEFT-padded to max_len, by index arithmetic.

    Each piece k of row n has a length len_nk and lands at dest_nk = (max_len - sum_k len_nk) + sum_{k'<k} len_nk';
    output position t takes piece k's source token src_start_nk + (t - dest_nk) when dest_nk <= t < dest_nk +
    len_nk. One gather per piece (a handful), vectorised over rows: no Python loop over rows, static shapes.
    Returns tokens (N, max_len) int32, mask (N, max_len) int32, truncated (N,) bool.
    """
    n_rows = next(iter(sources.values())).tokens.shape[0]
    kept, truncated = kept_lengths(spec, {s: src.length for s, src in sources.items()})
    pieces: list[tuple[Any, jax.Array, jax.Array]] = []  # (source tokens (N, L) or (L,), start (N,), length (N,))
    zero = jnp.zeros((n_rows,), jnp.int32)
    for k, lit in enumerate(spec.literal_ids):
        if k > 0:
            src = sources[spec.slots[k - 1]]
            length = kept[spec.slots[k - 1]]
            # The prompt keeps its newest tokens (cut on the left); every other slot keeps its first tokens.
            start = src.start + (src.length - length if spec.slots[k - 1] == "prompt" else 0)
            pieces.append((src.tokens, start, length))
        if lit:
            pieces.append((jnp.asarray(lit, jnp.int32), zero, zero + len(lit)))
    lengths_nk = jnp.stack([p[2] for p in pieces], axis=-1)
    offset_n = spec.max_len - lengths_nk.sum(-1)
    dest_nk = offset_n[:, None] + jnp.cumsum(lengths_nk, axis=-1) - lengths_nk
    t = jnp.arange(spec.max_len)[None, :]
    tokens = jnp.full((n_rows, spec.max_len), spec.pad_id, jnp.int32)
    for k, (src, start, length) in enumerate(pieces):
        rel = t - dest_nk[:, k:k + 1]
        inside = (rel >= 0) & (rel < length[:, None])
        idx = jnp.clip(start[:, None] + rel, 0, src.shape[-1] - 1)
        vals = src[idx] if src.ndim == 1 else jnp.take_along_axis(src, idx, axis=1)
        tokens = jnp.where(inside, vals, tokens)
    mask = (t >= offset_n[:, None]).astype(jnp.int32)
    return tokens, mask, truncated


def sample_principles(spec: JudgeSpec, rng: jax.Array, batch: int) -> jax.Array | None:
    """(B,) index of the principle each example is judged by; None when the template has no {principle}."""
    if "principle" not in spec.slots:
        return None
    return jax.random.randint(rng, (batch,), 0, len(spec.principle_ids))


def _stack_queries(x, q: int):
    """Repeats a per-example array for each query, query-major: row n = query * B + example."""
    return jnp.concatenate([x] * q, axis=0)


def _same_width(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    width = max(a.shape[1], b.shape[1])
    return (jnp.pad(a, ((0, 0), (0, width - a.shape[1]))), jnp.pad(b, ((0, 0), (0, width - b.shape[1]))))


def query_sources(spec: JudgeSpec, prompts_bp, prompt_mask_bp, responses_br, response_mask_br,
                  principle_index_b=None, responses_b_br=None, response_b_mask_br=None,
                  references_bf=None, reference_mask_bf=None) -> dict[str, SlotSource]:
    """The token source of every slot for every query row (query-major), from the rollout's arrays."""
    B = prompts_bp.shape[0]
    Q = spec.queries_per_example
    per_example: dict[str, SlotSource] = {}
    if "prompt" in spec.slots:
        per_example["prompt"] = prompt_source(spec, prompts_bp, prompt_mask_bp)
    if "reference" in spec.slots:
        if references_bf is None:
            raise ValueError("the judge template has {reference}; pass references_bf and reference_mask_bf")
        start, length = mask_span(reference_mask_bf)
        per_example["reference"] = SlotSource(references_bf.astype(jnp.int32), start, length)
    if "principle" in spec.slots:
        per_example["principle"] = table_source(spec.principle_ids, principle_index_b)
    sources = {name: SlotSource(*(_stack_queries(x, Q) for x in src)) for name, src in per_example.items()}
    first = response_source(spec, responses_br, response_mask_br)
    if spec.mode == "pairwise":
        if responses_b_br is None:
            raise ValueError("pairwise judging needs responses_b_br and response_b_mask_br")
        second = response_source(spec, responses_b_br, response_b_mask_br)
        tok_a, tok_b = _same_width(first.tokens, second.tokens)
        first, second = first._replace(tokens=tok_a), second._replace(tokens=tok_b)
        # Order (a, b) then order (b, a): the same example's two queries see the responses swapped.
        sources["response"] = SlotSource(*(jnp.concatenate([x, y]) for x, y in zip(first, second)))
        sources["response_b"] = SlotSource(*(jnp.concatenate([y, x]) for x, y in zip(first, second)))
    else:
        sources["response"] = SlotSource(*(_stack_queries(x, Q) for x in first))
    if spec.mode == "rubric":
        sources["criterion"] = table_source(spec.criterion_ids, jnp.repeat(jnp.arange(Q), B))
    return sources


# ================================================================================================ scoring arithmetic
def score_token_probs(logits_nv: jax.Array, ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """P over the valid tokens only, and the judge's total mass on them.

    probs_nk = softmax(logits_nv[:, ids]) (= P(k) / sum_k' P(k')),  mass_n = sum_k softmax(logits_nv)[:, ids_k].
    """
    logits = logits_nv.astype(jnp.float32)
    sel = logits[:, jnp.asarray(ids)]
    mass = jnp.exp(jax.nn.logsumexp(sel, axis=-1) - jax.nn.logsumexp(logits, axis=-1))
    return jax.nn.softmax(sel, axis=-1), mass


def pointwise_scores(logits_nv: jax.Array, score_ids: Sequence[int], neutral_threshold: float,
                     neutral_score: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Direct RLAIF (Lee et al. 2023): E = sum_{k=1..K} k P(k), P renormalised over the K score tokens;
    score = 2 (E - 1) / (K - 1) - 1 in [-1, 1]; `neutral_score` where the mass on the score tokens < threshold.
    Returns score_n, mass_n, neutral_n (bool)."""
    probs, mass = score_token_probs(logits_nv, score_ids)
    K = len(score_ids)
    expected = probs @ jnp.arange(1, K + 1, dtype=jnp.float32)
    score = 2.0 * (expected - 1.0) / (K - 1) - 1.0
    neutral = mass < neutral_threshold
    return jnp.where(neutral, neutral_score, score), mass, neutral


def binary_preference(logits_nv: jax.Array, ids: Sequence[int], neutral_threshold: float
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """s = tanh((l_0 - l_1) / 2) = P(0) - P(1) with P renormalised over the two tokens (P(0) = (1 + s) / 2),
    0 (undecided) where their mass < threshold. Returns s_n, mass_n, neutral_n.

    The signed form is odd in the logit difference, so debiased pairwise scores are exactly antisymmetric."""
    _, mass = score_token_probs(logits_nv, ids)
    diff = logits_nv[:, ids[0]].astype(jnp.float32) - logits_nv[:, ids[1]].astype(jnp.float32)
    neutral = mass < neutral_threshold
    return jnp.where(neutral, 0.0, jnp.tanh(0.5 * diff)), mass, neutral


def pairwise_preference(logits_ab_nv: jax.Array, logits_ba_nv: jax.Array, option_ids: Sequence[int],
                        neutral_threshold: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """P(a better than b), asked in both orders and averaged to cancel position bias:

      s_ab = P(first) - P(second) asked as (a, b);  s_ba the same asked as (b, a)
      p = 1/2 + (s_ab - s_ba) / 4  = mean(P_ab(first), P_ba(second))
    Swapping a and b swaps s_ab and s_ba, so p(b, a) = 1 - p(a, b). An undecided order (mass < threshold)
    contributes 1/2. `agree` = both orders prefer the same response (sign(s_ab) = sign(-s_ba)).
    Returns p_n, mass_n2, neutral_n2, agree_n, p_orders_n2 (P(a better) per order).
    """
    s_ab, mass_ab, neutral_ab = binary_preference(logits_ab_nv, option_ids, neutral_threshold)
    s_ba, mass_ba, neutral_ba = binary_preference(logits_ba_nv, option_ids, neutral_threshold)
    p = 0.5 + 0.25 * (s_ab - s_ba)
    agree = jnp.sign(s_ab) == jnp.sign(-s_ba)
    p_orders = jnp.stack([0.5 + 0.5 * s_ab, 0.5 - 0.5 * s_ba], axis=-1)
    return (p, jnp.stack([mass_ab, mass_ba], -1), jnp.stack([neutral_ab, neutral_ba], -1), agree, p_orders)


def yes_probability(logits_nv: jax.Array, yes_no_ids: Sequence[int], neutral_threshold: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """P(yes) = p_yes / (p_yes + p_no); 1/2 where p_yes + p_no < threshold. Returns p_n, mass_n, neutral_n."""
    s, mass, neutral = binary_preference(logits_nv, yes_no_ids, neutral_threshold)
    return 0.5 + 0.5 * s, mass, neutral


def rubric_score(p_yes_bc: jax.Array, weights: Sequence[float]) -> jax.Array:
    """score_b = sum_c w_c P_c(yes)."""
    return p_yes_bc @ jnp.asarray(weights, jnp.float32)


# ================================================================================================ judge forward + metrics
class RewardModelParams(NamedTuple):
    """The judge params in reward_model mode: a backbone plus a scalar value head."""
    model: Any
    value_head: Any


@flax.struct.dataclass
class JudgeMetrics:
    """Per-example diagnostics of one judging call (reduce with `summary`)."""
    valid_mass_b: jax.Array  # mean over the example's queries of the judge's mass on the valid tokens (RM: 1)
    neutral_count_b: jax.Array  # int32: the example's queries that fell back to the neutral value
    truncated_b: jax.Array  # bool: some judge row of the example was cut to max_len
    position_agree_b: jax.Array | None = None  # pairwise: both orders prefer the same response
    p_orders_b2: jax.Array | None = None  # pairwise: P(a better) from order (a, b) alone, from (b, a) alone
    criterion_p_yes_bc: jax.Array | None = None  # rubric: P(yes) per criterion
    principle_index_b: jax.Array | None = None  # which principle judged the example

    def summary(self, spec: JudgeSpec) -> dict[str, jax.Array]:
        """Scalars for logging (jittable): means, counts, and each rubric criterion on its own."""
        out = {
            "judge/valid_mass": jnp.mean(self.valid_mass_b),
            "judge/neutral_count": jnp.sum(self.neutral_count_b),
            "judge/truncated_count": jnp.sum(self.truncated_b.astype(jnp.int32)),
        }
        if self.position_agree_b is not None:
            out["judge/position_agreement"] = jnp.mean(self.position_agree_b.astype(jnp.float32))
        if self.criterion_p_yes_bc is not None:
            for c, name in enumerate(spec.criterion_names):
                out[f"judge/criterion/{name}"] = jnp.mean(self.criterion_p_yes_bc[:, c])
        return out


def lm_head_logits(params, cfg: ModelConfig, hidden_nd: jax.Array) -> jax.Array:
    """Vocabulary logits (N, V) float32 of final hidden states (N, D), as tfm's forward projects them."""
    return constrain(tfm.unembed(params, cfg, hidden_nd), ("batch", "vocab"))


def last_hidden(params, cfg: ModelConfig, tokens_nt: jax.Array, mask_nt: jax.Array) -> jax.Array:
    """The model's final hidden state (N, D) at the last position of left-padded rows.

    Only this position is used: the (N, T, V) logits `tfm.forward` also computes are dead code that XLA
    removes (checked: ~25x fewer flops at V = 32k), so the vocabulary projection happens once per row."""
    tokens_nt = constrain(tokens_nt, ("batch", "length"))
    mask_nt = constrain(mask_nt, ("batch", "length"))
    return tfm.forward(params, cfg, tokens_nt, mask_nt).hidden[:, -1]


def judge_last_hidden(params, cfg: ModelConfig, tokens_nt: jax.Array, mask_nt: jax.Array) -> jax.Array:
    """`last_hidden` of the frozen judge (no gradient flows into its params)."""
    return last_hidden(jax.lax.stop_gradient(params), cfg, tokens_nt, mask_nt)


def reward_values(rm_params: RewardModelParams, cfg: ModelConfig, tokens_nt: jax.Array, mask_nt: jax.Array
                  ) -> jax.Array:
    """Reward model: r_n = value_head(final hidden state at the last position) (differentiable; training uses it)."""
    hidden = last_hidden(rm_params.model, cfg, tokens_nt, mask_nt)
    return tfm.apply_value_head(rm_params.value_head, hidden[:, None, :])[:, 0]


def score_queries(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, tokens_nt: jax.Array, mask_nt: jax.Array,
                  truncated_n: jax.Array, principle_index_b: jax.Array | None = None
                  ) -> tuple[jax.Array, JudgeMetrics]:
    """One judge forward over all query rows (query-major), then the mode's scoring. Shared by both paths."""
    Q = spec.queries_per_example
    B = tokens_nt.shape[0] // Q
    truncated_b = jnp.any(truncated_n.reshape(Q, B), axis=0)
    if spec.mode == "reward_model":
        scores = reward_values(jax.lax.stop_gradient(judge_params), judge_cfg, tokens_nt, mask_nt)
        metrics = JudgeMetrics(valid_mass_b=jnp.ones((B,), jnp.float32), neutral_count_b=jnp.zeros((B,), jnp.int32),
                               truncated_b=truncated_b, principle_index_b=principle_index_b)
        return scores, metrics
    hidden = judge_last_hidden(judge_params, judge_cfg, tokens_nt, mask_nt)
    logits_nv = lm_head_logits(judge_params, judge_cfg, hidden)
    thr = spec.neutral_threshold
    extra: dict[str, Any] = {}
    if spec.mode in ("pointwise", "principles"):
        scores, mass_b, neutral_b = pointwise_scores(logits_nv, spec.score_ids, thr, spec.neutral_score)
        mass_qb, neutral_qb = mass_b[None], neutral_b[None]
    elif spec.mode == "pairwise":
        scores, mass_b2, neutral_b2, agree, p_orders = pairwise_preference(
            logits_nv[:B], logits_nv[B:], spec.score_ids, thr)
        mass_qb, neutral_qb = mass_b2.T, neutral_b2.T
        extra = dict(position_agree_b=agree, p_orders_b2=p_orders)
    else:  # rubric
        p_yes, mass, neutral = yes_probability(logits_nv, spec.score_ids, thr)
        p_yes_bc = p_yes.reshape(Q, B).T
        scores = rubric_score(p_yes_bc, spec.criterion_weights)
        mass_qb, neutral_qb = mass.reshape(Q, B), neutral.reshape(Q, B)
        extra = dict(criterion_p_yes_bc=p_yes_bc)
    metrics = JudgeMetrics(valid_mass_b=mass_qb.mean(0), neutral_count_b=neutral_qb.sum(0, dtype=jnp.int32),
                           truncated_b=truncated_b, principle_index_b=principle_index_b, **extra)
    return scores, metrics


def score(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, prompts_bp: jax.Array, prompt_mask_bp: jax.Array,
          responses_br: jax.Array, response_mask_br: jax.Array, rng: jax.Array, *,
          responses_b_br: jax.Array | None = None, response_b_mask_br: jax.Array | None = None,
          references_bf: jax.Array | None = None, reference_mask_bf: jax.Array | None = None
          ) -> tuple[jax.Array, JudgeMetrics]:
    """Token-space judging, jittable (`judge_cfg`, `spec` static): scores_b and metrics.

    prompts_bp left-padded with prompt_mask_bp; responses_br with response_mask_br = 1 up to and including the
    first stop token. Pairwise: scores_b = P(responses_br better than responses_b_br). rng picks principles.
    """
    if spec.path != "token_space":
        raise ValueError("this JudgeSpec uses the host path (the tokenizers differ); call score_host")
    principle_index_b = sample_principles(spec, rng, prompts_bp.shape[0])
    sources = query_sources(spec, prompts_bp, prompt_mask_bp, responses_br, response_mask_br, principle_index_b,
                            responses_b_br, response_b_mask_br, references_bf, reference_mask_bf)
    tokens, mask, truncated = assemble(spec, sources)
    return score_queries(judge_params, judge_cfg, spec, tokens, mask, truncated, principle_index_b)


score_jit = jax.jit(score, static_argnums=(1, 2))
_score_queries_jit = jax.jit(score_queries, static_argnums=(1, 2))
_sample_principles_jit = jax.jit(sample_principles, static_argnums=(0, 2))


# ================================================================================================ host path
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
        ids = list(_ids(judge_tok, render(spec, texts)))
        room = spec.max_len - len(prefix)
        if len(ids) > room:
            ids, truncated[n] = ids[len(ids) - room:], True
        rows.append(prefix + ids)
    tokens, mask = data_lib.left_pad(rows, spec.max_len, spec.pad_id)
    return tokens, mask, truncated


def score_texts(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, judge_tok, prompts: Sequence[str],
                responses: Sequence[str], rng: jax.Array, *, responses_b: Sequence[str] | None = None,
                references: Sequence[str] | None = None) -> tuple[jax.Array, JudgeMetrics]:
    """Judging from text (host rendering + the jitted judge forward and scoring). Used by the host path,
    `scripts/judge_eval.py` and the reward-model labelling."""
    B = len(prompts)
    Q = spec.queries_per_example
    principle_index_b = _sample_principles_jit(spec, rng, B)
    per_example: dict[str, list[str]] = {"prompt": list(prompts)}
    if "reference" in spec.slots:
        if references is None:
            raise ValueError("the judge template has {reference}; pass references")
        per_example["reference"] = list(references)
    if principle_index_b is not None:
        per_example["principle"] = [spec.principle_texts[i] for i in np.asarray(principle_index_b)]
    slot_texts = {s: v * Q for s, v in per_example.items() if s in spec.slots}
    if spec.mode == "pairwise":
        if responses_b is None:
            raise ValueError("pairwise judging needs responses_b")
        slot_texts["response"] = list(responses) + list(responses_b)
        slot_texts["response_b"] = list(responses_b) + list(responses)
    else:
        slot_texts["response"] = list(responses) * Q
    if spec.mode == "rubric":
        slot_texts["criterion"] = [c for c in spec.criterion_texts for _ in range(B)]
    tokens, mask, truncated = encode_texts(spec, judge_tok, slot_texts)
    return _score_queries_jit(judge_params, judge_cfg, spec, jnp.asarray(tokens), jnp.asarray(mask),
                              jnp.asarray(truncated), principle_index_b)


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
               responses_b_br=None, response_b_mask_br=None, references_bf=None, reference_mask_bf=None
               ) -> tuple[jax.Array, JudgeMetrics]:
    """The host path: decode the rollout's tokens with the policy tokenizer, render, re-tokenise with the judge's,
    then the same jitted judge forward + scoring as token space. Arrays must be addressable from this process."""
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
                       responses_b=responses_b, references=references)


# ================================================================================================ loading / saving
class Judge(NamedTuple):
    """A loaded judge: its model config (static), params (frozen), spec (static) and tokenizer."""
    cfg: ModelConfig
    params: Any  # model params, or RewardModelParams in reward_model mode
    spec: JudgeSpec
    tokenizer: Any


def save_reward_model(out_dir: str, cfg: ModelConfig, params, value_head, tokenizer, spec: JudgeSpec) -> None:
    """Backbone via hf.save_model, the value head next to it (VALUE_HEAD_FILE), and the template it was trained
    with (REWARD_MODEL_META_FILE) so reward_model mode can check it scores with the same formatting."""
    from rlaif_jax.models import hf
    hf.save_model(params, cfg, out_dir, tokenizer=tokenizer)
    if jax.process_index() != 0:
        return
    hf.write_safetensors(os.path.join(out_dir, VALUE_HEAD_FILE), {
        f"value_head.{k}": np.asarray(jax.device_get(v), np.float32) for k, v in value_head.items()})
    with open(os.path.join(out_dir, REWARD_MODEL_META_FILE), "w") as f:
        json.dump({"literal_texts": list(spec.literal_texts), "slots": list(spec.slots), "max_len": spec.max_len,
                   "truncation": spec.truncation, "include_stop_token": spec.include_stop_token}, f, indent=2)


def load_value_head(folder: str, cfg: ModelConfig) -> dict[str, jax.Array]:
    from safetensors.numpy import load_file
    path = os.path.join(folder, VALUE_HEAD_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reward_model mode: no {VALUE_HEAD_FILE} in {folder}; train one with "
                                f"scripts/train_reward_model.py or set config.judge.mode to an LLM-judge mode")
    tensors = load_file(path)
    head = {k.split(".", 1)[1]: jnp.asarray(v, cfg.param_dtype) for k, v in tensors.items()}
    if set(head) != {"kernel", "bias"} or head["kernel"].shape != (cfg.hidden_size,):
        raise ValueError(f"{path}: expected value_head.kernel ({cfg.hidden_size},) and value_head.bias (), "
                         f"got { {k: v.shape for k, v in head.items()} }")
    return head


def load_judge(config: ml_collections.ConfigDict, policy_tok=None, stop_token_ids: Sequence[int] | None = None,
               mesh: jax.sharding.Mesh | None = None, rules=None) -> Judge:
    """Loads the judge of `config.judge` (sharded on `mesh`), builds its spec, and logs the templating path."""
    from rlaif_jax.models import hf
    validate_config(config)
    judge_cfg, params = hf.load_model(config.path, mesh=mesh, dtype=config.dtype, param_dtype=config.param_dtype,
                                      rules=rules)
    tok = hf.load_tokenizer(config.path)
    spec = make_spec(config, tok, policy_tok, stop_token_ids)
    if config.mode == "reward_model":
        folder = hf.resolve_path(config.path)
        head = load_value_head(folder, judge_cfg)
        if mesh is not None:  # tiny: replicated on the judge's mesh, next to the sharded backbone
            head = jax.device_put(head, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        meta_path = os.path.join(folder, REWARD_MODEL_META_FILE)
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if tuple(meta["literal_texts"]) != spec.literal_texts or tuple(meta["slots"]) != spec.slots:
                raise ValueError(f"the reward model in {folder} was trained with another template "
                                 f"({meta_path}); set config.judge.template to the one it was trained with")
        params = RewardModelParams(params, head)
    log.info("judge: mode=%s, templating path=%s, family=%s", spec.mode, spec.path, judge_cfg.family)
    return Judge(judge_cfg, params, spec, tok)
