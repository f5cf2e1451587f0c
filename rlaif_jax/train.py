"""The training program: `python -m rlaif_jax.train --config experiments/X.py[:arg] --workdir DIR`.

    --config.a.b=value     override any config field (typos are errors)
    --workdir DIR          checkpoints, metrics.jsonl, samples/, plots; an existing workdir is resumed
    --allow_config_change  resume although the config changed what the run computes (workdir.py lists what)
    --coordinator_address / --num_processes / --process_id   multi-host (or the cluster's environment)
    --plan --plan_devices=N [--device_memory_gib=G] [--plan_phases] [--plan_scaling]   compile the step from shapes
                           only, memory per device and per phase, and whether it falls with devices (plan.py)

This file holds the flags, `main` and the run loop; the rooms it calls:
  builder.py    the one builder of models, judge spec, train state and compiled step (plan mode uses it too)
  evaluate.py   the held-out evaluation every `eval.every` steps
  workdir.py    what may be written into the workdir; fresh start or resume, and which config changes a resume allows
  errors.py     the one error channel: a user's mistake is one line `FATAL <kind> error: ...` and exit code 2
  plan.py       plan mode
  program.py    what the programs share (with sft.py): multi-host start-up, logging, flag errors, `Preemption`

Phases of `main` (`launch`):
  1 logging (--plan hands over to plan.py here, on simulated devices); distributed init; before anything is
    loaded or compiled: config validation, the model folders' and data files' existence and headers, the workdir
    (created, marked; a resume's config compared with the saved one)
  2 the mesh; models, judge (its path, token space or host, logged once), the train state created sharded and the
    compiled step (`builder.build`)
  3 prompts (each process loads its rows of every batch) and the held-out evaluator
  4 resume from the latest checkpoint in the workdir (state, PRNG, data position)
  5 the loop: batch -> compiled step -> metrics; evaluation and checkpoints every N steps; SIGTERM / SIGINT stop
    it at the next step boundary with a checkpoint (`Preemption`); too many skipped updates in a row stop it
  6 final checkpoint, HF export of the policy (atomic)
"""
from __future__ import annotations

import logging
import os
import signal

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from rlaif_jax import builder
from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import errors, evaluate, host_memory, judging
from rlaif_jax import metrics as metrics_lib
from rlaif_jax import plan as plan_lib
from rlaif_jax import program
from rlaif_jax import reward_functions
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax import workdir as workdir_lib
from rlaif_jax.models import hf
from rlaif_jax.program import Preemption, configure_logging, maybe_initialize_distributed, parse_flags
from rlaif_jax.testbed import build as testbed_build

log = logging.getLogger("rlaif_jax")

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/X.py[:arg])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, samples")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_PLAN = flags.DEFINE_bool("plan", False, "compile the train step ahead of time from shapes on fake CPU devices "
                          "and print per-device memory, FLOPs and whether it fits; loads no weights")
_PLAN_DEVICES = flags.DEFINE_integer("plan_devices", 0, "plan mode: number of simulated devices "
                                     "(0 = the product of config.mesh, which then must not use -1)")
_DEVICE_MEMORY = flags.DEFINE_float("device_memory_gib", 16.0, "plan mode: memory of one target device")
_PLAN_SCALING = flags.DEFINE_bool("plan_scaling", False, "plan mode: also compile the step on half the devices "
                                  "(fsdp halved) and check that the per-device peak falls as devices grow")
_PLAN_PHASES = flags.DEFINE_bool("plan_phases", False, "plan mode: also compile each phase of the fused step alone "
                                 "and print its memory (rollout, judge, reference/critic, learn)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "resume although the config changed settings "
                                         "that alter what the run computes (model, data, batch, algorithm, ...)")


# ---------------------------------------------------------------------------------------------- the run
def count_skipped(c: ml_collections.ConfigDict, step: int, skipped: int, in_a_row: int) -> int:
    """The optimizer updates skipped in a row by the non-finite guard after `step` (whose `skipped` updates of
    algo.epochs x algo.minibatches were skipped), counted over whole steps: a step with a kept update resets it.
    Raises a training error once it reaches train.max_consecutive_skipped (0: never)."""
    in_a_row = in_a_row + skipped if skipped >= c.algo.epochs * c.algo.minibatches else 0
    limit = c.train.max_consecutive_skipped
    if limit and in_a_row >= limit:
        raise errors.UserError(
            f"the last {in_a_row} optimizer updates (up to step {step}) were all skipped by the non-finite guard (NaN "
            "or inf in the loss, gradients or new params): nothing is being learned. Lower config.optim.learning_rate "
            "or check the reward (guard/* and judge/* in metrics.jsonl); config.train.max_consecutive_skipped="
            f"{limit} sets this limit (0 = never stop)", kind="training")
    return in_a_row


