"""Held-out evaluation during training: the `Evaluator` that `train.run` calls every `config.eval.every` steps.

On a fixed set of held-out prompts (the first `eval.max_prompts`, sampled with the same key every time, so curves
compare like with like) it measures, per example, then averages into `eval/...` metrics:
  judge_score         the reward judge's score (and each rubric criterion's P(yes)); a pairwise reward judge
                      scores P(current policy beats its baseline), both presentation orders: the data's reference
                      response with reward.pairwise_baseline="dataset_reference", else the initial policy's
                      response (the reference_sample baseline, and online_dpo's judge). A judge ensemble
                      (config.judge.ensemble_paths): the aggregate the reward uses, and judge_member_{k}_score,
                      judge_ensemble_std (the members' population std); criteria and position agreement are
                      member 0's (judge.path's), the win rate the members' mean
  win_rate            a pairwise judge's P(current policy beats the initial policy), both presentation orders
  position_agreement  how often both orders agree
  kl                  sum over the response of the k1 estimate log pi - log pi_ref (sampled from pi: unbiased)
  response_length     response tokens
  gt/...              the task's ground-truth grader (`eval.ground_truth`), which the reward never sees
  judge_gt_auc/...    the judge under optimisation: for each binary ground-truth metric, the ROC AUC of the reward
                      judge's score on the current policy's own samples, and (judge_gt_accuracy/..., pointwise,
                      principles and rubric judges, thresholded at the middle of their scale) its accuracy; a
                      falling AUC says the policy has drifted to where the judge no longer tells pass from fail
  evaluator_...       with config.eval.evaluator: win rate (interval, length-controlled), position agreement and
                      harmless rate by an evaluator model that is not the reward (`independent_eval`)
and writes the first `eval.num_samples_logged` (prompt, response, scores) rows to the run's samples. The per-example
pass is `Evaluator.score_samples` (`Scored`); the over-optimisation measurement (`overoptimisation.sample_policy`)
ranks its samples for best-of-n.
Rows are prompt-major (prompt * n + sample), like the rollout's. Both judges (the reward judge and the pairwise
one of the win rate) score on their spec's path, token space or host (`judging.score_outside_jit`), as
`judging.make_spec` decided for the run; the policy's KL and lengths are one jitted program.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax import builder
from rlaif_jax import data as data_lib
from rlaif_jax import hooks, independent_eval, judging, ops, stats
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts

METRIC_NAMES = {"score": "judge_score", "win": "win_rate", "kl": "kl", "length": "response_length",
                "position_agree": "position_agreement"}


# The middle of a judge's score scale: its pass / fail threshold for the accuracy against a binary ground truth.
# Pairwise (P(beats a baseline)), reward-model and remote scores have no pass / fail scale: AUC only.
ACCURACY_THRESHOLDS = {"pointwise": 0.0, "principles": 0.0, "rubric": 0.5}


def judge_agreement(scores: np.ndarray, ground_truth: dict[str, np.ndarray], mode: str) -> dict[str, float]:
    """ROC AUC (and accuracy, see ACCURACY_THRESHOLDS) of the judge's scores against each binary ground-truth
    metric that has both classes, keyed "judge_gt_auc/<metric>" and "judge_gt_accuracy/<metric>"."""
    out = {}
    for name, values in ground_truth.items():
        values = np.asarray(values, np.float64)
        if not np.isin(values, (0.0, 1.0)).all() or values.min() == values.max():
            continue
        out[f"judge_gt_auc/{name}"] = stats.roc_auc(scores, values == 1.0)
        if mode in ACCURACY_THRESHOLDS:
            out[f"judge_gt_accuracy/{name}"] = float(np.mean((scores > ACCURACY_THRESHOLDS[mode]) == (values == 1.0)))
    return out


class Scored(NamedTuple):
    """What `Evaluator.score_samples` returns: per example, valid rows only, prompt-major (row = prompt * n + sample
    with n = eval.samples_per_prompt)."""
    values: dict[str, np.ndarray]  # "score" (the reward judge's), "kl", "length", "win", "position_agree",
    #                                "criterion/<name>" (rubric P(yes)), "gt/<name>" (the ground truth's)
    prompts: list[str]
    responses: list[str]

    def rows(self, limit: int, criterion_names) -> list[dict]:
        """The first `limit` examples as the run's samples rows: prompt, response, judge score, criteria, gt/*."""
        out = []
        for b in range(min(limit, len(self.prompts))):
            row = {"prompt": self.prompts[b], "response": self.responses[b],
                   "judge_score": float(self.values["score"][b])}
            if criterion_names and f"criterion/{criterion_names[0]}" in self.values:
                row["criteria"] = {n: float(self.values[f"criterion/{n}"][b]) for n in criterion_names}
            row.update({k: float(v[b]) for k, v in self.values.items() if k.startswith("gt/")})
            out.append(row)
        return out


