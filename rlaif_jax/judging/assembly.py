"""The token-space path: judge rows assembled from the rollout's token arrays inside jit, then scored.

Every judge row is [lit0, slot0, lit1, slot1, ..., litN]: the template's literal pieces (tokenised once in
`JudgeSpec.literal_ids`) interleaved with spans of the rollout's arrays, located by `SlotSource`s and copied by
index arithmetic (a gather per piece, static shapes, no Python loop over rows). Rows are LEFT-padded to
`max_len`, so the judge's answer is read at position -1 of every row. Too-long rows are cut by the config's
truncation rule (`kept_lengths`), which the host path applies too.

Rows are query-major (row n = q * B + b): the slots of query q are filled as `JudgeSpec.queries[q]` says.
Shapes: B examples, N = Q * B rows, P prompt, R response, F reference length.

The n samples of a prompt (rows b = prompt * n + sample, `rows_per_prompt`) have the same row up to the first slot a
sample fills. With `share_prompt` the rows are also laid out split there (`split_rows`), so the judge forward runs
that part once per group (`scoring.judge_last_hidden`), as the policy's forwards run each prompt once.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.judging.scoring import JudgeMetrics, SharedPromptRows, score_queries
from rlaif_jax.judging.spec import RESPONSE_SLOTS, TABLE_SLOTS, JudgeSpec
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig


# ================================================================================================ slot sources
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


def sample_principles(spec: JudgeSpec, rng: jax.Array, batch: int, rows_per_prompt: int = 1) -> jax.Array | None:
    """(B,) index of the principle each example is judged by, drawn once per prompt and repeated over its
    `rows_per_prompt` = n rows (examples are prompt-major, b = prompt * n + sample): the n samples of a prompt are
    compared with each other (group baselines), so one principle judges them all and the comparison carries no
    principle noise. None when the template has no {principle}. The one place principles are drawn (token space,
    host path, evaluation)."""
    if "principle" not in spec.slots:
        return None
    if batch % rows_per_prompt:
        raise ValueError(f"{batch} examples are not whole groups of rows_per_prompt={rows_per_prompt}")
    per_prompt = jax.random.randint(rng, (batch // rows_per_prompt,), 0, len(spec.principle_ids))
    return jnp.repeat(per_prompt, rows_per_prompt)


def _stack_queries(per_query: Sequence[SlotSource]) -> SlotSource:
    """One source over the query-major rows (row n = query * B + example) from each query's (B,) source; token
    arrays of different widths are right-padded to the widest."""
    width = max(src.tokens.shape[1] for src in per_query)
    return SlotSource(
        jnp.concatenate([jnp.pad(src.tokens, ((0, 0), (0, width - src.tokens.shape[1]))) for src in per_query]),
        jnp.concatenate([src.start for src in per_query]),
        jnp.concatenate([src.length for src in per_query]))


def query_sources(spec: JudgeSpec, prompts_bp, prompt_mask_bp, responses_br, response_mask_br,
                  principle_index_b=None, responses_b_br=None, response_b_mask_br=None,
                  references_bf=None, reference_mask_bf=None) -> dict[str, SlotSource]:
    """The token source of every slot for every query row (query-major), from the rollout's arrays."""
    B = prompts_bp.shape[0]
    inputs: dict[str, SlotSource] = {"response": response_source(spec, responses_br, response_mask_br)}
    if "prompt" in spec.slots:
        inputs["prompt"] = prompt_source(spec, prompts_bp, prompt_mask_bp)
    if "response_b" in spec.slots:
        if responses_b_br is None:
            raise ValueError("the judge template has {response_b}; pass responses_b_br and response_b_mask_br")
        inputs["response_b"] = response_source(spec, responses_b_br, response_b_mask_br)
    if "reference" in spec.slots:
        if references_bf is None:
            raise ValueError("the judge template has {reference}; pass references_bf and reference_mask_bf")
        start, length = mask_span(reference_mask_bf)
        inputs["reference"] = SlotSource(references_bf.astype(jnp.int32), start, length)
    if "principle" in spec.slots:
        inputs["principle"] = table_source(spec.principle_ids, principle_index_b)
    sources = {}
    for slot in spec.slots:
        if slot == "criterion":
            criterion_n = jnp.repeat(jnp.asarray([q.criterion for q in spec.queries], jnp.int32), B)
            sources[slot] = table_source(spec.criterion_ids, criterion_n)
        else:
            sources[slot] = _stack_queries([inputs[name] for name in spec.slot_inputs(slot)])
    return sources