def run(c: ml_collections.ConfigDict, workdir: str, begin: workdir_lib.Start) -> int:
    """Trains (or resumes) the run of config `c` in `workdir` (prepared by `workdir.prepare`, which said where it
    starts); returns the exit code: 0, or 128 + the signal's number when a signal stopped it."""
    final_policy = os.path.join(workdir, workdir_lib.FINAL_POLICY)
    if begin.finished and (os.path.exists(final_policy) or not c.train.export_final):
        log.info("the run in %s finished at step %d: nothing to do (raise config.train.steps to train on)", workdir,
                 begin.step)
        return 0
    # ---- 3 (first: a fault in the data shows before any weights load) prompts, with the policy's tokenizer
    train_loader, eval_loader = data_lib.load_prompts(c.data, hf.load_tokenizer(c.policy.path), c.train.batch_size)
    # ---- 2 mesh, then models, state and the compiled step (born sharded)
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        parts = builder.build(c, mesh, rules)

        # ---- 3 the prompts' summary and the held-out evaluator
        log.info("process %d/%d loads %d of %d rows per batch", jax.process_index(), jax.process_count(),
                 train_loader.local_batch_size, c.train.batch_size)
        for name, loader in (("training", train_loader), ("held-out", eval_loader)):
            if loader is not None:
                prompts = loader.prompts
                log.info("%s prompts: %s", name, prompts.summary())
                if prompts.num_truncated > len(prompts) / 2:
                    log.warning("%d of %d %s prompts are longer than config.data.max_prompt_len=%d and were cut "
                                "from the left; raise max_prompt_len if the cut part matters", prompts.num_truncated,
                                len(prompts), name, prompts.max_prompt_len)
        evaluator = evaluate.Evaluator(c, parts, eval_loader, mesh)
        state, frozen, batch_sharding = parts.state, parts.frozen, shd.batch_sharding(mesh, 1)

        # ---- 4 resume: state (params, optimizer, KL controller, PRNG) and the data position. A fresh start found
        # the workdir without an earlier run's files (workdir.prepare moved any aside).
        ckpt = ckpt_lib.Checkpointer(workdir, c.checkpoint)
        state, start = ckpt.resume(state, train_loader)
        # wandb gets the config without a remote judge's URL and key (as config.json, workdir.config_json).
        writer = metrics_lib.MetricsWriter(workdir, c.logging, judging.remote.redacted(c), start_step=start,
                                           total_steps=c.train.steps)
        log.info("%d devices, mesh %s", jax.device_count(), dict(mesh.shape))
        if start == 0 and c.eval.every:
            writer.write(0, {"judge_path_is_token_space": int(parts.judge_spec.path == "token_space"),
                             **evaluator.evaluate(state, frozen, 0, writer)})

        # Checkpoint selection (config.checkpoint.keep_best): the best policies by an evaluation metric as HF folders.
        best = ckpt_lib.BestPolicies(workdir, c.checkpoint)

        def export_policy(folder):
            hf.save_model(ts.trained_policy(c, state.params, frozen), parts.models.policy, folder,
                          tokenizer=parts.policy_tokenizer)

        # ---- 5 the loop
        preemption = Preemption()
        skipped_in_a_row, step = 0, start
        try:
            for step in range(start + 1, c.train.steps + 1):
                local = next(train_loader)
                batch = data_lib.to_global(local, batch_sharding)
                references = () if batch.reference_bf is None else (batch.reference_bf, batch.reference_mask_bf)
                # Python reward functions read this process's prompts' dataset columns (each process its own rows).
                columns = ({"columns": reward_functions.columns_of(train_loader.prompts.rows(local.index_b))}
                           if len(c.reward.functions) else {})
                state, metrics = parts.step_fn(state, frozen, batch.tokens_bp, batch.mask_bp, *references, **columns)
                if c.eval.every and (step % c.eval.every == 0 or step == c.train.steps):
                    metrics = {**metrics, **evaluator.evaluate(state, frozen, step, writer)}
                    best.consider(step, metrics, export_policy)
                values = writer.write(step, metrics)
                # A signal during the last step needs no stop: the run ends with its checkpoint and export.
                stop = preemption.requested(step) and step < c.train.steps
                ckpt.save(step, state, {"data": train_loader.state().to_json()}, force=step == c.train.steps or stop)
                if stop:
                    break
                skipped_in_a_row = count_skipped(c, step, int(values.get("guard/skipped_updates", 0)),
                                                 skipped_in_a_row)
        finally:
            preemption.close()
            ckpt.close()  # waits for the save in flight
            writer.close()
        if preemption.signum is not None:
            log.warning("stopped by %s after step %d: its checkpoint is in %s; run the same command to resume from "
                        "step %d", signal.Signals(preemption.signum).name, step, ckpt.directory, step + 1)
            return 128 + int(preemption.signum)

        # ---- 6 export the trained policy as an HF folder (written beside it, then renamed: atomic)
        if c.train.export_final:
            # With LoRA: the merged weights (lora.merge), an ordinary HF checkpoint.
            hf.save_model(ts.trained_policy(c, state.params, frozen), parts.models.policy, final_policy,
                          tokenizer=parts.policy_tokenizer)
            log.info("exported the policy of step %d to %s", step, final_policy)
    return 0


