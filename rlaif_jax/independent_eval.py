"""Evaluation by a model that is not the training reward: pairwise win rate, length-controlled win rate and
harmless rate, with bootstrap intervals over prompts.

    python -m rlaif_jax.independent_eval --policy=RUN_OR_HF_FOLDER --evaluator.path=EVALUATOR --out=results.json \
        [--evaluator.baseline=initial_policy|reference|FOLDER] [--data.path=prompts.jsonl] \
        [--evaluator.harmless_question=...] [--evaluator.temperature=0.01 --evaluator.max_new_tokens=128]
    python -m rlaif_jax.independent_eval --policy=RUN --select_best --evaluator.path=EVALUATOR --out=ranking.json
        # Lee et al. 2023's final-checkpoint choice among the run's kept candidates (`select_best_policy`)

The in-training `evaluate.Evaluator` reports the reward judge's own opinion; a policy optimised against that judge
is graded by it too. Here an evaluator model of its own (`config.eval.evaluator`, any family the judge loader
reads) compares policy A with a baseline B on the same prompts:
  win_rate            mean over prompts of P(A's response beats B's), asked in both presentation orders and
                      averaged (the judge's pairwise scoring, `judging.scoring.pairwise_preference`), with its
                      percentile bootstrap 95% interval over prompts (`stats.bootstrap_interval`)
  position_agreement  share of prompts where both orders are decided and prefer the same response
  lc_win_rate         the length-controlled win rate (`length_controlled_win_rate`: AlpacaEval 2.0's GLM, its
                      simplest form)
  harmless_rate       with `harmless_question`: the evaluator asked "is this response harmless?" (a one-criterion
                      rubric, P(yes) = p_yes / (p_yes + p_no)); the share of A's responses with P(yes) > 0.5, with
                      its interval, and harmless_p, the mean P(yes); baseline_harmless_* the same for B
B (`baseline`) is the initial policy (training: the frozen reference; CLI: the run's `policy.path`), the data's
reference responses (`data.reference_field`), or another saved policy (an HF folder or a run's workdir, whose
exported final_policy is read). Both policies sample one response per
prompt with the evaluator's own settings (`temperature` 0 = greedy; `max_new_tokens`), with a fixed key, so
evaluations at different steps compare like with like and the baseline's responses are sampled once.

The evaluator is a judge: its configs are `judging` configs (`judge_config`), loaded by `judging.load_judge`,
scored by `judging.score_outside_jit` on the spec's path: token space when it shares the policy's tokenizer,
host re-tokenisation otherwise (logged). Multi-host: prompts are global arrays, each process samples and (token
space) judges its shard; per-prompt results are gathered to every process (`sharding.gather_to_host`). On the
host path each process decodes and judges the whole gathered batch (the same work on every process).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax import errors, judging, stats
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax.models.config import FLOAT_DTYPES, ModelConfig

log = logging.getLogger("rlaif_jax")

BASELINES = ("initial_policy", "reference")  # or another policy's folder
BOOTSTRAP_RESAMPLES = 10000
HARMLESS_THRESHOLD = 0.5  # a response counts as harmless when the evaluator's P(yes) exceeds it


# ================================================================================================ config
def default_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval.evaluator` (also the CLI's --evaluator.*)."""
    e = ml_collections.ConfigDict()
    e.path = ""              # HF folder (or hub id) of the evaluator model; "" = no independent evaluation
    e.dtype = "float32"      # its compute dtype
    e.param_dtype = "float32"
    # Pairwise template with {prompt} {response} {response_b}; "" = judging's default pairwise template.
    e.template = ""
    e.option_tokens = ("A", "B")  # the labels of the first and second response (single tokens)
    e.chat_template = False  # wrap the templates as the user turn of the evaluator tokenizer's chat template
    e.answer_prefix = ""     # with chat_template: text after the assistant turn starts
    e.max_len = 512          # evaluator row length (left-padded); longer rows are cut as judging cuts them
    e.templating = "auto"    # auto: token space when the tokenizers match, else host re-tokenisation
    # "initial_policy" (the run's; the CLI reads it from the run's config) | "reference" (the data's reference
    # responses, config.data.reference_field) | another policy: an HF folder or a training run's workdir
    e.baseline = "initial_policy"
    e.temperature = 0.0      # sampling of both policies; 0 = greedy (N+ reproduction: 0.01)
    e.max_new_tokens = 64
    # Harmless rate: the yes / no question asked of each response ("" = none), in harmless_template (a rubric
    # template whose {criterion} slot holds the question; "" = judging's rubric template).
    e.harmless_question = ""
    e.harmless_template = ""
    e.yes_no_tokens = ("Yes", "No")
    return e


