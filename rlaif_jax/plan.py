"""Plan mode: the train step compiled ahead of time on simulated devices, from shapes alone.

    python -m rlaif_jax.train --config experiments/X.py --plan --plan_devices=N [--device_memory_gib=G]
                                                                                [--plan_phases] [--plan_scaling]

`plan` builds the run with `builder.build(..., weights=False)`: the model configs, judge spec, shardings and
step that training builds, from config.json and tokenizer files alone (no weights are read or allocated). It
compiles the step on the configured mesh and prints per-device memory (XLA's memory analysis of the compiled
program), matmul FLOPs per step by phase and whether the step fits in one device's memory.

With the host path (the judge's tokenizer differs from the policy's, or Python reward functions) a step is three
programs, each compiled here on its own: the rollout, the judge forward over the judge rows (`max_len` judge
tokens each; the host work between the programs, re-tokenisation and reward functions, is not planned) and the
learn phase. Each program's memory is
printed; the step's peak is the largest of theirs.

With --plan_phases the fused step's phases are also compiled each on its own (`compile_phases`: rollout, judge,
reference/critic forwards, learn) and their memory printed, to show which phase sets the peak and what the
config.compute memory settings (remat, attention, logprob_chunk, forward_microbatches) change.

With --plan_scaling the step is also compiled on half the devices (the fsdp axis halved, else the data axis):
the per-device peak must fall as devices are added, and the report says whether it does. Where it does not, some
large buffer is replicated at that mesh size (issue 17: an 8B policy and judge on 64 devices once planned larger
than on 16).
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax import algorithms, builder, reward_functions
from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import judging
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts

GIB = 2.0 ** 30


def matmul_params(cfg) -> int:
    """Weights a token passes through in one forward (every projection and the LM head; not the lookup)."""
    D, H, K, E, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    mlp = (3 if cfg.gated_mlp else 2) * D * F  # gate, up, down; or up, down
    return cfg.num_layers * (2 * D * H * E + 2 * D * K * E + mlp) + D * cfg.vocab_size


def step_flops(c: ml_collections.ConfigDict, models: ts.Models, spec: judging.JudgeSpec) -> dict[str, float]:
    """Matmul FLOPs of one step, by phase (2 per weight per token forward, 3x that for forward + backward;
    attention scores omitted). XLA's own count is not used because it counts a while-loop body once."""
    B, n = c.train.batch_size, c.rollout.n_samples
    P, R = c.data.max_prompt_len, c.rollout.max_new_tokens
    # A judge ensemble's members each run the judge forward over the same rows.
    Np, Nj = matmul_params(models.policy), sum(matmul_params(m) for m in (models.judge, *models.extra_judges))
    rows = B * n
    dpo = c.algo.estimator == "online_dpo"
    seq = (2 * B if dpo else rows) * (P + R)  # online_dpo learns from one (chosen, rejected) pair per prompt
    flops = {
        "rollout": 2 * Np * (B * P + rows * R),          # one prefill of the B prompts, then n x R decode steps
        "judge": 0 if spec.mode == "remote" else 2 * Nj * ts.judged_examples(c) * spec.queries_per_example * spec.max_len,
        "update": c.algo.epochs * 3 * 2 * Np * seq,
    }
    # Before the update (train_step.pre_update_forwards): the reference's forward, skipped when the KL is weighted by
    # a fixed 0 (online_dpo always runs it, for the chosen and rejected rows); the "old" log-probs are the sampler's,
    # with no forward of their own; a value-head critic reads the policy's hidden states, a forward of the policy.
    if dpo or c.reward.kl_coef != 0 or c.reward.adaptive_kl:
        flops["reference"] = 2 * Np * seq
    if c.critic.kind == "value_head":
        flops["value-head forward"] = 2 * Np * seq
    if c.reward.pairwise_baseline == "reference_sample":  # the reference policy's one sample per prompt
        flops["baseline rollout"] = 2 * Np * B * (P + R)
    if c.critic.kind == "separate":
        Nc = matmul_params(models.critic or models.policy)
        flops["critic"] = 2 * Nc * seq * (1 + 3 * c.algo.epochs)
    return flops


def memory_gib(compiled) -> dict[str, float]:
    """Per-device memory of a compiled program: arguments, outputs (and the part aliased to donated arguments),
    temporaries, and the peak they add up to."""
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"arguments_gib": mem.argument_size_in_bytes / GIB, "outputs_gib": mem.output_size_in_bytes / GIB,
            "aliased_gib": mem.alias_size_in_bytes / GIB, "temporaries_gib": mem.temp_size_in_bytes / GIB,
            "peak_gib": peak / GIB}