# ================================================================================================ truncation
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


# ================================================================================================ assembly
Piece = tuple[jax.Array, jax.Array, jax.Array]  # source tokens (N, L) or (L,), start (N,), kept length (N,)


def row_pieces(spec: JudgeSpec, sources: dict[str, SlotSource]) -> tuple[list[Piece], jax.Array]:
    """Each row's pieces in template order [lit0, slot0, lit1, ..., litN] (empty literals left out), slots cut to
    their kept lengths (`kept_lengths`), and (N,) bool: the row was truncated."""
    n_rows = next(iter(sources.values())).tokens.shape[0]
    kept, truncated = kept_lengths(spec, {s: src.length for s, src in sources.items()})
    pieces: list[Piece] = []
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
    return pieces, truncated


def lay_out(pieces: Sequence[Piece], width: int, pad_id: int, left_padded: bool) -> tuple[jax.Array, jax.Array]:
    """The pieces of each row one after another in `width` slots, LEFT-padded (the row ends at the last slot) or
    right-padded, by index arithmetic: piece k of row n has a length len_nk and lands at dest_nk = offset_n +
    sum_{k'<k} len_nk' (offset_n = width - sum_k len_nk left-padded, else 0); position t takes piece k's source
    token src_start_nk + (t - dest_nk) when dest_nk <= t < dest_nk + len_nk. One gather per piece (a handful),
    vectorised over rows: no Python loop over rows, static shapes. Returns tokens (N, width), mask (N, width)."""
    lengths_nk = jnp.stack([p[2] for p in pieces], axis=-1)
    total_n = lengths_nk.sum(-1)
    offset_n = width - total_n if left_padded else jnp.zeros_like(total_n)
    dest_nk = offset_n[:, None] + jnp.cumsum(lengths_nk, axis=-1) - lengths_nk
    t = jnp.arange(width)[None, :]
    tokens = jnp.full((lengths_nk.shape[0], width), pad_id, jnp.int32)
    for k, (src, start, length) in enumerate(pieces):
        rel = t - dest_nk[:, k:k + 1]
        inside = (rel >= 0) & (rel < length[:, None])
        idx = jnp.clip(start[:, None] + rel, 0, src.shape[-1] - 1)
        vals = src[idx] if src.ndim == 1 else jnp.take_along_axis(src, idx, axis=1)
        tokens = jnp.where(inside, vals, tokens)
    mask = ((t >= offset_n[:, None]) & (t < (offset_n + total_n)[:, None])).astype(jnp.int32)
    return tokens, mask


def assemble(spec: JudgeSpec, sources: dict[str, SlotSource]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Judge rows [lit0, slot0, lit1, ..., litN], LEFT-padded to max_len (`row_pieces`, `lay_out`).
    Returns tokens (N, max_len) int32, mask (N, max_len) int32, truncated (N,) bool."""
    pieces, truncated = row_pieces(spec, sources)
    tokens, mask = lay_out(pieces, spec.max_len, spec.pad_id, left_padded=True)
    return tokens, mask, truncated


# ================================================================================================ shared prompts
def prompt_slots(spec: JudgeSpec) -> int:
    """How many of the template's slots come before the first one a sample fills ({response}, {response_b}): the
    row up to there is the prompt's part (literals, prompt, principle, reference, the query's criterion), the
    same in the rows of one prompt's samples unless truncation cuts them differently."""
    return next(i for i, slot in enumerate(spec.slots)
                if {"response", "response_b"} & set(spec.slot_inputs(slot)))