def check_inputs(c: ml_collections.ConfigDict) -> None:
    """What is knowable about the model folders and data files before any is loaded: they exist, config.json and
    safetensors headers parse and fit their files, tokenizer files are there (hub ids are checked when fetched)."""
    hf.check_folder(c.policy.path, "config.policy.path")
    hf.check_folder(c.judge.path, "config.judge.path")
    for i, path in enumerate(c.judge.ensemble_paths):
        hf.check_folder(path, f"config.judge.ensemble_paths[{i}]")
    if c.critic.path:
        hf.check_folder(c.critic.path, "config.critic.path")
    program.check_data_paths(c.data)


def launch(config: ml_collections.ConfigDict | None, workdir: str | None, *, allow_config_change: bool = False,
           plan: bool = False, plan_devices: int = 0, device_memory_gib: float = 16.0, plan_phases: bool = False,
           plan_scaling: bool = False,
           distributed: tuple[str | None, int | None, int | None] = (None, None, None)) -> int:
    """The whole program after flag parsing (tests call it in-process); returns the exit code. A user error (an
    `errors.UserError` from any phase) ends it here, the one place that catches them: one line, exit code 2."""
    try:
        if config is None:
            raise errors.ConfigError("--config is required, e.g. --config experiments/testbed.py:small")
        if memory_error := host_memory.setting_error():  # read on `import rlaif_jax`, refused here before loading
            raise errors.ConfigError(memory_error)
        if plan:
            # Simulated devices: set before the first jax call creates the backend.
            n = plan_devices or config.mesh.data * config.mesh.fsdp * config.mesh.tensor
            if n <= 0:
                raise errors.ConfigError("plan mode: pass --plan_devices=N (config.mesh.data is -1)")
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={n}")
            jax.config.update("jax_platforms", "cpu")
            config_lib.validate(config, num_devices=n)
            config_lib.as_config_error(builder.check_attention, config, True)
            testbed_build.ensure_built(config)  # plan mode reads the testbed's config.json files and tokenizers
            plan_lib.plan(config, device_memory_gib, phases=plan_phases, scaling=plan_scaling)
            return 0
        maybe_initialize_distributed(*distributed)
        if not workdir:
            raise errors.WorkdirError("--workdir is required (the run's folder: checkpoints, metrics.jsonl)")
        config_lib.validate(config)
        config_lib.as_config_error(builder.check_attention, config)
        workdir_lib.check(workdir)
        # The built-in testbed (config.testbed.build) is built, or reused from its cache, here in the program, not
        # in its config: after the device setup above, before anything reads its models or prompt file.
        testbed_build.ensure_built(config)
        check_inputs(config)
        start = workdir_lib.prepare(workdir, config, allow_changes=allow_config_change)
        return run(config, workdir, start)
    except errors.UserError as e:
        errors.report(e)


def main(argv):
    del argv
    configure_logging()
    return launch(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value, plan=_PLAN.value,
                  plan_devices=_PLAN_DEVICES.value, device_memory_gib=_DEVICE_MEMORY.value, plan_phases=_PLAN_PHASES.value,
                  plan_scaling=_PLAN_SCALING.value,
                  distributed=(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