def step_data(c: ml_collections.ConfigDict, prompts_bp: jax.ShapeDtypeStruct) -> tuple:
    """The step's data arguments as shapes: prompts and mask, then references and mask with data.reference_field."""
    references_bf = jax.ShapeDtypeStruct((prompts_bp.shape[0], c.data.max_reference_len), jnp.int32,
                                         sharding=prompts_bp.sharding)
    return (prompts_bp, prompts_bp) + ((references_bf, references_bf) if c.data.reference_field else ())


def _host_terms(c: ml_collections.ConfigDict, roll) -> reward_functions.HostTerms:
    """The shapes of the reward functions' terms (`reward_functions.HostTerms`) the learn program receives."""
    term_b = jax.ShapeDtypeStruct(roll.stopped_b.shape, jnp.float32, sharding=roll.stopped_b.sharding)
    return reward_functions.HostTerms(*({name: term_b for name in c.reward.functions},) * 2)


def compile_host_path(c: ml_collections.ConfigDict, parts: builder.RunParts, prompts_bp) -> dict[str, Any]:
    """The host path's three programs compiled from shapes, each fed what the one before hands it in training:
    {"rollout": compiled, "judge forward": compiled, "learn": compiled}."""
    step, models, spec = parts.step_fn, parts.models, parts.judge_spec
    rollout = step.sample.lower(parts.state, parts.frozen, *step_data(c, prompts_bp)).compile()
    roll, _, keys = ckpt_lib.with_shardings(rollout.out_info, rollout.output_shardings)
    examples = ts.judged_examples(c)
    if spec.mode == "remote":  # no judge program: the endpoint's scores and metrics come from the host
        scores_b = jax.ShapeDtypeStruct((examples,), jnp.float32)
        summary = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in judging.remote.RemoteStats().metrics()}
        learn = step.learn.lower(parts.state, parts.frozen, roll, scores_b, summary, _host_terms(c, roll),
                                 keys).compile()
        return {"rollout": rollout, "learn": learn}
    # The judge rows come from the host: re-tokenised, padded to max_len, one query per row, query-major.
    queries = examples * spec.queries_per_example
    tokens_nt = jax.ShapeDtypeStruct((queries, spec.max_len), jnp.int32)
    truncated_n = jax.ShapeDtypeStruct((queries,), jnp.bool_)
    principle_index_b = jax.eval_shape(functools.partial(
        judging.sample_principles, spec, batch=examples, rows_per_prompt=examples // c.train.batch_size), keys[1])
    # One judge forward per judge of an ensemble, each its own program (the host path calls them one by one).
    members = ts.judge_members(models, parts.frozen.judge, parts.frozen.extra_judges)
    judges = {f"judge forward{f' {k}' if k else ''}": judging.score_queries_jit.lower(
        params, cfg, spec, tokens_nt, tokens_nt, truncated_n, principle_index_b, keys[1]).compile()
        for k, (params, cfg) in enumerate(members)}
    judge = judges["judge forward"]
    scores_b, judge_metrics = ckpt_lib.with_shardings(judge.out_info, judge.output_shardings)
    if len(members) > 1:  # the ensemble's aggregate and its members' scores (`judging.ensemble.combine`)
        judge_metrics = judge_metrics.replace(
            member_scores_kb=jax.ShapeDtypeStruct((len(members), examples), jnp.float32))
    if c.algo.estimator == "online_dpo":  # the host judge hands on each response's win rate, not the pairs'
        scores_b = jax.eval_shape(functools.partial(algorithms.win_rates, n_samples=c.rollout.n_samples), scores_b)
    summary = jax.eval_shape(lambda m: m.summary(spec), judge_metrics)
    learn = step.learn.lower(parts.state, parts.frozen, roll, scores_b, summary, _host_terms(c, roll), keys).compile()
    return {"rollout": rollout, **judges, "learn": learn}


def compile_phases(c: ml_collections.ConfigDict, parts: builder.RunParts, mesh: jax.sharding.Mesh, prompts_bp
                   ) -> dict[str, Any]:
    """The fused step's phases, each compiled alone with the step's shardings and fed the shapes the phase before
    hands it: {"rollout": (sampling, with the judge's inputs), "judge": (the token-space judge), "reference/critic":
    (phase 3's forwards, `train_step.pre_update_forwards`; not for online_dpo, whose reference forward reads the
    judge's pairs), "learn": (phases 3-6, the update included)}. The programs are the host path's
    (`train_step.make_host_judge_step`) with the judge jitted in token space."""
    models, spec = parts.models, parts.judge_spec
    frozen_shardings = jax.tree.map(lambda x: x.sharding, parts.frozen)
    step = ts.make_host_judge_step(c, models, spec, mesh, parts.state_shardings, frozen_shardings,
                                   parts.policy_tokenizer, parts.judge_tokenizer)
    rollout = step.sample.lower(parts.state, parts.frozen, *step_data(c, prompts_bp)).compile()
    roll, inputs, keys = ckpt_lib.with_shardings(rollout.out_info, rollout.output_shardings)

    def judge(frozen, roll, inputs, key):
        scores_b, metrics = ts.judge_phase(c, ts.token_space_score_fn(c, models, spec, frozen.judge,
                                                                      extra_judges=frozen.extra_judges), roll, key,
                                           inputs)
        return scores_b, metrics.summary(spec)

    judge = jax.jit(judge).lower(parts.frozen, roll, inputs, keys[1]).compile()
    scores_b, summary = ckpt_lib.with_shardings(judge.out_info, judge.output_shardings)
    programs = {"rollout": rollout, "judge": judge}
    if c.algo.estimator != "online_dpo":
        forwards = jax.jit(functools.partial(ts.pre_update_forwards, c, models))
        programs["reference/critic"] = forwards.lower(parts.state, parts.frozen, roll).compile()
    programs["learn"] = step.learn.lower(parts.state, parts.frozen, roll, scores_b, summary, _host_terms(c, roll),
                                         keys).compile()
    return programs


def compile_step(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, phases: bool = False) -> tuple:
    """(parts, {name: compiled program} of the step, {name: compiled phase} with `phases`, compile seconds) on
    `mesh`, from shapes alone."""
    with shd.use_rules(rules), jax.set_mesh(mesh):
        parts = builder.build(c, mesh, rules, weights=False)
        prompts_bp = jax.ShapeDtypeStruct((c.train.batch_size, c.data.max_prompt_len), jnp.int32,
                                          sharding=shd.batch_sharding(mesh, 2))
        t0 = time.perf_counter()
        fused = not isinstance(parts.step_fn, ts.HostJudgeStep)
        if fused:
            programs = {"step": parts.step_fn.lower(parts.state, parts.frozen, *step_data(c, prompts_bp)).compile()}
        else:
            programs = compile_host_path(c, parts, prompts_bp)
        compile_s = time.perf_counter() - t0
        phase_programs = compile_phases(c, parts, mesh, prompts_bp) if phases and fused else {}
    return parts, programs, phase_programs, compile_s


def halved_mesh(c: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, jax.sharding.Mesh]:
    """The config and mesh with half the devices: the fsdp axis halved (the data axis if fsdp is 1), on the first
    half of the devices. What `scaling` compares against."""
    half = c.copy_and_resolve_references()
    with half.unlocked():
        if half.mesh.fsdp % 2 == 0:
            half.mesh.fsdp //= 2
        elif half.mesh.data % 2 == 0:
            half.mesh.data //= 2
        else:
            raise ValueError(f"--plan_scaling halves the fsdp or data axis: mesh {dict(c.mesh)} has neither even")
    m = half.mesh
    return half, shd.make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[:m.data * m.fsdp * m.tensor])


def plan(c: ml_collections.ConfigDict, device_memory_gib: float, phases: bool = False, scaling: bool = False
         ) -> dict[str, Any]:
    """Compiles the train step ahead of time from shapes alone on the configured mesh, prints per-device memory,
    FLOPs and fit, and returns them. With `phases` (one fused program), also each phase compiled alone
    (`compile_phases`): which phase sets the peak. With `scaling`, also the step on half the devices
    (`halved_mesh`): the per-device peak must fall as devices are added; where it does not, some large buffer
    is replicated rather than sharded (report["scaling_falls"])."""
    mesh, rules = shd.mesh_from_config(c.mesh)
    parts, programs, phase_programs, compile_s = compile_step(c, mesh, rules, phases)

    memory = {name: memory_gib(compiled) for name, compiled in programs.items()}
    largest = max(memory.values(), key=lambda m: m["peak_gib"])
    spec, flops = parts.judge_spec, step_flops(c, parts.models, parts.judge_spec)
    report = {
        "devices": mesh.size, "mesh": dict(mesh.shape), "judge_mode": spec.mode, "judge_path": spec.path,
        "policy_params_b": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts.frozen.reference)) / 1e9,
        # Every judge of an ensemble (config.judge.ensemble_paths) counted.
        "judge_params_b": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
            (parts.frozen.judge, parts.frozen.extra_judges))) / 1e9,
        "judges": 1 + len(parts.frozen.extra_judges),
        **largest, "device_memory_gib": device_memory_gib, "fits": largest["peak_gib"] <= device_memory_gib,
        "tflops_per_step": sum(flops.values()) / 1e12,
        "tflops_per_step_per_device": sum(flops.values()) / 1e12 / mesh.size,
        **{f"tflops/{k}": v / 1e12 for k, v in flops.items()},
        "compile_s": compile_s,
    }
    if len(memory) > 1:
        report["programs"] = memory
    if phase_programs:
        report["phases"] = {name: memory_gib(compiled) for name, compiled in phase_programs.items()}
    if scaling:
        half, half_mesh = halved_mesh(c)
        _, half_programs, _, _ = compile_step(half, half_mesh, rules)
        report["half_devices"] = half_mesh.size
        report["half_peak_gib"] = max(memory_gib(p)["peak_gib"] for p in half_programs.values())
        report["scaling_falls"] = report["peak_gib"] < report["half_peak_gib"]
    print_report(c, report, flops)
    return report