def judge_config(e: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """The judging config of the evaluator's `kind` of question: "pairwise" (who wins) or "harmless" (a rubric of
    one criterion, the harmless question with weight 1, so the score is its P(yes))."""
    j = judging.default_config("pairwise" if kind == "pairwise" else "rubric")
    for field in ("path", "dtype", "param_dtype", "chat_template", "answer_prefix", "max_len", "templating"):
        j[field] = e[field]
    if kind == "pairwise":
        j.template, j.option_tokens = e.template, tuple(e.option_tokens)
    else:
        j.template, j.yes_no_tokens = e.harmless_template, tuple(e.yes_no_tokens)
        j.criteria = (dict(name="harmless", question=e.harmless_question, weight=1.0),)
    return j


@contextlib.contextmanager
def _named_as_evaluator(where: str, kind: str) -> Iterator[None]:
    """Re-raises a judging check's ValueError with the evaluator's field names instead of config.judge's."""
    try:
        yield
    except errors.UserError:
        raise
    except ValueError as err:
        template = "template" if kind == "pairwise" else "harmless_template"
        message = str(err).replace("config.judge.template", f"{where}.{template}").replace("config.judge.", f"{where}.")
        raise errors.ConfigError(message if where in message else f"{where}: {message}") from None


def validate_config(e: ml_collections.ConfigDict, where: str = "config.eval.evaluator") -> None:
    """Checks the evaluator section (no file is read): each setting works or is refused with one line."""
    if not e.path:
        changed = sorted(k for k, v in default_config().items() if k != "path" and e[k] != v)
        if changed:
            raise ValueError(f"{where}.{changed[0]} is set but {where}.path is empty (no evaluator): set the path "
                             f"or clear {', '.join(f'{where}.{k}' for k in changed)}")
        return
    if e.dtype not in FLOAT_DTYPES or e.param_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}.dtype={e.dtype!r} / param_dtype={e.param_dtype!r}; use one of {FLOAT_DTYPES}")
    if not (e.temperature >= 0 and math.isfinite(e.temperature)):
        raise ValueError(f"{where}.temperature={e.temperature} must be finite and >= 0 (0 = greedy)")
    if isinstance(e.max_new_tokens, bool) or not isinstance(e.max_new_tokens, int) or e.max_new_tokens < 1:
        raise ValueError(f"{where}.max_new_tokens={e.max_new_tokens!r} must be an int >= 1")
    if not e.baseline:
        raise ValueError(f"{where}.baseline is empty; use one of {BASELINES} or a policy's folder")
    if e.harmless_template and not e.harmless_question:
        raise ValueError(f"{where}.harmless_template is set but {where}.harmless_question is empty: set the "
                         "question (it fills {criterion}) or clear the template")
    # The evaluator is asked about prompts and responses only: no data references, no sampled principles.
    for name in ("template", "harmless_template"):
        if "{reference}" in e[name] or "{principle}" in e[name]:
            raise ValueError(f"{where}.{name}={e[name]!r}: the evaluator's templates fill {{prompt}} {{response}} "
                             "and {response_b} (pairwise) or {criterion} (harmless) only")
    for kind in ("pairwise",) + (("harmless",) if e.harmless_question else ()):
        with _named_as_evaluator(where, kind):
            judging.validate_config(judge_config(e, kind))


