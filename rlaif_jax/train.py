"""The training program: `python -m rlaif_jax.train --config experiments/X.py[:arg] --workdir DIR`.

    --config.a.b=value     override any config field (typos are errors)
    --workdir DIR          checkpoints, metrics.jsonl, samples/, plots; an existing workdir is resumed
    --coordinator_address / --num_processes / --process_id   multi-host (or the cluster's environment)

Phases of `main`:
  1 distributed init, config validation (before anything is loaded or compiled)
  2 tokenizers, the judge path (token space or host), the mesh
  3 models: policy (trained) + frozen reference, judge; the train state created sharded
  4 resume from the latest checkpoint in the workdir (state, PRNG, data position)
  5 the loop: batch -> compiled step -> metrics; evaluation and checkpoints every N steps
  6 final checkpoint, HF export of the policy
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import judging
from rlaif_jax import reward_model
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import metrics as metrics_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm

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


class Setup(NamedTuple):
    """Models, state and compiled step of a run, built by `setup`."""
    models: ts.Models
    state: ts.TrainState
    frozen: ts.Frozen
    judge_spec: judging.JudgeSpec
    policy_tokenizer: Any
    judge_tokenizer: Any
    step_fn: Callable
    state_shardings: Any


def setup(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Setup:
    """Loads policy, reference and judge onto `mesh` (each tensor straight into its shards), creates the train
    state with a jitted init (so it is born sharded) and builds the compiled step. Call inside
    `jax.set_mesh(mesh)` and `sharding.use_rules(rules)`."""
    policy_tok = hf.load_tokenizer(c.policy.path)
    policy_cfg, policy_params = hf.load_model(c.policy.path, mesh, c.policy.dtype, c.policy.param_dtype, rules)
    policy_cfg = policy_cfg.replace(scan_unroll=c.policy.scan_unroll)
    # The reference is a device-side copy (same shardings): the policy's buffers are donated to the step and
    # updated in place, and the checkpoint is read only once.
    reference = jax.tree.map(jnp.copy, policy_params)
    # The judge cuts responses at the stop ids the sampler actually stops on.
    stop_ids = rollout_lib.SamplingConfig.from_config(c.rollout, policy_cfg).stop_ids
    judge = judging.load_judge(c.judge, policy_tok, stop_ids or None, mesh, rules)
    if judge.spec.path == "host" and not c.train.allow_tokenizer_mismatch:
        raise ValueError(
            f"the judge's tokenizer ({c.judge.path}) differs from the policy's ({c.policy.path}), so judge prompts "
            "cannot be assembled in token space; set --config.train.allow_tokenizer_mismatch=True to use the "
            "host re-tokenisation path (two compiled programs per step), or use a judge with the policy's tokenizer")
    critic_params = critic_cfg = None
    if c.critic.kind == "separate" and c.critic.init == "reward_model":
        critic_cfg, backbone = hf.load_model(c.critic.path, mesh, c.policy.dtype, c.policy.param_dtype, rules)
        critic_cfg = critic_cfg.replace(scan_unroll=c.policy.scan_unroll)
        critic_params = {"backbone": backbone, "head": reward_model.load_value_head(hf.resolve_path(c.critic.path),
                                                                                     critic_cfg)}
    models = ts.Models(policy=policy_cfg, judge=judge.cfg, critic=critic_cfg)
    frozen = ts.Frozen(reference=reference, judge=judge.params)
    state, state_shardings = ts.init_state_sharded(c, models, mesh, policy_params, jax.random.key(c.seed),
                                                   critic_params)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    if judge.spec.path == "token_space":
        step_fn = ts.make_train_step(c, models, judge.spec, mesh, state_shardings, frozen_shardings)
    else:
        step_fn = ts.make_host_judge_step(c, models, judge.spec, mesh, state_shardings, frozen_shardings,
                                          policy_tok, judge.tokenizer)
    log.info("judge path: %s", judge.spec.path)
    return Setup(models, state, frozen, judge.spec, policy_tok, judge.tokenizer, step_fn, state_shardings)


# ---------------------------------------------------------------------------------------------- evaluation
def gather_to_host(x) -> np.ndarray:
    """A global array (or this process's rows of one) -> the whole array as numpy, on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def load_function(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Evaluator:
    """Held-out evaluation: judge score (and criteria), win rate against the initial policy judged pairwise in
    both orders, KL to the reference, response length, and the task's ground truth. Responses of the initial
    policy are sampled once (fixed key) and reused at every evaluation."""

    def __init__(self, c: ml_collections.ConfigDict, s: Setup, loader: data_lib.PromptLoader | None,
                 mesh: jax.sharding.Mesh):
        self.c, self.s, self.mesh = c, s, mesh
        self.batches = []
        if loader is not None and c.eval.every:
            n = -(-c.eval.max_prompts // c.train.batch_size)
            for _, b in zip(range(n), loader):
                self.batches.append(b)
        self.texts = [None] * len(self.batches)
        self.initial = [None] * len(self.batches)
        self.ground_truth = load_function(c.eval.ground_truth) if c.eval.ground_truth else None
        sampling = dataclasses.replace(rollout_lib.SamplingConfig.from_config(c.rollout, s.models.policy),
                                       n_samples=c.eval.samples_per_prompt)
        pair_cfg = ml_collections.ConfigDict(c.judge.to_dict())
        pair_cfg.mode, pair_cfg.template = "pairwise", c.eval.pairwise_template
        self.pair_spec = (judging.make_spec(pair_cfg, s.judge_tokenizer, s.policy_tokenizer,
                                            sampling.stop_ids or None)
                          if c.eval.win_rate and s.judge_spec.mode != "reward_model" else None)
        models, spec, pair_spec, temperature = s.models, s.judge_spec, self.pair_spec, c.rollout.temperature

        def sample(params, prompts, mask, key):
            return rollout_lib.rollout(params, models.policy, prompts, mask, key, sampling)

        def judge(policy, frozen, roll, initial, key):
            k_score, k_pair = jax.random.split(key)
            args = (roll.prompt_tokens_bp, roll.prompt_mask_bp, roll.response_tokens_br, roll.response_mask_br)
            scores, jm = judging.score(frozen.judge, models.judge, spec, *args, k_score)
            out = {"score": scores, "criteria": jm.criterion_p_yes_bc}
            if pair_spec is not None:
                out["win"], pm = judging.score(frozen.judge, models.judge, pair_spec, *args, k_pair,
                                               responses_b_br=initial.response_tokens_br,
                                               response_b_mask_br=initial.response_mask_br)
                out["position_agree"] = pm.position_agree_b
            rmask = roll.response_mask_br.astype(jnp.float32)
            logp, _, _ = ts.response_logprobs(policy, models.policy, *args[:3], rmask, temperature)
            ref, _, _ = ts.response_logprobs(frozen.reference, models.policy, *args[:3], rmask, temperature)
            out["kl"] = jnp.sum((logp - ref) * rmask, axis=1)  # k1, sampled from the policy: unbiased
            out["length"] = rmask.sum(1)
            return out

        self._sample = jax.jit(sample)
        self._judge = jax.jit(judge)

    def evaluate(self, state: ts.TrainState, frozen: ts.Frozen, step: int, writer) -> dict[str, float]:
        if not self.batches:
            return {}
        key = jax.random.key(self.c.seed + 1)  # the same eval key every time: curves compare like with like
        per_example: dict[str, list] = {}
        rows = []
        for i, batch in enumerate(self.batches):
            k_init, k_roll, k_judge = jax.random.split(jax.random.fold_in(key, i), 3)
            tokens, mask = data_lib.to_global((batch.tokens_bp, batch.mask_bp), shd.batch_sharding(self.mesh, 1))
            if self.initial[i] is None:
                self.initial[i] = self._sample(frozen.reference, tokens, mask, k_init)
            roll = self._sample(state.params["policy"], tokens, mask, k_roll)
            # Every process sees the whole evaluation batch on the host (the arrays span all processes).
            out = jax.tree.map(gather_to_host, self._judge(state.params["policy"], frozen, roll, self.initial[i],
                                                           k_judge))
            # Rows are prompt-major (prompt * n + sample), like the rollout's.
            valid = np.repeat(gather_to_host(np.asarray(batch.valid_b)) > 0, self.c.eval.samples_per_prompt)
            prompt_tokens, response_tokens, response_mask = map(gather_to_host, (
                roll.prompt_tokens_bp, roll.response_tokens_br, roll.response_mask_br))
            prompts = self.s.policy_tokenizer.batch_decode(prompt_tokens, skip_special_tokens=True)
            responses = [self.s.policy_tokenizer.decode(t[m > 0], skip_special_tokens=True)
                         for t, m in zip(response_tokens, response_mask)]
            stopped = gather_to_host(roll.stopped_b)
            gt = self.ground_truth(prompts, responses, stopped) if self.ground_truth else {}
            for name, values in {**{k: v for k, v in out.items() if k != "criteria" and v is not None},
                                 **{f"gt/{k}": np.asarray(v) for k, v in gt.items()}}.items():
                per_example.setdefault(name, []).extend(np.asarray(values)[valid].tolist())
            if out.get("criteria") is not None:
                for j, name in enumerate(self.s.judge_spec.criterion_names):
                    per_example.setdefault(f"criterion/{name}", []).extend(out["criteria"][valid, j].tolist())
            for b in np.nonzero(valid)[0]:
                if len(rows) < self.c.eval.num_samples_logged:
                    row = {"prompt": prompts[b], "response": responses[b], "judge_score": float(out["score"][b])}
                    if out.get("criteria") is not None:
                        row["criteria"] = {n: float(out["criteria"][b, j])
                                           for j, n in enumerate(self.s.judge_spec.criterion_names)}
                    row.update({f"gt/{k}": float(np.asarray(v)[b]) for k, v in gt.items()})
                    rows.append(row)
        writer.write_samples(step, rows)
        names = {"score": "judge_score", "win": "win_rate", "kl": "kl", "length": "response_length",
                 "position_agree": "position_agreement"}
        return {f"eval/{names.get(k, k)}": float(np.mean(v)) for k, v in per_example.items()}


# ---------------------------------------------------------------------------------------------- the run
def run(c: ml_collections.ConfigDict, workdir: str) -> None:
    """Trains (or resumes) the run of config `c` in `workdir`."""
    # ---- 2 mesh, then models, state and the compiled step (born sharded)
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        s = setup(c, mesh, rules)
        train_loader, eval_loader = data_lib.load_prompts(c.data, s.policy_tokenizer, c.train.batch_size)
        log.info("process %d/%d loads %d of %d rows per batch", jax.process_index(), jax.process_count(),
                 train_loader.local_batch_size, c.train.batch_size)
        evaluator = Evaluator(c, s, eval_loader, mesh)
        state, batch_sharding = s.state, shd.batch_sharding(mesh, 1)

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
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(c.to_json_best_effort(indent=2))
        writer = metrics_lib.MetricsWriter(workdir, c.logging, c, start_step=start, total_steps=c.train.steps)
        log.info("judge path: %s; %d devices, mesh %s", s.judge_spec.path, jax.device_count(), dict(mesh.shape))
        if start == 0 and c.eval.every:
            writer.write(0, {"judge_path_is_token_space": int(s.judge_spec.path == "token_space"),
                             **evaluator.evaluate(state, s.frozen, 0, writer)})

        # ---- 5 the loop
        for step in range(start + 1, c.train.steps + 1):
            batch = data_lib.to_global(next(train_loader), batch_sharding)
            state, metrics = s.step_fn(state, s.frozen, batch.tokens_bp, batch.mask_bp)
            if c.eval.every and (step % c.eval.every == 0 or step == c.train.steps):
                metrics = {**metrics, **evaluator.evaluate(state, s.frozen, step, writer)}
            writer.write(step, metrics)
            ckpt.save(step, state, {"data": train_loader.state().to_json()}, force=step == c.train.steps)
        ckpt.close()
        writer.close()

        # ---- 6 export the trained policy as an HF folder
        if c.train.export_final:
            hf.save_model(state.params["policy"], s.models.policy, os.path.join(workdir, "final_policy"),
                          tokenizer=s.policy_tokenizer)


# ---------------------------------------------------------------------------------------------- plan mode
def matmul_params(cfg) -> int:
    """Weights a token passes through in one forward (every projection and the LM head; not the lookup)."""
    D, H, K, E, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return cfg.num_layers * (2 * D * H * E + 2 * D * K * E + 3 * D * F) + D * cfg.vocab_size


def step_flops(c: ml_collections.ConfigDict, models: ts.Models, spec: judging.JudgeSpec) -> dict[str, float]:
    """Matmul FLOPs of one step, by phase (2 per weight per token forward, 3x that for forward + backward;
    attention scores omitted). XLA's own count is not used because it counts a while-loop body once."""
    B, n = c.train.batch_size, c.rollout.n_samples
    P, R = c.data.max_prompt_len, c.rollout.max_new_tokens
    Np, Nj = matmul_params(models.policy), matmul_params(models.judge)
    rows, seq = B * n, B * n * (P + R)
    flops = {
        "rollout": 2 * Np * (B * P + rows * R),          # one prefill of the B prompts, then n x R decode steps
        "judge": 2 * Nj * rows * spec.queries_per_example * spec.max_len,
        "reference+old logprobs": 2 * 2 * Np * seq,
        "update": c.algo.epochs * 3 * 2 * Np * seq,
    }
    if c.critic.kind == "separate":
        Nc = matmul_params(models.critic or models.policy)
        flops["critic"] = 2 * Nc * seq * (1 + 3 * c.algo.epochs)
    return flops


def plan(c: ml_collections.ConfigDict, device_memory_gib: float) -> dict[str, Any]:
    """Compiles the full train step ahead of time from shapes alone (config.json files and tokenizers; no
    weights are read or allocated) on the configured mesh, and reports per-device memory, FLOPs and fit."""
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        def abstract(cfg):
            shapes = tfm.abstract_params(cfg)
            return ckpt_lib.with_shardings(shapes, shd.tree_shardings(mesh, tfm.param_logical_axes(cfg), shapes))

        def value_head(cfg):
            return {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.dtype(cfg.param_dtype),
                                                   sharding=shd.replicated(mesh)),
                    "bias": jax.ShapeDtypeStruct((), jnp.dtype(cfg.param_dtype), sharding=shd.replicated(mesh))}

        policy_folder = hf.resolve_path(c.policy.path, weights=False)
        judge_folder = hf.resolve_path(c.judge.path, weights=False)
        policy_cfg = hf.load_config(policy_folder, c.policy.dtype, c.policy.param_dtype).replace(
            scan_unroll=c.policy.scan_unroll)
        judge_cfg = hf.load_config(judge_folder, c.judge.dtype, c.judge.param_dtype)
        policy_tok, judge_tok = hf.load_tokenizer(policy_folder), hf.load_tokenizer(judge_folder)
        stop_ids = rollout_lib.SamplingConfig.from_config(c.rollout, policy_cfg).stop_ids
        spec = judging.make_spec(c.judge, judge_tok, policy_tok, stop_ids or None)
        critic_cfg = critic = None
        if c.critic.kind == "separate" and c.critic.init == "reward_model":
            critic_cfg = hf.load_config(hf.resolve_path(c.critic.path, weights=False), c.policy.dtype,
                                        c.policy.param_dtype).replace(scan_unroll=c.policy.scan_unroll)
            critic = {"backbone": abstract(critic_cfg), "head": value_head(critic_cfg)}
        judge = abstract(judge_cfg)
        if spec.mode == "reward_model":
            judge = reward_model.RewardModelParams(judge, value_head(judge_cfg))
        models = ts.Models(policy=policy_cfg, judge=judge_cfg, critic=critic_cfg)
        policy = abstract(policy_cfg)
        key = jax.eval_shape(lambda: jax.random.key(0))

        shapes = jax.eval_shape(functools.partial(ts.init_state, c, models), policy, key, critic)
        state_shardings = ts.state_shardings(c, models, mesh, shapes)
        state = ckpt_lib.with_shardings(shapes, state_shardings)
        frozen = ts.Frozen(reference=policy, judge=judge)
        step = ts.make_train_step(c, models, spec, mesh, state_shardings,
                                  jax.tree.map(lambda x: x.sharding, frozen))
        prompts = jax.ShapeDtypeStruct((c.train.batch_size, c.data.max_prompt_len), jnp.int32,
                                       sharding=shd.batch_sharding(mesh, 2))
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, prompts, prompts).compile()
        compile_s = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    gib = 2.0 ** 30
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    flops = step_flops(c, models, spec)
    report = {
        "devices": mesh.size, "mesh": dict(mesh.shape),
        "policy_params_b": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(policy)) / 1e9,
        "judge_params_b": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(judge)) / 1e9,
        "arguments_gib": mem.argument_size_in_bytes / gib, "outputs_gib": mem.output_size_in_bytes / gib,
        "aliased_gib": mem.alias_size_in_bytes / gib, "temporaries_gib": mem.temp_size_in_bytes / gib,
        "peak_gib": peak / gib, "device_memory_gib": device_memory_gib, "fits": peak / gib <= device_memory_gib,
        "tflops_per_step": sum(flops.values()) / 1e12,
        "tflops_per_step_per_device": sum(flops.values()) / 1e12 / mesh.size,
        **{f"tflops/{k}": v / 1e12 for k, v in flops.items()},
        "compile_s": compile_s,
    }
    lines = [f"plan: {report['policy_params_b']:.2f}B policy, {report['judge_params_b']:.2f}B judge "
             f"({spec.mode}), {mesh.size} devices {report['mesh']}, batch {c.train.batch_size} x "
             f"{c.rollout.n_samples} samples, prompt {c.data.max_prompt_len} + {c.rollout.max_new_tokens} tokens",
             "per-device memory (GiB):",
             f"  arguments   {report['arguments_gib']:10.4g}   (params, optimizer state, frozen models, batch)",
             f"  outputs     {report['outputs_gib']:10.4g}   ({report['aliased_gib']:.4g} of it donated in place)",
             f"  temporaries {report['temporaries_gib']:10.4g}",
             f"  peak        {report['peak_gib']:10.4g}   of {device_memory_gib:g}: "
             + ("fits" if report["fits"] else "DOES NOT FIT"),
             f"FLOPs per step: {report['tflops_per_step']:.4g} TFLOP "
             f"({report['tflops_per_step_per_device']:.4g} per device): "
             + ", ".join(f"{k} {v / 1e12:.4g}" for k, v in flops.items()),
             f"compile time: {compile_s:.1f} s"]
    print("\n".join(lines), flush=True)
    return report


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
        plan(config, _DEVICE_MEMORY.value)
        return
    maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    config_lib.validate(config)
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
