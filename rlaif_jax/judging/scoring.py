"""Scoring: one judge forward over all query rows, then each mode's arithmetic (shared by both paths).

The arithmetic of each mode is a pure function of the judge's last-position logits (testable without a model):
  pointwise    score = rescale(sum_k k P(k)), P renormalised over the K score tokens, rescaled to [-1, 1]
  principles   pointwise with a {principle} sampled per prompt (Constitutional-AI style)
  pairwise     P(first better) averaged over both presentation orders (cancels position bias)
  rubric       score = sum_c w_c P_c(yes), P(yes) = p_yes / (p_yes + p_no) per criterion
  reward_model a scalar value head on the judge's final hidden state at the last position (`reward_model`)
When the judge's probability mass on the valid tokens of a query falls below `neutral_threshold`, that query
gets the neutral value (the mode's midpoint) and is counted.

`SCORERS` maps each mode of `spec.MODES` to its scorer: the judge's final hidden states at the last token of the
query rows (N = Q * B, query-major, laid out as the mode's `spec.Query`s say; `judge_last_hidden`, which runs the
prompt's part of a group's rows once where `assembly.split_rows` split them) -> `ModeScores`. Shapes: N rows,
B examples, Q queries per example, V vocab, D hidden.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp

from rlaif_jax import reward_model
from rlaif_jax.judging import reasoning
from rlaif_jax.judging.spec import JudgeSpec
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig
from rlaif_jax.sharding import constrain


# ================================================================================================ arithmetic
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
    contributes 1/2.

    `agree`: both orders are decided (neither neutral) and prefer the same response strictly (s_ab * s_ba < 0).
    A neutral order counts as disagreement, over all examples, rather than being left out of the count: it states
    no preference, so it cannot confirm the other order's, and leaving it out would let a judge that abstains on
    its hard cases score a higher agreement (how often it abstains is `neutral_count`). Two neutral orders give
    s_ab = s_ba = 0, which the sign test alone would call agreement.
    Returns p_n, mass_n2, neutral_n2, agree_n, p_orders_n2 (P(a better) per order).
    """
    s_ab, mass_ab, neutral_ab = binary_preference(logits_ab_nv, option_ids, neutral_threshold)
    s_ba, mass_ba, neutral_ba = binary_preference(logits_ba_nv, option_ids, neutral_threshold)
    p = 0.5 + 0.25 * (s_ab - s_ba)
    agree = ~neutral_ab & ~neutral_ba & (s_ab * s_ba < 0)
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


# ================================================================================================ judge forward
def lm_head_logits(params, cfg: ModelConfig, hidden_nd: jax.Array) -> jax.Array:
    """Vocabulary logits (N, V) float32 of final hidden states (N, D), as tfm's forward projects them."""
    return constrain(tfm.unembed(params, cfg, hidden_nd), ("batch", "vocab"))


@flax.struct.dataclass
class SharedPromptRows:
    """The judge rows split where the samples' part starts (`assembly.split_rows`), for a forward that runs the
    prompt's part once per `group` consecutive rows (the samples of one prompt, in one query)."""
    prefix_tokens_np: jax.Array  # (N, P) each row's prompt part, LEFT-padded
    prefix_mask_np: jax.Array
    tokens_nt: jax.Array  # (N, T) the rest of the row (response, template suffix), right-padded
    mask_nt: jax.Array
    group: int = flax.struct.field(pytree_node=False)


def judge_last_hidden(params, cfg: ModelConfig, tokens_nt: jax.Array, mask_nt: jax.Array,
                      shared: SharedPromptRows | None = None) -> jax.Array:
    """`tfm.last_hidden` of the frozen judge (no gradient flows into its params): its final hidden state (N, D) at
    the last token of each row (LEFT-padded, the answer read at position -1).

    With `shared` (the same rows split), each micro-batch whose groups hold one prompt part in all their rows runs
    it once per group (`tfm.last_hidden_shared_prefix`). A micro-batch where a group's prompt parts differ runs its
    whole rows: under truncation="prompt_left" a row's prompt is cut by its own responses' lengths, and a prompt
    cut otherwise has other states, so sharing it would not be exact."""
    params = jax.lax.stop_gradient(params)
    if shared is None:
        return tfm.last_hidden(params, cfg, tokens_nt, mask_nt)
    n = shared.group

    def rows(tokens, mask, prefix_tokens, prefix_mask, cont_tokens, cont_mask):  # one micro-batch, whole groups
        def one_per_group(x):
            x = x.reshape(-1, n, x.shape[-1])
            return jnp.all(x == x[:, :1])

        return jax.lax.cond(
            one_per_group(prefix_tokens) & one_per_group(prefix_mask),
            lambda: tfm.last_hidden_shared_prefix(params, cfg, prefix_tokens[::n], prefix_mask[::n], cont_tokens,
                                                  cont_mask),
            lambda: tfm.last_hidden_rows(params, cfg, tokens, mask))

    return tfm.map_microbatches(rows, cfg.forward_microbatches, tokens_nt, mask_nt, shared.prefix_tokens_np,
                                shared.prefix_mask_np, shared.tokens_nt, shared.mask_nt, group=n)


