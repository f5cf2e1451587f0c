"""The reward-model stage of canonical ("distilled") RLAIF, between SFT and RL: `python -m
rlaif_jax.reward_model_stage --config experiments/rm_X.py[:arg] --workdir DIR`, with the SFT program's flags and
conventions (`--config.a.b=value` overrides, a user's mistake is one line `FATAL <kind> error: ...` and exit code
2, SIGTERM / SIGINT stop at a step boundary with a checkpoint, an existing workdir is resumed).

The reward model (rlaif_jax/reward_model.py) is a backbone plus a scalar value head, r = head(final hidden state
at the row's last position). It starts from `config.policy.path` (the SFT policy, as Lee et al. 2023 and the
summarize-from-feedback reproductions initialise it) and a fresh head, and is fitted to soft preferences with
the Bradley-Terry cross-entropy (`reward_model.soft_bradley_terry_loss`, mean over the batch's pairs):

    L = -(1/N) sum_n [ p_n log sigmoid(r_a,n - r_b,n) + (1 - p_n) log sigmoid(r_b,n - r_a,n) ]

Rows: `config.judge` is the reward_model-mode judge section of the RL run that will read the reward model (its
template, max_len, truncation, include_stop_token, chat settings); each response of a pair is rendered with it
exactly as that judge renders a sample (`judging.encode_pairs`), so with `include_stop_token=True` the row ends
with the EOS and the reward is read at the EOS token. The exported folder records these settings and the RL run's
judge refuses other ones (`reward_model.check_read_settings`). Its path and dtypes are not read here (the backbone
is config.policy's; the output is workdir/reward_model): they must stay at their defaults.

Data: preference JSONL files (`reward_model.read_preferences`: prompt, response_a, response_b, p_a_better), the
training pairs (`data.path`) and optional held-out pairs (`data.eval_path`). Pairs without p_a_better are labelled
at start-up by the pairwise LLM judge `config.label_judge` (`labelling.label_preferences`, both orders averaged); a
file with unlabelled pairs and no label judge is refused. `data.normalize_to` names a JSONL of reference responses
({"prompt", "completion"}, what `scripts/export_dataset.py --kind sft` writes): after training the value head's bias
is shifted so they score 0 on average (`reward_model.normalize_to_references`, as the reproduction's reward.py does).

The step (`make_rm_step`) is one `jax.jit` with in/out shardings on the training mesh (`config.mesh`, the same
logical-axis rules; the head is replicated), the state donated; the optimizer is the RL stage's
(`train_step.make_optimizer` over train.steps updates, with optim.grad_accum micro-batches) behind the non-finite
guard. The pairs repeat for train.steps steps, epoch e shuffled with seed + e (`reward_model.PairLoader`).

Files in the workdir: checkpoints/ (orbax: state and the data position, so a resumed run sees the batches an
uninterrupted one would), metrics.jsonl (rm/loss, rm/accuracy of the step's batch, optim/learning_rate,
optim/grad_norm, guard/skipped_updates; eval/rm_loss and eval/rm_accuracy on the held-out pairs at step 0, every
eval.every steps and after the last), config.json, and reward_model/ (`reward_model.save_reward_model`: the HF
backbone, value_head.safetensors, reward_model.json), which `config.judge.mode = "reward_model"` and
`config.critic.init = "reward_model"` of the RL program read.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import errors, judging, labelling, program
from rlaif_jax import metrics as metrics_lib
from rlaif_jax import reward_model as rm
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax import workdir as workdir_lib
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

log = logging.getLogger("rlaif_jax")

# The judge settings that only a judge that loads a model reads; here the model is config.policy's.
UNREAD_JUDGE_SETTINGS = ("path", "dtype", "param_dtype", "ensemble_paths", "ensemble_aggregate",
                         "ensemble_std_coef")
# The judge settings that decide the rows a reward model reads (what an RM experiment copies from its RL
# experiment's judge section; reward_model.read_settings records their effect in the exported folder).
ROW_SETTINGS = ("template", "chat_template", "answer_prefix", "max_len", "truncation", "include_stop_token",
                "strip_prompt_bos", "templating")


# ---------------------------------------------------------------------------------------------- config
def base_config() -> ml_collections.ConfigDict:
    """Every section of a reward-model config with its defaults (unlocked; experiment files lock it after their
    changes). policy, optim, mesh, checkpoint and logging are the RL config's sections (same keys, validators)."""
    from rlaif_jax import checkpoint, metrics

    rl = config_lib.base_config()
    c = ml_collections.ConfigDict()
    c.seed = 0  # the value head's init, the pairs' order (epoch e shuffled with seed + e) and the labelling
    c.policy = rl.policy  # the backbone the reward model starts from (the SFT policy), its training dtypes
    c.judge = judging.default_config("reward_model")  # the rows: the RL run's judge section (ROW_SETTINGS)
    c.label_judge = judging.default_config("pairwise")  # labels pairs without p_a_better; path "" = none
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # training preference pairs, JSONL (reward_model.read_preferences)
    c.data.eval_path = ""  # held-out preference pairs, JSONL; "" = no held-out evaluation
    c.data.normalize_to = ""  # reference responses ({"prompt", "completion"} JSONL) to score 0 on average; "" = off
    c.optim = rl.optim
    c.mesh = rl.mesh
    c.checkpoint = checkpoint.default_config()
    c.logging = metrics.default_config()
    c.logging.progress_keys = "rm/loss,rm/accuracy,eval/rm_accuracy"
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 100  # held-out loss and accuracy every N steps (and at step 0 and after the last); 0 = end only
    c.eval.batch_size = 64  # rows per scoring batch of the held-out pairs and the references
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # pairs per step (x optim.grad_accum micro-batches of batch_size / grad_accum)
    c.train.steps = 1000  # optimizer steps; the pairs repeat, epoch e shuffled with seed + e
    c.train.max_consecutive_skipped = 64  # stop after this many non-finite updates in a row; 0 = never
    return c