def split_rows(spec: JudgeSpec, sources: dict[str, SlotSource], group: int) -> SharedPromptRows:
    """The rows of `assemble` split where the first slot a sample fills starts (`prompt_slots`): the prompt's part
    LEFT-padded (as the policy's prompts), the rest (response, template suffix) right-padded, each as wide as its
    pieces can be (at most max_len), for the forward that runs the prompt's part once per group of `group`
    rows (`scoring.judge_last_hidden`). Truncation and the tokens are `assemble`'s: each row's pieces, cut
    alike, placed side by side."""
    pieces, _ = row_pieces(spec, sources)
    # The index of the first piece after the prompt's part: lit0 (unless empty), then slot i and lit i + 1 each.
    first = bool(spec.literal_ids[0]) + sum(1 + bool(lit) for lit in spec.literal_ids[1:prompt_slots(spec) + 1])
    width = lambda ps: min(spec.max_len, sum(p[0].shape[-1] for p in ps))  # noqa: E731  static bound of a row
    prefix_tokens, prefix_mask = lay_out(pieces[:first], width(pieces[:first]), spec.pad_id, left_padded=True)
    tokens, mask = lay_out(pieces[first:], width(pieces[first:]), spec.pad_id, left_padded=False)
    return SharedPromptRows(prefix_tokens, prefix_mask, tokens, mask, group)


def rationale_key(rng: jax.Array) -> jax.Array:
    """The key of a judging call's rationales (chain of thought), from the call's key: folded in, so the
    principles drawn with the call's key itself are those of a judge without chain of thought."""
    return jax.random.fold_in(rng, 1)


def score(judge_params, judge_cfg: ModelConfig, spec: JudgeSpec, prompts_bp: jax.Array, prompt_mask_bp: jax.Array,
          responses_br: jax.Array, response_mask_br: jax.Array, rng: jax.Array, *, rows_per_prompt: int = 1,
          share_prompt: bool = False, responses_b_br: jax.Array | None = None,
          response_b_mask_br: jax.Array | None = None, references_bf: jax.Array | None = None,
          reference_mask_bf: jax.Array | None = None) -> tuple[jax.Array, JudgeMetrics]:
    """Token-space judging, jittable (`judge_cfg`, `spec`, `rows_per_prompt`, `share_prompt` static): scores_b
    and metrics.

    prompts_bp left-padded with prompt_mask_bp; responses_br with response_mask_br = 1 up to and including the
    first stop token. Pairwise: scores_b = P(responses_br better than responses_b_br). rng picks principles, one
    per prompt: rows_per_prompt = n when rows b * n .. b * n + n - 1 are the samples of one prompt (a rollout);
    with chain of thought, `rationale_key(rng)` samples the rationales.

    share_prompt (config.compute.share_prompt_forward): the judge forward runs the prompt's part of each group's
    rows once (`split_rows`), where the groups split over the batch's devices (`tfm.prompt_sharing`), the template
    has a slot before the samples' (`prompt_slots`), and without chain of thought (its rationale is sampled after
    the whole rows). Same scores as the whole rows' forward, up to float rounding.
    """
    if spec.path != "token_space":
        raise ValueError("this JudgeSpec uses the host path (the tokenizers differ); call score_host")
    principle_index_b = sample_principles(spec, rng, prompts_bp.shape[0], rows_per_prompt)
    sources = query_sources(spec, prompts_bp, prompt_mask_bp, responses_br, response_mask_br, principle_index_b,
                            responses_b_br, response_b_mask_br, references_bf, reference_mask_bf)
    tokens, mask, truncated = assemble(spec, sources)
    shared = None
    if share_prompt and spec.reasoning is None and prompt_slots(spec) > 0:
        # Query-major rows (q * B + b) with b = prompt * n + sample: groups of n consecutive rows share a prompt.
        group = tfm.prompt_sharing(rows_per_prompt, tokens.shape[0] // judge_cfg.forward_microbatches)
        shared = split_rows(spec, sources, group) if group > 1 else None
    return score_queries(judge_params, judge_cfg, spec, tokens, mask, truncated, principle_index_b,
                         rationale_key(rng), shared)


score_jit = jax.jit(score, static_argnums=(1, 2), static_argnames=("rows_per_prompt", "share_prompt"))
