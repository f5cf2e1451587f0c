"""Benchmark: the cost of a reward that leaves the graph. The fused step (one program) against the host path with a
trivial Python reward function (rollout program -> host: judge call, decode, the function -> learn program), on
bench_step.py's shape and models (32 prompts x 4 samples, 32 + 64 tokens, GRPO, a judge of the policy's size).

Both steps are built by training's own builder from bench_step.py's config; the host one adds
reward.functions = {"trivial": "bench_host_reward:trivial"} (weight 1). After one untimed step each (compilation),
they run alternately, --steps times each, in this one process, so load from other processes falls on both alike.
Each timed step includes reading its metrics back, as the training loop does.

Usage:  python scripts/bench_host_reward.py [--steps 10]
Last line: host_reward_over_fused=<median host-path step / median fused step>.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_step import PROMPT_LEN, PROMPTS, make_prompt_texts, make_world, our_config

from rlaif_jax import builder
from rlaif_jax import config as config_lib
from rlaif_jax import sharding as shd


def trivial(prompts, completions, **columns):
    """A trivial reward: the completion's word count / 100."""
    return [len(c.split()) / 100 for c in completions]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each step kind")
    args = parser.parse_args()
    _, tokenizer, world = make_world("bench_host_reward_")
    ids = np.asarray(tokenizer(make_prompt_texts(PROMPTS * 4))["input_ids"], np.int32)
    batches = [(jnp.asarray(ids[i:i + PROMPTS]), jnp.ones((PROMPTS, PROMPT_LEN), jnp.int32))
               for i in range(0, len(ids), PROMPTS)]

    fused_c = our_config(world)
    host_c = our_config(world)
    host_c.reward.functions = {"trivial": "bench_host_reward:trivial"}
    host_c.reward.function_weights = {"trivial": 1.0}
    config_lib.validate(host_c, num_devices=host_c.mesh.data)
    mesh = shd.make_mesh(fused_c.mesh.data, 1, 1)  # our_config's mesh: every device jax has (1 unless XLA_FLAGS)
    rules = [tuple(r) for r in fused_c.mesh.rules]
    times, compile_s, host_s = {"fused": [], "host": []}, {}, []
    with shd.use_rules(rules), jax.set_mesh(mesh):
        runs = {}
        for name, c in (("fused", fused_c), ("host", host_c)):
            parts = builder.build(c, mesh, rules)
            runs[name] = [parts, jax.tree.map(jnp.copy, parts.state)]

        def step(name, i):
            parts, state = runs[name]
            tokens, mask = batches[i % len(batches)]
            t0 = time.perf_counter()
            state, metrics = parts.step_fn(state, parts.frozen, tokens, mask)
            metrics = jax.device_get(metrics)
            runs[name][1] = state
            return time.perf_counter() - t0, metrics

        for name in runs:  # the first call compiles
            compile_s[name], _ = step(name, 0)
        for i in range(1, args.steps + 1):
            for name in runs:
                t, metrics = step(name, i)
                times[name].append(t)
                if name == "host":
                    host_s.append(float(metrics["time/reward_functions_s"]))

    med = {k: statistics.median(v) for k, v in times.items()}
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    print(f"first call (compile + run) s: fused={compile_s['fused']:.2f} host={compile_s['host']:.2f}")
    for k in times:
        print(f"{k}_step_s_median={med[k]:.4f} all={fmt(times[k])}")
    print(f"host decode + function s median={statistics.median(host_s):.4f} all={fmt(host_s)}")
    pairs = [h / f for h, f in zip(times["host"], times["fused"])]
    print(f"host / fused per pair of consecutive steps: median={statistics.median(pairs):.3f} all={fmt(pairs)}")
    print(f"host_reward_over_fused={med['host'] / med['fused']:.3f}")


if __name__ == "__main__":
    main()
