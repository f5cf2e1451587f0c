"""The training program: `python -m rlaif_jax.train --config experiments/X.py[:arg] --workdir DIR`.

    --config.a.b=value     override any config field (typos are errors)
    --workdir DIR          checkpoints, metrics.jsonl, samples/, plots; an existing workdir is resumed
    --coordinator_address / --num_processes / --process_id   multi-host (or the cluster's environment)
    --plan --plan_devices=N [--device_memory_gib=G]   compile the step from shapes only (rlaif_jax/plan.py)

This file holds the flags, `main` and the run loop; the rooms it calls:
  builder.py    the one builder of models, judge spec, train state and compiled step (plan mode uses it too)
  evaluate.py   the held-out evaluation every `eval.every` steps
  plan.py       plan mode

Phases of `main`:
  1 logging (--plan hands over to plan.py here, on simulated devices); distributed init; config validation
    (before anything is loaded or compiled)
  2 the mesh; models, judge (its path, token space or host, logged once), the train state created sharded and the
    compiled step (`builder.build`)
  3 prompts (each process loads its rows of every batch) and the held-out evaluator
  4 resume from the latest checkpoint in the workdir (state, PRNG, data position)
  5 the loop: batch -> compiled step -> metrics; evaluation and checkpoints every N steps
  6 final checkpoint, HF export of the policy
"""
from __future__ import annotations

import logging
import os
import sys

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rlaif_jax import builder
from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import evaluate, judging
from rlaif_jax import metrics as metrics_lib
from rlaif_jax import plan as plan_lib
from rlaif_jax import reward_functions
from rlaif_jax import sharding as shd
from rlaif_jax.models import hf
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


# ---------------------------------------------------------------------------------------------- the run
def run(c: ml_collections.ConfigDict, workdir: str) -> None:
    """Trains (or resumes) the run of config `c` in `workdir`."""
    # ---- 2 mesh, then models, state and the compiled step (born sharded)
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        parts = builder.build(c, mesh, rules)

        # ---- 3 prompts and the held-out evaluator
        train_loader, eval_loader = data_lib.load_prompts(c.data, parts.policy_tokenizer, c.train.batch_size)
        log.info("process %d/%d loads %d of %d rows per batch", jax.process_index(), jax.process_count(),
                 train_loader.local_batch_size, c.train.batch_size)
        evaluator = evaluate.Evaluator(c, parts, eval_loader, mesh)
        state, frozen, batch_sharding = parts.state, parts.frozen, shd.batch_sharding(mesh, 1)

        # ---- 4 resume: state (params, optimizer, KL controller, PRNG) and the data position
        ckpt = ckpt_lib.Checkpointer(workdir, c.checkpoint)
        start = ckpt.latest_step() or 0
        if start:
            state, extra = ckpt.restore(start, ckpt_lib.abstract_state(state))
            train_loader.restore(extra["data"])
            log.info("resumed from the checkpoint of step %d in %s", start, workdir)
        elif jax.process_index() == 0:
            # A fresh start (also after a kill before the first checkpoint): nothing logged before counts.
            metrics_lib.truncate_metrics(os.path.join(workdir, metrics_lib.METRICS_FILE), -1)
            with open(os.path.join(workdir, "config.json"), "w") as f:  # without a remote judge's URL and key
                f.write(judging.remote.redacted(c).to_json_best_effort(indent=2))
        writer = metrics_lib.MetricsWriter(workdir, c.logging, judging.remote.redacted(c), start_step=start,
                                           total_steps=c.train.steps)
        log.info("%d devices, mesh %s", jax.device_count(), dict(mesh.shape))
        if start == 0 and c.eval.every:
            writer.write(0, {"judge_path_is_token_space": int(parts.judge_spec.path == "token_space"),
                             **evaluator.evaluate(state, frozen, 0, writer)})

        # ---- 5 the loop
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
            writer.write(step, metrics)
            ckpt.save(step, state, {"data": train_loader.state().to_json()}, force=step == c.train.steps)
        ckpt.close()
        writer.close()

        # ---- 6 export the trained policy as an HF folder
        if c.train.export_final:
            hf.save_model(state.params["policy"], parts.models.policy, os.path.join(workdir, "final_policy"),
                          tokenizer=parts.policy_tokenizer)


def maybe_initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Multi-host: `jax.distributed.initialize` from flags, or from the environment: JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, or auto-detection on TPU pods (RLAIF_DISTRIBUTED=1, as
    scripts/launch_tpu_pod.sh sets) and SLURM. Must run before any other jax call."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    # CPU processes exchange collectives through gloo (accelerators use their own interconnect).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        num_processes = num_processes or int(env["JAX_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else int(env["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (env.get("RLAIF_DISTRIBUTED") == "1" or env.get("TPU_WORKER_HOSTNAMES")
          or ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)):
        # TPU pods (the launcher sets RLAIF_DISTRIBUTED=1; the topology comes from the metadata server) and SLURM:
        # jax.distributed finds coordinator, process count and index by itself.
        jax.distributed.initialize()


def configure_logging() -> None:
    """Our own progress lines at INFO; the libraries' (orbax logs every checkpoint file) only from WARNING."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv):
    del argv
    configure_logging()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/testbed.py:small")
    if _PLAN.value:
        # Simulated devices: set before the first jax call creates the backend.
        n = _PLAN_DEVICES.value or config.mesh.data * config.mesh.fsdp * config.mesh.tensor
        if n <= 0:
            raise app.UsageError("plan mode: pass --plan_devices=N (config.mesh.data is -1)")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
        jax.config.update("jax_platforms", "cpu")
        config_lib.validate(config, num_devices=n)
        testbed_build.ensure_built(config)  # plan mode reads the testbed's config.json files and tokenizers
        plan_lib.plan(config, _DEVICE_MEMORY.value)
        return
    maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    config_lib.validate(config)
    # The built-in testbed (config.testbed.build) is built, or reused from its cache, here in the program, not in
    # its config: after the device setup above, before anything reads its models or prompt file.
    testbed_build.ensure_built(config)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    run(config, _WORKDIR.value)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes (a typo in --config.x.y, a value of the wrong type) reported as
    one line that says what to change instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        sys.stderr.write(f"FATAL config error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