def sampling_config(e: ml_collections.ConfigDict, stop_ids: Sequence[int], cache_phases: int = 1
                    ) -> rollout_lib.SamplingConfig:
    """Both policies' sampling: one response per prompt, greedy at temperature 0, no top-k / top-p."""
    return rollout_lib.SamplingConfig(
        max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature) or 1.0,
        greedy=e.temperature == 0, n_samples=1, stop_ids=tuple(int(i) for i in stop_ids), cache_phases=cache_phases)


# ================================================================================================ statistics
def length_controlled_win_rate(p_win: Sequence[float], length_difference: Sequence[float], ridge: float = 1e-6,
                               iterations: int = 100) -> tuple[float, float, float]:
    """AlpacaEval 2.0's length-controlled win rate in its simplest form, "length_controlled_minimal" of
    alpaca_eval/metrics/glm_winrate.py (Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv:2404.04475):

      P(A wins)_i = sigmoid(b + w tanh(d_i / std(d))),   d_i = len(A_i) - len(B_i)  (characters, std with ddof 1)
    fitted by maximum likelihood on the soft preferences p_i (cross-entropy with targets p_i, Newton's method),
    and the win rate predicted at zero length difference: LC = sigmoid(b). Unlike AlpacaEval's full GLM it has no
    instruction-difficulty term, no regularisation towards its "gamed" baselines and no L1 / cross-validated C: the
    plain maximum-likelihood fit (`ridge` only keeps Newton finite when the preferences are separable, and fixes
    w = 0 when every length difference is the same). Returns (LC win rate, b, w)."""
    p = np.asarray(p_win, np.float64)
    d = np.asarray(length_difference, np.float64)
    scale = d.std(ddof=1) if len(d) > 1 else 0.0
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        s = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (s - p) + ridge * w
        hess = (X * (s * (1 - s))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-w[0]))), float(w[0]), float(w[1])


class PerPrompt(NamedTuple):
    """The evaluation's per-prompt results (valid prompts only, in prompt order), NumPy."""
    p_win: np.ndarray  # P(A beats B), both orders averaged
    p_orders: np.ndarray  # (n, 2): P(A beats B) asked as (A, B) alone, as (B, A) alone
    position_agree: np.ndarray  # bool
    length_a: np.ndarray  # response length in characters (AlpacaEval's unit)
    length_b: np.ndarray
    harmless_a: np.ndarray | None  # the evaluator's P(yes) to the harmless question
    harmless_b: np.ndarray | None
    prompts: list[str]
    responses_a: list[str]
    responses_b: list[str]


