"""Judge ensembles: several judges score the same rows and one aggregate of their scores is the reward.

`config.judge.ensemble_paths` names the judges besides `judge.path` (HF folders; in reward_model mode folders
written by reward_model_stage). Every member is asked the same question with the same spec (mode, template,
criteria, answer tokens, max_len): members may differ in size, not in tokenizer (`loading.load_ensemble` refuses
one whose tokenizer or spec differs from judge.path's). Member 0 is judge.path's judge.

Each member scores the batch on its own (a judge forward per member: memory and time grow with the members), the
scores are stacked (K, B) and `aggregate` turns them into the reward's scores (B,):

  mean             s_b = mean_k s_kb
  min              s_b = min_k s_kb                      worst-case optimisation (WCO, Coste et al. 2023)
  mean_minus_std   s_b = mean_k s_kb - coef * std_k s_kb  (population std, 1/K) the "mean minus std" aggregation
                                                        of Eisenstein et al. 2023 (coef 1); an uncertainty penalty
Coste et al.'s uncertainty-weighted optimisation (UWO) subtracts lambda times the variance, not the std: it is not
one of these. The members share the principle of a prompt (one rng) and, with chain of thought, the rationale key.

Diagnostics (`JudgeMetrics`): mass, neutral counts, criteria, position agreement are member 0's; the ensemble adds
each member's scores (`member_scores_kb`: `judge/member_{k}_score` and `judge/ensemble_std`, the mean over examples
of the members' population std).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

AGGREGATES = ("mean", "min", "mean_minus_std")
DEFAULT_AGGREGATE = "mean"
DEFAULT_STD_COEF = 1.0


def aggregate(scores_kb: jax.Array, how: str, std_coef: float = DEFAULT_STD_COEF) -> jax.Array:
    """The ensemble's score of each example from its K members' scores (K, B) -> (B,), float32:

      mean: mean_k s_kb;  min: min_k s_kb (Coste et al. 2023, WCO);
      mean_minus_std: mean_k s_kb - std_coef * sqrt(mean_k (s_kb - mean_k s_kb)^2) (population std;
                      Eisenstein et al. 2023 with std_coef = 1).
    """
    scores_kb = scores_kb.astype(jnp.float32)
    if how == "mean":
        return jnp.mean(scores_kb, axis=0)
    if how == "min":
        return jnp.min(scores_kb, axis=0)
    if how == "mean_minus_std":
        return jnp.mean(scores_kb, axis=0) - std_coef * jnp.std(scores_kb, axis=0)
    raise ValueError(f"ensemble aggregate {how!r}; use one of {AGGREGATES}")


def combine(member_fns: Sequence[Callable], how: str, std_coef: float = DEFAULT_STD_COEF) -> Callable:
    """One score function from the members' (each `judging.score` / `score_host` / `score_outside_jit` with its
    params and config bound; all called with the same arguments): (aggregate scores_b, member 0's JudgeMetrics with
    `member_scores_kb`). A single member is returned as it is."""
    if len(member_fns) == 1:
        return member_fns[0]

    def score_fn(*args, **kwargs):
        results = [fn(*args, **kwargs) for fn in member_fns]
        scores_kb = jnp.stack([jnp.asarray(scores, jnp.float32) for scores, _ in results])
        return aggregate(scores_kb, how, std_coef), results[0][1].replace(member_scores_kb=scores_kb)

    return score_fn


def check_one_judge(c: ml_collections.ConfigDict, name: str = "config.judge") -> None:
    """Refuses an ensemble in the judge section `name` of a program that asks one judge (labelling, judge_eval,
    the reward-model stage's labeller: `loading.load_judge`)."""
    if c.ensemble_paths:
        raise ValueError(f"{name}.ensemble_paths={tuple(c.ensemble_paths)}: this program asks one judge (an "
                         f"ensemble's reward is scored in RL training); clear {name}.ensemble_paths")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """The ensemble settings of `config.judge` (after the judge's own checks)."""
    paths = c.ensemble_paths
    if isinstance(paths, str) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"config.judge.ensemble_paths={paths!r} must be a tuple of judge folders (non-empty strings)")
    if c.ensemble_aggregate not in AGGREGATES:
        raise ValueError(f"config.judge.ensemble_aggregate={c.ensemble_aggregate!r}; use one of {AGGREGATES}")
    if not paths and c.ensemble_aggregate != DEFAULT_AGGREGATE:
        raise ValueError(f"config.judge.ensemble_aggregate={c.ensemble_aggregate!r} aggregates an ensemble, but "
                         "config.judge.ensemble_paths is empty: name the other judges there, or leave the aggregate "
                         f"at {DEFAULT_AGGREGATE!r}")
    coef = c.ensemble_std_coef
    if not (isinstance(coef, (int, float)) and math.isfinite(coef)):
        raise ValueError(f"config.judge.ensemble_std_coef={coef!r} must be a finite number")
    if c.ensemble_aggregate != "mean_minus_std" and coef != DEFAULT_STD_COEF:
        raise ValueError(f"config.judge.ensemble_std_coef={coef} is read by ensemble_aggregate='mean_minus_std' "
                         f"only, not {c.ensemble_aggregate!r}: set it back to {DEFAULT_STD_COEF} or change the aggregate")
    if c.ensemble_aggregate == "mean_minus_std" and coef <= 0:
        raise ValueError(f"config.judge.ensemble_std_coef={coef} must be > 0 (the penalty on the members' "
                         "disagreement; 0 is ensemble_aggregate='mean')")
    if paths and c.mode == "remote":
        raise ValueError("config.judge.ensemble_paths: a remote judge (mode 'remote') cannot be ensembled with local "
                         "judges; clear ensemble_paths or use a local judge")