def _validate_judge(j: ml_collections.ConfigDict, policy_path: str) -> None:
    if j.mode != "reward_model":
        raise ValueError(f"config.judge.mode={j.mode!r}: the reward-model stage renders rows of a reward_model "
                         "judge; set config.judge.mode='reward_model'")
    defaults = judging.default_config("reward_model")
    for name in UNREAD_JUDGE_SETTINGS:
        if j[name] != defaults[name]:
            raise ValueError(f"config.judge.{name}={j[name]!r} is not read by the reward-model stage (the backbone is "
                             "config.policy.path, trained in config.policy's dtypes, and the reward model is written "
                             f"to workdir/{workdir_lib.REWARD_MODEL}): set it to {defaults[name]!r}")
    rows = ml_collections.ConfigDict(j.to_dict())
    rows.path = policy_path  # the judging validator's check of a loadable model: here, the policy's
    judging.validate_config(rows)


def _validate_label_judge(j: ml_collections.ConfigDict) -> None:
    judging.ensemble.check_one_judge(j, "config.label_judge")
    if not j.path:
        return
    if j.mode != "pairwise":
        raise ValueError(f"config.label_judge.mode={j.mode!r}: pairs are labelled by a pairwise judge's "
                         "P(a better); set config.label_judge.mode='pairwise'")
    judging.validate_config(j)


def _validate_data(d: ml_collections.ConfigDict) -> None:
    if not d.path:
        raise ValueError("config.data.path is empty: set it to the training preference pairs (a JSONL of prompt, "
                         "response_a, response_b, p_a_better)")


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    if e.every < 0 or e.batch_size < 1:
        raise ValueError(f"config.eval.every={e.every} must be >= 0 (0 = after the last step only) and "
                         f"config.eval.batch_size={e.batch_size} >= 1")