# ================================================================================================ modes
class ModeScores(NamedTuple):
    """A mode's scores of B examples from their query rows."""
    scores_b: jax.Array
    mass_qb: jax.Array  # the judge's mass on the answer tokens per query (reward_model: 1)
    neutral_qb: jax.Array  # bool: the query fell back to the neutral value
    extra: dict[str, jax.Array]  # the mode's own fields of JudgeMetrics


def score_pointwise(params, cfg: ModelConfig, spec: JudgeSpec, hidden_nd: jax.Array) -> ModeScores:
    """pointwise / principles: one query per example, the rescaled expected score."""
    scores, mass_b, neutral_b = pointwise_scores(lm_head_logits(params, cfg, hidden_nd), spec.score_ids,
                                                 spec.neutral_threshold, spec.neutral_score)
    return ModeScores(scores, mass_b[None], neutral_b[None], {})


def score_pairwise(params, cfg: ModelConfig, spec: JudgeSpec, hidden_nd: jax.Array) -> ModeScores:
    """pairwise: rows [0, B) ask order (a, b), rows [B, 2B) order (b, a) (the mode's two queries)."""
    logits_nv = lm_head_logits(params, cfg, hidden_nd)
    B = logits_nv.shape[0] // 2
    scores, mass_b2, neutral_b2, agree, p_orders = pairwise_preference(
        logits_nv[:B], logits_nv[B:], spec.score_ids, spec.neutral_threshold)
    return ModeScores(scores, mass_b2.T, neutral_b2.T, dict(position_agree_b=agree, p_orders_b2=p_orders))


def score_rubric(params, cfg: ModelConfig, spec: JudgeSpec, hidden_nd: jax.Array) -> ModeScores:
    """rubric: query c asks criterion c; the weighted sum of the P(yes)."""
    Q = spec.queries_per_example
    B = hidden_nd.shape[0] // Q
    p_yes, mass, neutral = yes_probability(lm_head_logits(params, cfg, hidden_nd), spec.score_ids,
                                           spec.neutral_threshold)
    p_yes_bc = p_yes.reshape(Q, B).T
    return ModeScores(rubric_score(p_yes_bc, spec.criterion_weights), mass.reshape(Q, B), neutral.reshape(Q, B),
                      dict(criterion_p_yes_bc=p_yes_bc))


def score_reward_model(params: reward_model.RewardModelParams, cfg: ModelConfig, spec: JudgeSpec,
                       hidden_nd: jax.Array) -> ModeScores:
    """reward_model: the frozen reward model's value of each row (no answer tokens, never neutral)."""
    scores = reward_model.head_values(params, hidden_nd)
    B = scores.shape[0]
    return ModeScores(scores, jnp.ones((1, B), jnp.float32), jnp.zeros((1, B), bool), {})


SCORERS: dict[str, Callable[..., ModeScores]] = {
    "pointwise": score_pointwise,
    "principles": score_pointwise,
    "pairwise": score_pairwise,
    "rubric": score_rubric,
    "reward_model": score_reward_model,
}


