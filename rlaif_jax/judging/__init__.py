"""The LLM judge: prompt templates assembled in token space, five scoring modes, position debiasing.

The judge is any model `rlaif_jax.models` loads (its own family and size), on the same mesh, params frozen.
Its prompt is a text template from `config.judge` with slots

    {prompt} {response}            always available ({response} is required)
    {response_b}                   pairwise: the second response (online_dpo: another sample of the prompt; a
                                   pairwise reward: the baseline, `reward.pairwise_baseline`)
    {reference}                    the data's reference response (`config.data.reference_field`)
    {principle}                    one principle per prompt (shared by its n samples), sampled from
                                   `config.judge.principles` (`sample_principles`)
    {criterion}                    rubric: the yes/no question of each criterion

Two ways to turn (prompt, response) tokens into judge inputs (`JudgeSpec.path`, decided by `choose_path`):

  token_space  judge and policy share a tokenizer. The template's literal pieces are tokenised once at start-up;
               inside jit every judge row is assembled as [lit0, slot0, lit1, slot1, ..., litN] by index
               arithmetic, LEFT-padded to `max_len` so the judge's answer is read at position -1 (`score`).
  host         the tokenizers differ: decode with the policy tokenizer, render the template as text, tokenise
               with the judge's tokenizer, pad, then run the same jitted judge forward and scoring
               (`score_host`). Both paths produce the same rows when the tokenizers are the same and the
               template's slot boundaries are whitespace (tested).
Callers outside jit (the evaluation) take the spec's path through `score_outside_jit`; the train step compiles
the path's programs (`train_step`), plan mode lowers them.

One judge forward scores a whole batch: the queries of every example are stacked on the batch axis,
query-major (row n = q * B + b): pairwise asks both orders (a, b) and (b, a), rubric asks one question per
criterion. Modes: pointwise (rescaled expected score), principles (pointwise under a principle sampled per
prompt), pairwise (debiased P(first better)), rubric (weighted P(yes)), reward_model (a value head, `reward_model`),
remote (an HTTP endpoint instead of a local model, `remote.py`; the step's host path calls it).
An ensemble (config.judge.ensemble_paths) asks several judges the same question and aggregates their scores
(`ensemble.py`: mean, min, mean minus k std).

Where each piece lives:
  spec.py      config defaults, the per-mode table `MODES` (template, slots, answer tokens, checks, queries),
               validation, `JudgeSpec` / `make_spec`, the token_space-or-host decision
  assembly.py  token space: slot sources, truncation (`kept_lengths`), row assembly, the rows split for the
               shared-prompt forward (`split_rows`), `score`
  scoring.py   each mode's arithmetic, `SCORERS`, the judge forward and `JudgeMetrics` (both paths)
  host.py      the host path and text judging: `encode_texts`, `encode_queries`, `score_texts`, `score_host`, `score_outside_jit`,
               reward-model rows of text responses and preference pairs (`encode_responses`, `encode_pairs`)
  reasoning.py chain of thought (config.judge.cot): the judge's rationale, sampled with our sampler, before its
               answer (`scoring.score_queries` runs it on both paths)
  loading.py   `Judge`, `load_judge`, `load_ensemble`
  ensemble.py  the ensemble's aggregation of its members' scores (`aggregate`, `combine`) and its settings' checks
  remote.py    the remote judge's client (chat completions or a JSON reward API, retries, neutral fallback)
To add a mode: an entry in spec.MODES and its scorer in scoring.SCORERS (only a new kind of slot would also
need assembly.py and host.py to fill it).
"""
from rlaif_jax.judging import ensemble
from rlaif_jax.judging.assembly import sample_principles, score, score_jit
from rlaif_jax.judging.host import (encode_pairs, encode_queries, encode_responses, encode_texts,
                                   score_host, score_outside_jit, score_texts)
from rlaif_jax.judging.loading import Judge, load_ensemble, load_judge
from rlaif_jax.judging.scoring import JudgeMetrics, score_queries_jit
from rlaif_jax.judging.spec import (MODES, JudgeSpec, choose_path, default_config, make_spec, remote_spec,
                                    tokenizers_match, validate_config)

__all__ = [
    "MODES", "Judge", "JudgeMetrics", "JudgeSpec", "choose_path", "default_config", "encode_pairs", "encode_queries",
    "encode_responses", "encode_texts", "ensemble", "load_ensemble", "load_judge", "make_spec", "remote_spec",
    "sample_principles", "score", "score_host", "score_jit", "score_outside_jit", "score_queries_jit", "score_texts",
    "tokenizers_match", "validate_config",
]