class Evaluator:
    """Held-out evaluation: judge score (and criteria), win rate against the initial policy judged pairwise in
    both orders, KL to the reference, response length, and the task's ground truth. Responses of the initial
    policy are sampled once (fixed key) and reused at every evaluation."""

    def __init__(self, c: ml_collections.ConfigDict, parts: builder.RunParts,
                 loader: data_lib.PromptLoader | None, mesh: jax.sharding.Mesh):
        self.c, self.parts, self.mesh = c, parts, mesh
        self.batches = []
        if loader is not None and c.eval.every:
            n = -(-c.eval.max_prompts // c.train.batch_size)
            for _, b in zip(range(n), loader):
                self.batches.append(b)
        self.initial = [None] * len(self.batches)
        self.ground_truth = (hooks.load_function(c.eval.ground_truth, "config.eval.ground_truth")
                             if c.eval.ground_truth else None)
        sampling = dataclasses.replace(parts.sampling, n_samples=c.eval.samples_per_prompt)
        pair_cfg = ml_collections.ConfigDict(c.judge.to_dict())
        pair_cfg.mode, pair_cfg.template = "pairwise", c.eval.pairwise_template
        self.remote = (judging.remote.RemoteJudge(c.judge, lambda p, r: judging.spec.render(parts.judge_spec, {
            "prompt": p, "response": r})) if parts.judge_spec.mode == "remote" else None)
        self.pair_spec = (judging.make_spec(pair_cfg, parts.judge_tokenizer, parts.policy_tokenizer,
                                            sampling.stop_ids or None)
                          if c.eval.win_rate and parts.judge_spec.mode != "reward_model" else None)
        models, temperature = parts.models, c.rollout.temperature

        def sample(params, prompts, mask, key):
            return rollout_lib.rollout(params, models.policy, prompts, mask, key, sampling)

        def policy_stats(policy, reference, roll):
            args = (roll.prompt_tokens_bp, roll.prompt_mask_bp, roll.response_tokens_br)
            rmask = roll.response_mask_br.astype(jnp.float32)
            logp, _, _ = ts.response_logprobs(policy, models.policy, *args, rmask, temperature)
            ref, _, _ = ts.response_logprobs(reference, models.policy, *args, rmask, temperature)
            return {"kl": ops.masked_sum(ops.kl_estimate("k1", logp, ref), rmask, axis=1), "length": rmask.sum(1)}

        self._sample = jax.jit(sample)
        self._policy_stats = jax.jit(policy_stats)

        # An evaluator that is not the reward (config.eval.evaluator): loaded once, its own sampling settings.
        e, self.independent, self.independent_baseline = c.eval.evaluator, None, None
        if e.path and self.batches:
            stop_ids = parts.sampling.stop_ids
            evaluators = independent_eval.load_evaluators(e, parts.policy_tokenizer, stop_ids, mesh)
            self.independent = independent_eval.PairwiseEvaluation(e, evaluators, parts.policy_tokenizer, stop_ids,
                                                                   mesh, parts.sampling.cache_phases)
            if e.baseline not in independent_eval.BASELINES:  # another saved policy
                self.independent_baseline = independent_eval.load_policy(
                    e.baseline, "config.eval.evaluator.baseline", mesh, None, c.policy.dtype, parts.policy_tokenizer)[0]

    def _judge(self, frozen: ts.Frozen, roll: rollout_lib.Rollout, initial: rollout_lib.Rollout | None,
               references: tuple, texts: tuple[list[str], list[str]], key: jax.Array) -> dict:
        """The reward judge's scores (and criteria) and the win rate against the initial policy's responses,
        each on its spec's path (token space or host, as `judging.make_spec` decided). `references`: the batch's
        (reference_bf, reference_mask_bf), or () without config.data.reference_field; `texts`: the whole batch's
        (prompts, responses) as text, which a remote judge scores at its endpoint; `initial`: None when neither the
        win rate nor a pairwise reward judge compares with the initial policy."""
        k_score, k_pair = jax.random.split(key)
        parts, n = self.parts, self.c.eval.samples_per_prompt
        if self.remote is not None:
            return {"score": self.remote.score(*texts)[0], "criteria": None}
        repeated = [jnp.repeat(x, n, axis=0) for x in references]  # prompt-major rows, as the rollout's

        members = ts.judge_members(parts.models, frozen.judge, frozen.extra_judges)

        def judge(spec, rng, how, **kwargs):  # every judge of an ensemble, their scores aggregated `how`
            if "reference" in spec.slots:
                kwargs.update(references_bf=repeated[0], reference_mask_bf=repeated[1])
            score_fn = judging.ensemble.combine([functools.partial(
                judging.score_outside_jit, params, cfg, spec, parts.policy_tokenizer, parts.judge_tokenizer)
                for params, cfg in members], how, self.c.judge.ensemble_std_coef)
            return score_fn(roll.prompt_tokens_bp, roll.prompt_mask_bp, roll.response_tokens_br, roll.response_mask_br,
                            rng, rows_per_prompt=n, **kwargs)

        against_initial = ({} if initial is None else
                           dict(responses_b_br=initial.response_tokens_br, response_b_mask_br=initial.response_mask_br))
        # A pairwise reward judge scores the current policy's response against its baseline (see the docstring).
        baseline = {}
        if parts.judge_spec.mode == "pairwise":
            baseline = (dict(responses_b_br=repeated[0], response_b_mask_br=repeated[1])
                        if self.c.reward.pairwise_baseline == "dataset_reference" else against_initial)
        scores, jm = judge(parts.judge_spec, k_score, self.c.judge.ensemble_aggregate, **baseline)
        out = {"score": scores, "criteria": jm.criterion_p_yes_bc}
        if jm.member_scores_kb is not None:  # an ensemble: each judge's score and their disagreement
            out.update({f"judge_member_{k}_score": s for k, s in enumerate(jm.member_scores_kb)})
            out["judge_ensemble_std"] = jnp.std(jm.member_scores_kb, axis=0)
        if self.pair_spec is not None:  # an ensemble's win rate: its judges' mean P(win)
            out["win"], pm = judge(self.pair_spec, k_pair, "mean", **against_initial)
            out["position_agree"] = pm.position_agree_b
        return out

    def independent_metrics(self, state: ts.TrainState, frozen: ts.Frozen) -> dict[str, float]:
        """eval/evaluator_*: the current policy against config.eval.evaluator.baseline, judged by the evaluator."""
        e, cfg = self.c.eval.evaluator, self.parts.models.policy
        baseline = {"initial_policy": independent_eval.Policy(frozen.reference, cfg),
                    "reference": "reference"}.get(e.baseline, self.independent_baseline)
        policy = ts.trained_policy(self.c, state.params, frozen)
        per_prompt = self.independent.compare(independent_eval.Policy(policy, cfg), baseline,
                                              self.batches, jax.random.key(self.c.seed + 2), e.baseline)
        return {f"eval/evaluator_{k}": v for k, v in independent_eval.summarize(per_prompt, self.c.seed).items()}

    def score_samples(self, policy, frozen: ts.Frozen, key: jax.Array) -> Scored:
        """Samples `eval.samples_per_prompt` responses to every held-out prompt from `policy` (params), judges them
        with the reward judge (and the win rate's pairwise judge), takes their KL to the reference and grades them
        with the ground truth: per example, valid rows only, prompt-major. The sampler, the judge's path and the
        grader are the training run's; `evaluate` averages this, scripts/overoptimisation.py ranks it."""
        tokenizer, criterion_names = self.parts.policy_tokenizer, self.parts.judge_spec.criterion_names
        per_example: dict[str, list] = {}
        all_prompts, all_responses = [], []
        for i, batch in enumerate(self.batches):
            k_init, k_roll, k_judge = jax.random.split(jax.random.fold_in(key, i), 3)
            tokens, mask = data_lib.to_global((batch.tokens_bp, batch.mask_bp), shd.batch_sharding(self.mesh, 1))
            references = () if batch.reference_bf is None else data_lib.to_global(
                (batch.reference_bf, batch.reference_mask_bf), shd.batch_sharding(self.mesh, 1))
            # The initial policy's responses: the win rate's and a pairwise reward judge's baseline (else not drawn).
            if self.initial[i] is None and (self.pair_spec is not None or self.parts.judge_spec.mode == "pairwise"):
                self.initial[i] = self._sample(frozen.reference, tokens, mask, k_init)
            roll = self._sample(policy, tokens, mask, k_roll)
            # Every process sees the whole evaluation batch on the host (the arrays span all processes).
            prompt_tokens, response_tokens, response_mask = map(shd.gather_to_host, (
                roll.prompt_tokens_bp, roll.response_tokens_br, roll.response_mask_br))
            prompts = tokenizer.batch_decode(prompt_tokens, skip_special_tokens=True)
            responses = [tokenizer.decode(t[m > 0], skip_special_tokens=True)
                         for t, m in zip(response_tokens, response_mask)]
            out = jax.tree.map(shd.gather_to_host, {
                **self._judge(frozen, roll, self.initial[i], references, (prompts, responses), k_judge),
                **self._policy_stats(policy, frozen.reference, roll)})
            valid = np.repeat(shd.gather_to_host(np.asarray(batch.valid_b)) > 0, self.c.eval.samples_per_prompt)
            stopped = shd.gather_to_host(roll.stopped_b)
            gt = self.ground_truth(prompts, responses, stopped) if self.ground_truth else {}
            for name, values in {**{k: v for k, v in out.items() if k != "criteria" and v is not None},
                                 **{f"gt/{k}": np.asarray(v) for k, v in gt.items()}}.items():
                per_example.setdefault(name, []).extend(np.asarray(values)[valid].tolist())
            if out.get("criteria") is not None:
                for j, name in enumerate(criterion_names):
                    per_example.setdefault(f"criterion/{name}", []).extend(out["criteria"][valid, j].tolist())
            all_prompts += [p for p, v in zip(prompts, valid) if v]
            all_responses += [r for r, v in zip(responses, valid) if v]
        return Scored({k: np.asarray(v) for k, v in per_example.items()}, all_prompts, all_responses)

    def evaluate(self, state: ts.TrainState, frozen: ts.Frozen, step: int, writer) -> dict[str, float]:
        if not self.batches:
            return {}
        key = jax.random.key(self.c.seed + 1)  # the same eval key every time: curves compare like with like
        policy = ts.trained_policy(self.c, state.params, frozen)  # with LoRA: the merged weights, once
        scored = self.score_samples(policy, frozen, key)
        writer.write_samples(step, scored.rows(self.c.eval.num_samples_logged, self.parts.judge_spec.criterion_names))
        per_example = scored.values
        agreement = judge_agreement(per_example["score"], {
            k[len("gt/"):]: v for k, v in per_example.items() if k.startswith("gt/")},
            self.parts.judge_spec.mode)
        independent = self.independent_metrics(state, frozen) if self.independent is not None else {}
        return {**{f"eval/{METRIC_NAMES.get(k, k)}": float(np.mean(v)) for k, v in per_example.items()},
                **{f"eval/{k}": v for k, v in agreement.items()}, **independent}