# ================================================================================================ metrics + dispatch
@flax.struct.dataclass
class JudgeMetrics:
    """Per-example diagnostics of one judging call (reduce with `summary`)."""
    valid_mass_b: jax.Array  # mean over the example's queries of the judge's mass on the valid tokens (RM: 1)
    neutral_count_b: jax.Array  # int32: the example's queries that fell back to the neutral value
    truncated_b: jax.Array  # bool: some judge row of the example was cut to max_len
    position_agree_b: jax.Array | None = None  # pairwise: both orders decided and prefer the same response
    p_orders_b2: jax.Array | None = None  # pairwise: P(a better) from order (a, b) alone, from (b, a) alone
    criterion_p_yes_bc: jax.Array | None = None  # rubric: P(yes) per criterion
    principle_index_b: jax.Array | None = None  # which principle judged the example
    # Chain of thought: each judge row's rationale tokens (N, R) (query-major rows), 1 on its tokens, and the mean
    # rationale length over the example's queries.
    rationale_nr: jax.Array | None = None
    rationale_mask_nr: jax.Array | None = None
    rationale_length_b: jax.Array | None = None
    # An ensemble (`ensemble.combine`): every member's score (K, B), member 0 = judge.path's, whose diagnostics the
    # fields above are.
    member_scores_kb: jax.Array | None = None

    def summary(self, spec: JudgeSpec) -> dict[str, jax.Array]:
        """Scalars for logging (jittable): means, counts, and each rubric criterion on its own."""
        out = {
            "judge/valid_mass": jnp.mean(self.valid_mass_b),
            "judge/neutral_count": jnp.sum(self.neutral_count_b),
            "judge/truncated_count": jnp.sum(self.truncated_b.astype(jnp.int32)),
        }
        if self.position_agree_b is not None:
            out["judge/position_agreement"] = jnp.mean(self.position_agree_b.astype(jnp.float32))
        if self.rationale_length_b is not None:
            out["judge/rationale_length"] = jnp.mean(self.rationale_length_b)
        if self.criterion_p_yes_bc is not None:
            for c, name in enumerate(spec.criterion_names):
                out[f"judge/criterion/{name}"] = jnp.mean(self.criterion_p_yes_bc[:, c])
        if self.member_scores_kb is not None:
            for k in range(self.member_scores_kb.shape[0]):
                out[f"judge/member_{k}_score"] = jnp.mean(self.member_scores_kb[k])
            # The members' disagreement: their population std per example, averaged over the examples.
            out["judge/ensemble_std"] = jnp.mean(jnp.std(self.member_scores_kb, axis=0))
        return out


def score_queries(judge_params: Any, judge_cfg: ModelConfig, spec: JudgeSpec, tokens_nt: jax.Array,
                  mask_nt: jax.Array, truncated_n: jax.Array, principle_index_b: jax.Array | None = None,
                  key: jax.Array | None = None, shared: SharedPromptRows | None = None
                  ) -> tuple[jax.Array, JudgeMetrics]:
    """One judge forward over all query rows (query-major), then the mode's scoring. Shared by both paths.
    With chain of thought (`spec.reasoning`) the judge first writes a rationale after each row (`reasoning.reason`,
    sampled with `key`) and the forward reads the answer after it. `shared`: the same rows split for the forward
    that runs each group's prompt part once (`judge_last_hidden`; token space, not with chain of thought)."""
    Q = spec.queries_per_example
    B = tokens_nt.shape[0] // Q
    rationale = {}
    if spec.reasoning is not None:
        if key is None:
            raise ValueError("a judge with chain of thought samples its rationale: pass key")
        if shared is not None:
            raise ValueError("a judge with chain of thought answers after its rationale: its rows cannot be shared")
        tokens_nt, mask_nt, rationale_nr, rationale_mask_nr = reasoning.reason(
            judge_params, judge_cfg, spec.reasoning, tokens_nt, mask_nt, key)
        rationale = dict(rationale_nr=rationale_nr, rationale_mask_nr=rationale_mask_nr,
                         rationale_length_b=rationale_mask_nr.sum(-1).reshape(Q, B).mean(0, dtype=jnp.float32))
    judge_params = jax.lax.stop_gradient(judge_params)  # frozen
    backbone = judge_params.model if spec.mode == "reward_model" else judge_params
    hidden_nd = judge_last_hidden(backbone, judge_cfg, tokens_nt, mask_nt, shared)
    scored = SCORERS[spec.mode](judge_params, judge_cfg, spec, hidden_nd)
    metrics = JudgeMetrics(valid_mass_b=scored.mass_qb.mean(0),
                           neutral_count_b=scored.neutral_qb.sum(0, dtype=jnp.int32),
                           truncated_b=jnp.any(truncated_n.reshape(Q, B), axis=0),
                           principle_index_b=principle_index_b, **scored.extra, **rationale)
    return scored.scores_b, metrics


# Both paths' judge forward as one compiled function: the host path calls it, plan mode lowers it.
score_queries_jit = jax.jit(score_queries, static_argnums=(1, 2))