def _validate_train(t: ml_collections.ConfigDict) -> None:
    if t.batch_size < 1 or t.steps < 1:
        raise ValueError(f"config.train.batch_size={t.batch_size} and config.train.steps={t.steps} must be >= 1")
    if t.max_consecutive_skipped < 0:
        raise ValueError(f"config.train.max_consecutive_skipped={t.max_consecutive_skipped} must be >= 0 (0 = off)")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises `errors.ConfigError` with one line naming the field to change; reads no file."""
    config_lib.as_config_error(_validate, c, num_devices)


def _validate(c: ml_collections.ConfigDict, num_devices: int | None) -> None:
    shared = config_lib.section_validators()
    validators = {**{name: shared[name] for name in ("seed", "policy", "optim", "mesh", "checkpoint", "logging")},
                  "judge": lambda j: _validate_judge(j, c.policy.path), "label_judge": _validate_label_judge,
                  "data": _validate_data, "eval": _validate_eval, "train": _validate_train}
    if set(c.keys()) != set(validators):
        raise ValueError(f"a reward-model config has the sections {sorted(validators)}; this one has "
                         f"{sorted(c.keys())} (start it from rlaif_jax.reward_model_stage.base_config())")
    for name, check in validators.items():
        check(c[name])
    program.check_batch_on_mesh(c.mesh, c.train.batch_size, c.optim.grad_accum, "config.train.batch_size",
                                num_devices)
    program.check_batch_on_mesh(c.mesh, c.eval.batch_size, 1, "config.eval.batch_size", num_devices)


def copy_row_settings(judge: ml_collections.ConfigDict, rl_judge: ml_collections.ConfigDict) -> None:
    """Sets `judge`'s ROW_SETTINGS to those of an RL config's reward_model judge section, so the reward model is
    trained on the rows that judge will read (an experiment file's way to keep the two from drifting apart)."""
    for name in ROW_SETTINGS:
        judge[name] = rl_judge[name]


# ---------------------------------------------------------------------------------------------- data
def _read_pairs(path: str) -> list[dict[str, Any]]:
    try:
        return rm.read_preferences(path)
    except errors.UserError:
        raise
    except ValueError as e:  # a p_a_better that is not a probability: the file's fault too
        raise errors.DataError(str(e)) from None


def load_pairs(c: ml_collections.ConfigDict, spec: judging.JudgeSpec, tok) -> tuple[rm.PairBatch, rm.PairBatch | None]:
    """The training and held-out pairs as reward-model rows, pairs without p_a_better labelled by
    config.label_judge (loaded only when some need it)."""
    files = {"config.data.path": _read_pairs(c.data.path)}
    if c.data.eval_path:
        files["config.data.eval_path"] = _read_pairs(c.data.eval_path)
    unlabelled = {s: sum(r.get("p_a_better") is None for r in records) for s, records in files.items()}
    if any(unlabelled.values()):
        counts = ", ".join(f"{n} of {len(files[s])} in {s}" for s, n in unlabelled.items() if n)
        if not c.label_judge.path:
            raise errors.DataError(f"pairs without p_a_better ({counts}): set config.label_judge.path to a pairwise "
                                   "judge that labels them, or add the labels to the files")
        log.info("labelling the pairs without p_a_better (%s) with the pairwise judge %s", counts,
                 c.label_judge.path)
        labeller = judging.load_judge(c.label_judge)
        for k, (setting, records) in enumerate(files.items()):
            files[setting] = labelling.label_preferences(records, labeller, c.eval.batch_size, c.seed + k)
        del labeller
    pairs = {s: judging.encode_pairs(spec, tok, records) for s, records in files.items()}
    return pairs["config.data.path"], pairs.get("config.data.eval_path")


def load_references(c: ml_collections.ConfigDict, spec: judging.JudgeSpec, tok) -> tuple[np.ndarray, np.ndarray]:
    """Rows of config.data.normalize_to's reference responses, rendered as the pairs' responses are."""
    refs = [r for _, r in data_lib.read_jsonl(c.data.normalize_to, {"prompt", "completion"}, "reference responses")]
    return judging.encode_responses(spec, tok, [r["prompt"] for r in refs], [r["completion"] for r in refs])


# ---------------------------------------------------------------------------------------------- state and step
@flax.struct.dataclass
class RMState:
    params: rm.RewardModelParams  # backbone (tfm layout) and value head
    opt_state: Any
    step: jax.Array  # () int32, completed steps
    skipped_updates: jax.Array  # () int32, updates dropped by the non-finite guard


def make_optimizer(c: ml_collections.ConfigDict):
    """The RL stage's optimizer over the run's train.steps updates (one per step)."""
    return ts.make_optimizer(c, c.train.steps)


def init_state(c: ml_collections.ConfigDict, cfg: ModelConfig, backbone) -> RMState:
    """The backbone with a fresh value head (drawn with config.seed) and a fresh optimizer state."""
    params = rm.RewardModelParams(backbone, tfm.init_value_head(cfg, jax.random.key(c.seed)))
    return RMState(params=params, opt_state=make_optimizer(c).init(params), step=jnp.zeros((), jnp.int32),
                   skipped_updates=jnp.zeros((), jnp.int32))


def state_shardings(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh: jax.sharding.Mesh,
                    abstract: RMState) -> RMState:
    """Params by their logical axes (the backbone's and the value head's), optimizer leaves of a param's shape like
    their param, the rest replicated (`train_step.optimizer_state_shardings`, as in training)."""
    axes = rm.RewardModelParams(tfm.param_logical_axes(cfg), tfm.value_head_logical_axes())
    params = shd.tree_shardings(mesh, axes, abstract.params)
    replicated = shd.replicated(mesh)
    opt_state = ts.optimizer_state_shardings(make_optimizer(c), abstract.opt_state, abstract.params, params,
                                             replicated)
    return RMState(params=params, opt_state=opt_state, step=replicated, skipped_updates=replicated)


def make_rm_step(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh: jax.sharding.Mesh,
                 shardings: RMState) -> Callable:
    """`rm_step(state, pairs: PairBatch) -> (state, metrics)`: one optimizer update on the soft Bradley-Terry loss
    of the batch's pairs over optim.grad_accum micro-batches, behind the non-finite guard; one jax.jit with in/out
    shardings on `mesh` (the pairs over the rules' batch axes) and the state donated."""
    optimizer, schedule = make_optimizer(c), ts.learning_rate_schedule(c, c.train.steps)
    accum = int(c.optim.grad_accum)

    def rm_step(state: RMState, pairs: rm.PairBatch):
        batch_pairs = pairs.p_a_better.shape[0]

        def loss_fn(params, micro):
            micro = rm.PairBatch(**micro)
            r_a, r_b = rm.pair_rewards(params, cfg, micro)
            # The micro-batch's share of the batch's mean, by its number of pairs (a micro-batch may be one
            # device's part of one: ts.accumulate_gradients on a data-parallel mesh).
            share = micro.p_a_better.shape[0] / batch_pairs
            return rm.soft_bradley_terry_loss(r_a, r_b, micro.p_a_better) * share, ({}, (r_a, r_b))

        loss, (_, (r_a, r_b)), grads = ts.accumulate_gradients(loss_fn, state.params, pairs._asdict(), accum)
        params, opt_state, kept, grad_norm = ts.guarded_update(optimizer, grads, state.opt_state, state.params, loss)
        skipped = 1 - kept.astype(jnp.int32)
        metrics = {"rm/loss": loss, "rm/accuracy": rm.ranking_accuracy(r_a, r_b, pairs.p_a_better),
                   # the rate of this update: the schedule advances only on kept updates
                   "optim/learning_rate": schedule(state.step - state.skipped_updates),
                   "optim/grad_norm": grad_norm, "guard/skipped_updates": skipped}
        return RMState(params, opt_state, state.step + 1, state.skipped_updates + skipped), metrics

    pairs = shd.batch_sharding(mesh, 1)  # every leaf's first axis (pairs) over the batch axes
    return jax.jit(rm_step, in_shardings=(shardings, pairs), out_shardings=(shardings, shd.replicated(mesh)),
                   donate_argnums=0)


# ---------------------------------------------------------------------------------------------- the run
def run(c: ml_collections.ConfigDict, workdir: str, begin: workdir_lib.Start) -> int:
    """Trains (or resumes) the reward model of config `c` in `workdir` (prepared by `workdir.prepare`); returns the
    exit code: 0, or 128 + the signal's number when a signal stopped it."""
    out = os.path.join(workdir, workdir_lib.REWARD_MODEL)
    if begin.finished and os.path.exists(out):
        log.info("the run in %s finished at step %d: nothing to do (raise config.train.steps to train on)", workdir,
                 begin.step)
        return 0
    # ---- 1 data first (labelled where asked): a fault in it shows before the reward model loads
    tok = hf.load_tokenizer(c.policy.path)
    spec = judging.make_spec(c.judge, tok)
    train_pairs, eval_pairs = load_pairs(c, spec, tok)
    references = load_references(c, spec, tok) if c.data.normalize_to else None
    loader = rm.PairLoader(train_pairs, c.train.batch_size, seed=c.seed)
    log.info("%d training pairs (%.2f epochs in %d steps), %s held-out pairs", loader.num_rows,
             c.train.steps / loader.batches_per_epoch, c.train.steps,
             eval_pairs.tokens_a.shape[0] if eval_pairs is not None else "no")
    # ---- 2 mesh, backbone (read into its shards), state (born sharded), the compiled step
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        cfg, backbone = hf.load_model(c.policy.path, mesh, c.policy.dtype, c.policy.param_dtype, rules)
        init = functools.partial(init_state, c, cfg)
        shardings = state_shardings(c, cfg, mesh, jax.eval_shape(init, backbone))
        state = jax.jit(init, out_shardings=shardings)(backbone)
        del backbone  # the state holds its own copy; the loaded buffers can go
        step_fn = make_rm_step(c, cfg, mesh, shardings)
        rows = shd.batch_sharding(mesh, 1)  # a batch of pairs or rows, its first axis over the batch axes

        def evaluate() -> dict[str, float]:
            loss, accuracy = rm.evaluate_pairs(state.params, cfg, eval_pairs, c.eval.batch_size, rows)
            return {"eval/rm_loss": loss, "eval/rm_accuracy": accuracy}

        # ---- 3 resume: state and data position
        ckpt = ckpt_lib.Checkpointer(workdir, c.checkpoint)
        state, start = ckpt.resume(state, loader)
        writer = metrics_lib.MetricsWriter(workdir, c.logging, c, start_step=start, total_steps=c.train.steps)
        log.info("%d devices, mesh %s; %d pairs per step", jax.device_count(), dict(mesh.shape), c.train.batch_size)

        # ---- 4 the loop; the held-out pairs at step 0, every eval.every steps and after the last
        preemption = program.Preemption()
        step, skipped_in_a_row, limit = start, 0, c.train.max_consecutive_skipped
        try:
            if start == 0 and eval_pairs is not None:
                writer.write(0, evaluate())
            for step in range(start + 1, c.train.steps + 1):
                pairs, _ = next(loader)
                state, metrics = step_fn(state, data_lib.to_global(pairs, rows))
                if eval_pairs is not None and ((c.eval.every and step % c.eval.every == 0)
                                               or step == c.train.steps):
                    metrics = {**metrics, **evaluate()}
                values = writer.write(step, metrics)
                stop = preemption.requested(step) and step < c.train.steps
                ckpt.save(step, state, {"data": loader.state().to_json()}, force=step == c.train.steps or stop)
                if stop:
                    break
                skipped_in_a_row = skipped_in_a_row + 1 if values["guard/skipped_updates"] else 0
                if limit and skipped_in_a_row >= limit:
                    raise errors.UserError(
                        f"the last {skipped_in_a_row} updates (up to step {step}) were all skipped by the non-finite "
                        "guard (NaN or inf in the loss, gradients or new params): lower config.optim.learning_rate; "
                        f"config.train.max_consecutive_skipped={limit} sets this limit (0 = never stop)",
                        kind="training")
        finally:
            preemption.close()
            ckpt.close()
            writer.close()
        if preemption.signum is not None:
            log.warning("stopped by %s after step %d: its checkpoint is in %s; run the same command to resume from "
                        "step %d", signal.Signals(preemption.signum).name, step, ckpt.directory, step + 1)
            return 128 + int(preemption.signum)

        # ---- 5 normalisation to the references, then the reward-model folder (assembled aside, then renamed)
        params = state.params
        if references is not None:
            params, mean = rm.normalize_to_references(
                params, rm.row_rewards(params, cfg, *references, c.eval.batch_size, rows))
            log.info("normalised: the %d references of %s scored %.4f on average; the head's bias now subtracts it",
                     references[0].shape[0], c.data.normalize_to, mean)
        rm.save_reward_model(out, cfg, params.model, params.value_head, tok, spec)
        log.info("exported the reward model of step %d to %s (config.judge.mode='reward_model', "
                 "config.judge.path=%s; config.critic.init='reward_model')", step, out, out)
    return 0


def _check_files(c: ml_collections.ConfigDict) -> None:
    """The data files exist (they are local JSONL files, never hub names) and the models' folders look right."""
    for setting, path in (("config.data.path", c.data.path), ("config.data.eval_path", c.data.eval_path),
                          ("config.data.normalize_to", c.data.normalize_to)):
        if path and not os.path.isfile(path):
            raise errors.DataError(f"{setting}={path!r}: no such file; fix the path (a JSONL file)")
    hf.check_folder(c.policy.path, "config.policy.path")
    if c.label_judge.path:
        hf.check_folder(c.label_judge.path, "config.label_judge.path")


def launch(config: ml_collections.ConfigDict | None, workdir: str | None, *, allow_config_change: bool = False,
           distributed: tuple[str | None, int | None, int | None] = (None, None, None)) -> int:
    """The program after flag parsing (tests call it in-process); returns the exit code. A user error from any
    phase ends it here: one line, exit code 2."""
    try:
        if config is None:
            raise errors.ConfigError("--config is required, e.g. --config experiments/rm_stage.py:runlocal")
        program.maybe_initialize_distributed(*distributed)
        if not workdir:
            raise errors.WorkdirError("--workdir is required (the run's folder: checkpoints, metrics.jsonl)")
        validate(config)
        workdir_lib.check(workdir)
        _check_files(config)
        start = workdir_lib.prepare(workdir, config, allow_changes=allow_config_change)
        return run(config, workdir, start)
    except errors.UserError as e:
        errors.report(e)


# ---------------------------------------------------------------------------------------------- the CLI
if __name__ == "__main__":
    program.run_stage_cli(launch, "reward-model", "checkpoints, metrics, reward_model")