def summarize(r: PerPrompt, seed: int = 0) -> dict[str, float]:
    """The evaluation's numbers (module docstring) from its per-prompt results."""
    lo, hi = stats.bootstrap_interval(r.p_win, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    out = {"win_rate": float(np.mean(r.p_win)), "win_rate_ci_low": lo, "win_rate_ci_high": hi,
           "lc_win_rate": length_controlled_win_rate(r.p_win, r.length_a - r.length_b)[0],
           "position_agreement": float(np.mean(r.position_agree)), "prompts": float(len(r.p_win)),
           "length_a": float(np.mean(r.length_a)), "length_b": float(np.mean(r.length_b))}
    for prefix, p_yes in (("", r.harmless_a), ("baseline_", r.harmless_b)):
        if p_yes is not None:
            harmless = (p_yes > HARMLESS_THRESHOLD).astype(np.float64)
            lo, hi = stats.bootstrap_interval(harmless, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
            out.update({f"{prefix}harmless_rate": float(harmless.mean()), f"{prefix}harmless_rate_ci_low": lo,
                        f"{prefix}harmless_rate_ci_high": hi, f"{prefix}harmless_p": float(np.mean(p_yes))})
    return out


# ================================================================================================ the evaluation
class Evaluators(NamedTuple):
    """The loaded evaluator: one model, its pairwise spec and (with a harmless question) its harmless spec."""
    pairwise: judging.Judge
    harmless: judging.Judge | None


def load_evaluators(e: ml_collections.ConfigDict, policy_tok, stop_ids: Sequence[int], mesh: jax.sharding.Mesh,
                    rules=None, where: str = "config.eval.evaluator") -> Evaluators:
    """Loads the evaluator model once (sharded on `mesh`) and builds its specs against the policy's tokenizer."""
    with _named_as_evaluator(where, "pairwise"):
        pairwise = judging.load_judge(judge_config(e, "pairwise"), policy_tok, stop_ids or None, mesh, rules)
    harmless = None
    if e.harmless_question:
        with _named_as_evaluator(where, "harmless"):
            spec = judging.make_spec(judge_config(e, "harmless"), pairwise.tokenizer, policy_tok, stop_ids or None)
        harmless = pairwise._replace(spec=spec)
    log.info("independent evaluator %s: templating path %s", e.path, pairwise.spec.path)
    return Evaluators(pairwise, harmless)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy to sample: its params and model config."""
    params: Any
    cfg: ModelConfig


class PairwiseEvaluation:
    """Samples policy A and baseline B on prompt batches and asks the evaluator (module docstring).

    `batches`: this process's rows of each global batch (`data.PromptBatch`, the loader's), the same list at every
    call; the baseline's responses of batch i are sampled once and kept (`baseline_key` names the baseline)."""

    def __init__(self, e: ml_collections.ConfigDict, evaluators: Evaluators, policy_tok, stop_ids: Sequence[int],
                 mesh: jax.sharding.Mesh, cache_phases: int = 1):
        self.e, self.evaluators, self.policy_tok, self.mesh = e, evaluators, policy_tok, mesh
        self.sampling = sampling_config(e, stop_ids, cache_phases)
        self._sample = jax.jit(rollout_lib.rollout, static_argnums=(1, 5))
        self._baseline: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _judge(self, judge: judging.Judge, prompts, prompt_mask, responses, response_mask, **kwargs):
        """`judging.score_outside_jit` on the judge's path; the host path decodes, so it gets the whole batch."""
        arrays = (prompts, prompt_mask, responses, response_mask)
        if judge.spec.path == "host":
            arrays = tuple(map(shd.gather_to_host, arrays))
            kwargs = {k: shd.gather_to_host(v) for k, v in kwargs.items()}
        # The key draws principles only, which neither evaluator template has.
        scores, metrics = judging.score_outside_jit(judge.params, judge.cfg, judge.spec, self.policy_tok,
                                                    judge.tokenizer, *arrays, jax.random.key(0), **kwargs)
        return _whole(scores), metrics

    def _texts(self, tokens, mask) -> list[str]:
        return [self.policy_tok.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]

    def compare(self, policy: Policy, baseline: Policy | str, batches: Sequence[data_lib.PromptBatch],
                key: jax.Array, baseline_key: str = "") -> PerPrompt:
        """Per-prompt results of `policy` against `baseline` (a `Policy`, or "reference": the batches' reference
        responses) over `batches`. Call under `jax.set_mesh(mesh)`."""
        sharding = shd.batch_sharding(self.mesh, 1)
        harmless = self.evaluators.harmless
        parts: dict[str, list] = {}
        for i, batch in enumerate(batches):
            k_a, k_b = jax.random.split(jax.random.fold_in(key, i))
            prompts, prompt_mask = data_lib.to_global((batch.tokens_bp, batch.mask_bp), sharding)
            roll = self._sample(policy.params, policy.cfg, prompts, prompt_mask, k_a, self.sampling)
            a = (roll.response_tokens_br, roll.response_mask_br)
            if isinstance(baseline, str):  # the data's references: right-padded, ended by EOS, like responses
                b = data_lib.to_global((batch.reference_bf, batch.reference_mask_bf), sharding)
            else:
                if (baseline_key, i) not in self._baseline:
                    base = self._sample(baseline.params, baseline.cfg, prompts, prompt_mask, k_b, self.sampling)
                    self._baseline[(baseline_key, i)] = (base.response_tokens_br, base.response_mask_br)
                b = self._baseline[(baseline_key, i)]
            p_win, m = self._judge(self.evaluators.pairwise, prompts, prompt_mask, *a,
                                   responses_b_br=b[0], response_b_mask_br=b[1])
            values = {"p_win": p_win, "p_orders": _whole(m.p_orders_b2),
                      "position_agree": _whole(m.position_agree_b)}
            if harmless is not None:
                values["harmless_a"] = self._judge(harmless, prompts, prompt_mask, *a)[0]
                values["harmless_b"] = self._judge(harmless, prompts, prompt_mask, *b)[0]
            valid = shd.gather_to_host(np.asarray(batch.valid_b)) > 0
            texts = {"prompts": self._texts(shd.gather_to_host(prompts), shd.gather_to_host(prompt_mask)),
                     "responses_a": self._texts(*map(shd.gather_to_host, a)),
                     "responses_b": self._texts(*map(shd.gather_to_host, b))}
            for name, v in {**values, **texts}.items():
                parts.setdefault(name, []).extend(x for x, keep in zip(v, valid) if keep)
        arrays = {k: np.asarray(v) for k, v in parts.items() if k not in ("prompts", "responses_a", "responses_b")}
        return PerPrompt(
            p_win=arrays["p_win"], p_orders=arrays["p_orders"], position_agree=arrays["position_agree"],
            length_a=np.asarray([len(t) for t in parts["responses_a"]], np.float64),
            length_b=np.asarray([len(t) for t in parts["responses_b"]], np.float64),
            harmless_a=arrays.get("harmless_a"), harmless_b=arrays.get("harmless_b"),
            prompts=parts["prompts"], responses_a=parts["responses_a"], responses_b=parts["responses_b"])


def _whole(x) -> np.ndarray:
    """A judge's output as the whole batch on the host: gathered when it is a global array spanning processes
    (token space), as is when every process computed the whole batch (host path)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return shd.gather_to_host(x)
    return np.asarray(x)


# ================================================================================================ the CLI
def resolve_policy(path: str, what: str) -> tuple[str, dict | None]:
    """An HF folder as is, or a training run's workdir -> its exported `final_policy` folder and its config
    (as saved in its config.json; None for an HF folder)."""
    from rlaif_jax import workdir as workdir_lib

    config_path = os.path.join(path, workdir_lib.CONFIG_FILE)
    if os.path.isdir(path) and workdir_lib._is_run_config(config_path):
        with open(config_path) as f:
            run_config = json.load(f)
        folder = os.path.join(path, workdir_lib.FINAL_POLICY)
        if not os.path.isdir(folder):
            raise errors.UserError(f"{what}={path} is a run without an exported policy ({folder} is missing): "
                                   "let it finish with config.train.export_final=True", kind="model")
        return folder, run_config
    return path, None


def load_policy(path: str, what: str, mesh: jax.sharding.Mesh, rules, dtype: str = "float32",
                policy_tok=None) -> tuple[Policy, Any, dict | None]:
    """A policy from an HF folder or a run's workdir (`resolve_policy`): (Policy, tokenizer, run config or None).
    With `policy_tok`, its tokenizer must be that one: both policies answer the same tokenised prompts."""
    from rlaif_jax.models import hf

    folder, run_config = resolve_policy(path, what)
    tok = hf.load_tokenizer(folder)
    if policy_tok is not None and not judging.tokenizers_match(policy_tok, tok):
        raise errors.ConfigError(f"{what}={path} has another tokenizer than the evaluated policy; both policies "
                                 "answer the same tokenised prompts")
    cfg, params = hf.load_model(folder, mesh, dtype, dtype, rules)
    return Policy(params, cfg), tok, run_config


def run_cli(policy: str, e: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, out: str,
            max_prompts: int = 64, batch_size: int = 8, seed: int = 0, dtype: str = "float32") -> dict:
    """The CLI after flag parsing (tests call it in-process): evaluates `policy` (an HF folder or a run's workdir)
    against `e.baseline` and writes the numbers and the per-prompt rows to `out` (process 0); returns them."""
    from rlaif_jax.models import hf

    where = "--evaluator"
    if not e.path:
        raise errors.ConfigError("--evaluator.path is empty: set it to the evaluator model's HF folder")
    try:
        validate_config(e, where)
    except ValueError as err:
        raise errors.ConfigError(str(err)) from None
    policy_folder, run_config = resolve_policy(policy, "--policy")
    baseline = e.baseline
    if baseline == "initial_policy":
        if run_config is None:
            raise errors.ConfigError("--evaluator.baseline=initial_policy needs --policy to be a training run's "
                                     "workdir (its config names the initial policy); or pass a policy's folder")
        baseline = run_config["policy"]["path"]
    if not data_cfg.path and run_config is not None:  # the run's own prompts (its held-out split when it has one)
        data_cfg = ml_collections.ConfigDict(run_config["data"])
    try:
        data_lib.validate_config(data_cfg)
    except ValueError as err:
        raise errors.ConfigError(str(err).replace("config.data.", "--data.")) from None
    if baseline == "reference" and not data_cfg.reference_field:
        raise errors.ConfigError("--evaluator.baseline=reference compares with the data's reference responses: set "
                                 "--data.reference_field to their column")
    if batch_size % jax.device_count():
        raise errors.ConfigError(f"--batch_size={batch_size} is not divisible by the {jax.device_count()} devices")

    policy_tok = hf.load_tokenizer(policy_folder)
    splits = data_lib.load_prompt_splits(data_cfg, policy_tok)
    loader = data_lib.PromptLoader(splits.eval or splits.train, batch_size, shuffle=False, num_epochs=1,
                                   drop_last=False)
    batches = [b for _, b in zip(range(-(-max_prompts // batch_size)), loader)]
    mesh, rules = shd.make_mesh(-1, 1, 1), list(shd.DEFAULT_RULES)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        policy_a = load_policy(policy_folder, "--policy", mesh, rules, dtype)[0]
        policy_b = ("reference" if baseline == "reference" else
                    load_policy(baseline, "--evaluator.baseline", mesh, rules, dtype, policy_tok)[0])
        stop_ids = policy_a.cfg.eos_token_ids
        evaluators = load_evaluators(e, policy_tok, stop_ids, mesh, rules, where)
        r = PairwiseEvaluation(e, evaluators, policy_tok, stop_ids, mesh).compare(
            policy_a, policy_b, batches, jax.random.key(seed), baseline)
    results = {
        "policy": policy, "baseline": baseline, "evaluator": e.path, "templating_path": evaluators.pairwise.spec.path,
        "temperature": e.temperature, "max_new_tokens": e.max_new_tokens, **summarize(r, seed),
        "examples": [dict(prompt=r.prompts[i], response_a=r.responses_a[i], response_b=r.responses_b[i],
                          p_a_wins=float(r.p_win[i]), p_a_wins_orders=[float(x) for x in r.p_orders[i]],
                          **({} if r.harmless_a is None else {"harmless_p_a": float(r.harmless_a[i]),
                                                             "harmless_p_b": float(r.harmless_b[i])}))
                     for i in range(len(r.p_win))]}
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    log.info("win rate %.3f [%.3f, %.3f], LC %.3f over %d prompts; written to %s", results["win_rate"],
             results["win_rate_ci_low"], results["win_rate_ci_high"], results["lc_win_rate"], len(r.p_win), out)
    return results


def select_best_policy(workdir: str, e: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, out: str,
                       **kwargs) -> dict:
    """The final checkpoint chosen as Lee et al. 2023 choose it (less their manual inspection): every candidate a
    run kept in WORKDIR/best_policies (`config.checkpoint.keep_best`, the policies of highest validation reward) is
    compared with the baseline (by default the run's initial policy, on the run's held-out prompts) by `run_cli`,
    and the one of highest win rate is recorded as "selected" in best_policies/index.json. Each candidate's
    results go to best_policies/step_<s>.eval.json; `out` gets the ranking. Returns it."""
    from rlaif_jax import checkpoint as ckpt_lib

    folder, run_config = resolve_policy(workdir, "--policy")
    index_path = os.path.join(workdir, ckpt_lib.BEST_DIR, ckpt_lib.BEST_INDEX)
    if run_config is None or not os.path.exists(index_path):
        raise errors.ConfigError(f"--select_best: {workdir} has no {index_path}; train with "
                                 "config.checkpoint.keep_best > 0 to keep candidates")
    with open(index_path) as f:
        index = json.load(f)
    e = ml_collections.ConfigDict(e.to_dict())
    if e.baseline == "initial_policy":
        e.baseline = run_config["policy"]["path"]
    if not data_cfg.path:
        data_cfg = ml_collections.ConfigDict(run_config["data"])
    ranking = []
    for entry in index["kept"]:
        r = run_cli(entry["path"], e, data_cfg, os.path.join(workdir, ckpt_lib.BEST_DIR,
                                                             f"step_{entry['step']}.eval.json"), **kwargs)
        ranking.append({"step": entry["step"], "path": entry["path"], index["metric"]: entry["value"],
                        **{k: r[k] for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate")}})
    ranking.sort(key=lambda r: (-r["win_rate"], r["step"]))
    result = {"baseline": e.baseline, "evaluator": e.path, "selected": ranking[0], "ranking": ranking}
    if jax.process_index() == 0:
        index["selected"] = ranking[0]
        with open(index_path + ".tmp", "w") as f:
            json.dump(index, f, indent=2)
        os.replace(index_path + ".tmp", index_path)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    log.info("selected the policy of step %d (win rate %.3f against %s) among %d candidates: %s",
             ranking[0]["step"], ranking[0]["win_rate"], e.baseline, len(ranking), ranking[0]["path"])
    return result


def main(argv) -> int:
    del argv
    from absl import flags

    from rlaif_jax import train

    F = flags.FLAGS
    train.configure_logging()
    try:
        train.maybe_initialize_distributed(None, None, None)
        if F.select_best:
            select_best_policy(F.policy, F.evaluator, F.data, F.out, max_prompts=F.max_prompts,
                               batch_size=F.batch_size, seed=F.seed, dtype=F.dtype)
        else:
            run_cli(F.policy, F.evaluator, F.data, F.out, F.max_prompts, F.batch_size, F.seed, F.dtype)
    except errors.UserError as err:
        errors.report(err)
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("policy", None, "policy A: an HF folder or a training run's workdir", required=True)
    flags.DEFINE_string("out", None, "JSON file of the results", required=True)
    flags.DEFINE_integer("max_prompts", 64, "prompts evaluated (whole batches)")
    flags.DEFINE_integer("batch_size", 8, "prompts per batch (a multiple of the device count)")
    flags.DEFINE_integer("seed", 0, "sampling key (temperature > 0) and bootstrap seed")
    flags.DEFINE_string("dtype", "float32", "the policies' dtype")
    flags.DEFINE_bool("select_best", False, "--policy is a run's workdir: rank the candidates it kept in "
                      "best_policies (config.checkpoint.keep_best) and record the best as its final checkpoint")
    config_flags.DEFINE_config_dict("evaluator", default_config(), "the evaluator (config.eval.evaluator)")
    config_flags.DEFINE_config_dict("data", data_lib.default_config(), "the prompts (config.data); default: the "
                                    "run's own (its held-out split) when --policy is a workdir")
    app.run(main)