def print_report(c: ml_collections.ConfigDict, report: dict[str, Any], flops: dict[str, float]) -> None:
    fit = f"of {report['device_memory_gib']:g}: " + ("fits" if report["fits"] else "DOES NOT FIT")
    judges = f" ({report['judges']} judges, an ensemble)" if report["judges"] > 1 else ""
    lines = [f"plan: {report['policy_params_b']:.2f}B policy, {report['judge_params_b']:.2f}B judge{judges} "
             f"({report['judge_mode']}, {report['judge_path']} path), {report['devices']} devices {report['mesh']}, "
             f"batch {c.train.batch_size} x {c.rollout.n_samples} samples, "
             f"prompt {c.data.max_prompt_len} + {c.rollout.max_new_tokens} tokens"]
    def table(programs: dict[str, dict[str, float]]) -> list[str]:
        return [f"  {'program':<16} {'arguments':>10} {'outputs':>10} {'donated':>10} {'temporaries':>12} "
                f"{'peak':>10}"] + [
            f"  {name:<16} {m['arguments_gib']:10.4g} {m['outputs_gib']:10.4g} {m['aliased_gib']:10.4g} "
            f"{m['temporaries_gib']:12.4g} {m['peak_gib']:10.4g}" for name, m in programs.items()]

    if "programs" in report:
        lines += ["per-device memory (GiB) of the host path's programs, each compiled alone (the host work between "
                  "them is not planned):", *table(report["programs"])]
        lines.append(f"  peak (the largest program's) {report['peak_gib']:.4g}   {fit}")
    else:
        lines += ["per-device memory (GiB):",
                  f"  arguments   {report['arguments_gib']:10.4g}   (params, optimizer state, frozen models, batch)",
                  f"  outputs     {report['outputs_gib']:10.4g}   ({report['aliased_gib']:.4g} of it donated in "
                  "place)",
                  f"  temporaries {report['temporaries_gib']:10.4g}",
                  f"  peak        {report['peak_gib']:10.4g}   {fit}"]
    if "phases" in report:
        lines += ["per-device memory (GiB) of each phase compiled alone, with the step's shardings (the step above "
                  "is one program: its peak is not their sum; learn includes reference/critic):",
                  *table(report["phases"])]
    if "half_devices" in report:
        verdict = "falls" if report["scaling_falls"] else (
            "DOES NOT FALL: a large buffer is replicated, not sharded (see --plan_phases)")
        lines.append(f"scaling: per-device peak {report['half_peak_gib']:.4g} GiB on {report['half_devices']} "
                     f"devices -> {report['peak_gib']:.4g} GiB on {report['devices']}: {verdict}")
    lines += [f"FLOPs per step: {report['tflops_per_step']:.4g} TFLOP "
              f"({report['tflops_per_step_per_device']:.4g} per device): "
              + ", ".join(f"{k} {v / 1e12:.4g}" for k, v in flops.items()),
              f"compile time: {report['compile_s']:.1f} s"]
    print("\n".join(lines), flush=True)
