"""Benchmark: our jitted rollout vs `transformers` generate (PyTorch CPU), same model, same machine, one process.

Model: a tiny random Llama (vocab 512, hidden 256, MLP 688 = 8/3 * hidden rounded up to a multiple of 16 as
Llama sizes it, 4 layers, 4 heads of 64, 2 KV heads, f32). Work: batch 32, prompt 32, 64 new tokens sampled
at temperature 1 (no top-k / top-p), every row forced to run all 64 tokens (HF: min_new_tokens=64; ours: no
stop ids). Timings are medians of warm runs, ours and HF's alternated so that load from other processes on a shared
machine falls on both alike. Each timed run directly follows an untimed run of the same side and setting: a run
right after the other side's is slower (its weights and buffers were pushed out of the CPU caches; measured here:
our first run after HF's ~10% slower than the next), and this way neither side pays for the other. Our compile time
is reported apart.

Also prints the achieved FLOP/s of our rollout as a fraction of this machine's f32 matmul peak, measured
here with a 2048^3 matmul in JAX (and in torch; the larger of the two is the peak). FLOPs are counted
analytically (useful work only): 2 * (matmul params) per token, plus attention 4 * H * E per (query, real key)
pair, plus the LM head on the last prompt position and on each generated position.

Host diagnostics (`HostCounters`, one line per side): cores used, the system-time share of the CPU time, page
faults and context switches per second, the load average, over the timed runs, and whether malloc keeps freed memory
(rlaif_jax/host_memory.py: off unless RLAIF_JAX_KEEP_FREED_MEMORY=1; both sides run in this process, so both get
the same setting): a slow run shows whether neighbours took the cores or temporaries were faulted in.

Ours samples data parallel over --cpu_devices XLA:CPU devices (default one per core: `use_cpu_devices` says why),
transformers on torch threads (the faster of os.cpu_count() and 1).

Usage:  python scripts/bench_rollout.py [--repeats 5]
Last line: speedup_vs_transformers=<our tokens/s / HF tokens/s>.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from rlaif_jax import host_memory
from rlaif_jax import rollout as rl
from rlaif_jax import sharding as shd
from rlaif_jax.models import hf

VOCAB, HIDDEN, MLP, LAYERS, HEADS, KV_HEADS = 512, 256, 688, 4, 4, 2
BATCH, PROMPT, NEW = 32, 32, 64


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class HostCounters:
    """What the host did while a side of the benchmark ran, to explain a slow run: accumulates, over every
    `with counters:` block, wall time, this process's CPU time (all threads), minor / major page faults and
    voluntary / involuntary context switches (getrusage), and the 1-minute load average seen at each entry.
    CPU time well under wall x threads, many involuntary switches and a load above the core count say that
    other processes took the cores; many page faults per second, with system time a large share of the CPU time,
    say fresh temporaries are being faulted in (the kernel zeroes each page: see rlaif_jax/host_memory.py, whose
    state the line prints)."""

    def __init__(self, name: str):
        self.name, self.wall, self.cpu, self.system = name, 0.0, 0.0, 0.0
        self.minflt = self.majflt = self.nvcsw = self.nivcsw = 0
        self.loads: list[float] = []

    def __enter__(self):
        import resource
        self._t, self._r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        self.loads.append(os.getloadavg()[0])
        return self

    def __exit__(self, *exc):
        import resource
        r, r0 = resource.getrusage(resource.RUSAGE_SELF), self._r
        self.wall += time.perf_counter() - self._t
        self.cpu += (r.ru_utime - r0.ru_utime) + (r.ru_stime - r0.ru_stime)
        self.system += r.ru_stime - r0.ru_stime
        self.minflt += r.ru_minflt - r0.ru_minflt
        self.majflt += r.ru_majflt - r0.ru_majflt
        self.nvcsw += r.ru_nvcsw - r0.ru_nvcsw
        self.nivcsw += r.ru_nivcsw - r0.ru_nivcsw

    def line(self) -> str:
        wall = max(self.wall, 1e-9)
        return (f"host[{self.name}] wall_s={self.wall:.2f} cores_used={self.cpu / wall:.2f}/{os.cpu_count()} "
                f"system_share_of_cpu={self.system / max(self.cpu, 1e-9):.3f} "
                f"minor_faults_per_s={self.minflt / wall:.0f} major_faults={self.majflt} "
                f"malloc_keeps_freed_memory={host_memory.state} "
                f"involuntary_switches_per_s={self.nivcsw / wall:.0f} voluntary_switches_per_s={self.nvcsw / wall:.0f} "
                f"load1={min(self.loads, default=0):.2f}-{max(self.loads, default=0):.2f}")


# Programs a benchmark can start beside itself (--neighbours N --neighbour_kind K), to reproduce a busy host of this
# kind on a quiet one and see which side suffers: "spin" takes a core (a Python busy loop), "stream" takes memory
# bandwidth and the shared cache (copies of a 256 MiB array, as a neighbour's large tensors would).
NEIGHBOUR_PROGRAMS = {
    "spin": "while True: pass",
    "stream": "import numpy as np\na = np.ones(2**25); b = np.empty_like(a)\nwhile True: np.copyto(b, a)",
}


class Neighbours:
    """`with Neighbours(n, kind):` runs n neighbour processes (NEIGHBOUR_PROGRAMS[kind]) for the block's duration;
    they are killed on exit, however the block ends."""

    def __init__(self, n: int, kind: str):
        self.n, self.kind, self.procs = n, kind, []

    def __enter__(self):
        import subprocess
        import sys
        self.procs = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR_PROGRAMS[self.kind]])
                      for _ in range(self.n)]
        if self.n:
            print(f"neighbours: {self.n} x {self.kind} started", flush=True)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def add_neighbour_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--neighbours", type=int, default=0,
                        help="start this many neighbour processes for the whole benchmark (a busy host on purpose)")
    parser.add_argument("--neighbour_kind", choices=sorted(NEIGHBOUR_PROGRAMS), default="spin")


def add_cpu_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu_devices", type=int, default=os.cpu_count(),
                        help="XLA:CPU devices our side runs data parallel over (default: one per core; README, "
                             "\"Performance\")")


def use_cpu_devices(n: int) -> None:
    """Split this host into n XLA:CPU devices; call before jax's first computation (the backend reads XLA_FLAGS
    when it starts). Our side then runs data parallel, each device on its own share of the rows: measured on a
    2-core host (with RLAIF_JAX_KEEP_FREED_MEMORY's settings), one device per core made the GRPO step 16% faster
    (2.32 -> 1.95 s) than one device whose every op is split over both cores by the intra-op pool, whose per-op
    wake-ups and waits the small ops of decoding and of a 256-wide model cannot amortise; 4 devices gave 2.38 s
    and 8 gave 3.07 s (README, "Performance")."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    got = len(jax.devices())
    if got != n:
        raise RuntimeError(f"asked for {n} XLA:CPU devices, jax has {got}: its backend started before use_cpu_devices")


def python_loop_speed(repeats: int = 3) -> float:
    """Million iterations per second of a plain Python loop: the host's scalar speed. Printed beside the matmul
    peak: a low peak with a normal loop speed says the vector (FMA) units are slow or shared on this host (a busy
    sibling hyperthread, throttling), which hurts FLOP-bound code (ours: about half of the peak) far more than
    dispatch-bound code (torch eager at these sizes), so the ratios fall (README, "Performance")."""
    def loop():
        total = 0
        for i in range(2_000_000):
            total += i
        return total
    best, _ = median_time(loop, repeats)
    return 2.0 / best


def matmul_peak(repeats: int) -> tuple[float, float]:
    """f32 FLOP/s of a 2048^3 matmul in JAX and in torch (median of `repeats`)."""
    n = 2048
    flops = 2 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    t_jax, _ = median_time(lambda: mm(a, b).block_until_ready(), repeats)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(ta, tb)
    t_torch, _ = median_time(lambda: torch.matmul(ta, tb), repeats)
    return flops / t_jax, flops / t_torch


def rollout_flops(cfg) -> float:
    """Useful FLOPs of one rollout (see module docstring)."""
    D, H, K, E, F, V, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size, cfg.num_layers)
    per_token_layers = 2 * L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F)
    lm_head = 2 * D * V
    attn_per_pair = 4 * H * E * L  # q.k and p.v
    prefill = BATCH * PROMPT * per_token_layers + BATCH * attn_per_pair * PROMPT * (PROMPT + 1) / 2
    fed = NEW - 1  # the last sampled token is not fed back
    decode = BATCH * fed * per_token_layers + BATCH * attn_per_pair * sum(PROMPT + t + 1 for t in range(fed))
    heads = BATCH * NEW * lm_head
    return prefill + decode + heads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    add_neighbour_args(parser)
    add_cpu_device_args(parser)
    args = parser.parse_args()
    use_cpu_devices(args.cpu_devices)
    with Neighbours(args.neighbours, args.neighbour_kind):
        run(args)


def run(args):
    torch.set_num_threads(os.cpu_count())
    print(f"devices: jax={jax.devices()} cpu_count={os.cpu_count()} load_avg={os.getloadavg()}")

    # --- one model, saved by HF, loaded by us
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tempfile.mkdtemp(prefix="bench_rollout_")
    model.save_pretrained(folder)
    cfg, params = hf.load_model(folder)

    rng = np.random.RandomState(0)
    prompts = rng.randint(3, VOCAB, size=(BATCH, PROMPT)).astype(np.int32)
    mask = np.ones((BATCH, PROMPT), np.int32)
    tokens_per_run = BATCH * NEW

    # --- ours: data parallel over the XLA:CPU devices (`use_cpu_devices`), the weights replicated
    devices = len(jax.devices())
    if BATCH % devices:
        raise SystemExit(f"--cpu_devices {devices} does not divide the batch of {BATCH} rows")
    mesh = shd.make_mesh(devices, 1, 1)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sc = rl.SamplingConfig(max_new_tokens=NEW, temperature=1.0, stop_ids=())
    fn = jax.jit(rl.rollout, static_argnums=(1, 5))
    p_dev, m_dev = jax.device_put(prompts, rows), jax.device_put(mask, rows)
    t0 = time.perf_counter()
    with shd.use_rules(shd.DEFAULT_RULES), jax.set_mesh(mesh):
        compiled = fn.lower(params, cfg, p_dev, m_dev, jax.random.key(0), sc).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(params, p_dev, m_dev, jax.random.key(0))
    jax.block_until_ready(out)
    assert int(out.lengths_b.min()) == NEW, "every row must run the full budget"
    keys = iter(jax.random.split(jax.random.key(1), 1000))

    def ours_run():
        jax.block_until_ready(compiled(params, p_dev, m_dev, next(keys)).response_tokens_br)

    # --- transformers generate
    ids, attn = torch.tensor(prompts, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=NEW, max_new_tokens=NEW,
               pad_token_id=0, eos_token_id=2)

    def hf_run():
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=attn, **gen)
        assert seq.shape == (BATCH, PROMPT + NEW), seq.shape

    # HF at os.cpu_count() threads (the setting) and at 1 thread: on a loaded machine torch's OpenMP
    # barriers wait for descheduled threads and multi-threaded generate slows down many times over, so the
    # baseline is the faster of the two (the conservative choice for our ratio).
    thread_counts = sorted({os.cpu_count(), 1}, reverse=True)

    def hf_run_with(threads):
        torch.set_num_threads(threads)
        hf_run()

    # Alternate the sides so that load from other processes falls on all alike; before each timed run, one
    # untimed run of the same side and setting (see the module docstring).
    ours_all, hf_all = [], {t: [] for t in thread_counts}
    ours_host, hf_host = HostCounters("ours"), {t: HostCounters(f"hf_threads={t}") for t in thread_counts}
    for _ in range(args.repeats):
        ours_run()
        with ours_host:
            ours_all.append(median_time(ours_run, 1)[0])
        for threads in thread_counts:
            hf_run_with(threads)
            with hf_host[threads]:
                hf_all[threads].append(median_time(lambda: hf_run_with(threads), 1)[0])
    torch.set_num_threads(os.cpu_count())
    ours_s = statistics.median(ours_all)
    hf_by_threads = {t: statistics.median(v) for t, v in hf_all.items()}
    best_threads = min(hf_by_threads, key=hf_by_threads.get)
    hf_s = hf_by_threads[best_threads]

    # --- peak and utilisation
    peak_jax, peak_torch = matmul_peak(args.repeats)
    peak = max(peak_jax, peak_torch)
    flops = rollout_flops(cfg)

    ours_tps, hf_tps = tokens_per_run / ours_s, tokens_per_run / hf_s
    print(f"model: llama vocab={VOCAB} hidden={HIDDEN} mlp={MLP} layers={LAYERS} heads={HEADS} kv_heads={KV_HEADS} "
          f"f32; batch={BATCH} prompt={PROMPT} new_tokens={NEW}; ours on {devices} XLA:CPU devices (data parallel), "
          f"transformers on torch threads as below")
    print(f"ours_compile_s={compile_s:.2f}")
    print(f"ours_run_s_median={ours_s:.4f} all={[round(t, 4) for t in ours_all]}")
    for t in thread_counts:
        print(f"hf_run_s_median[torch_threads={t}]={hf_by_threads[t]:.4f} all={[round(x, 4) for x in hf_all[t]]}")
    print(f"hf_baseline=torch_threads={best_threads}")
    print(f"ours_tokens_per_s={ours_tps:.1f}")
    print(f"transformers_tokens_per_s={hf_tps:.1f}")
    print(f"matmul_peak_gflops jax={peak_jax / 1e9:.1f} torch={peak_torch / 1e9:.1f} "
          f"python_loop_mops={python_loop_speed():.1f}")
    for counters in (ours_host, *hf_host.values()):
        print(counters.line())
    print(f"rollout_gflop={flops / 1e9:.3f} ours_gflops={flops / ours_s / 1e9:.2f} "
          f"ours_fraction_of_peak={flops / ours_s / peak:.3f} hf_fraction_of_peak={flops / hf_s / peak:.3f}")
    pairs = statistics.median(h / o for h, o in zip(hf_all[best_threads], ours_all))
    print(f"speedup_min_over_min={min(hf_all[best_threads]) / min(ours_all):.2f} speedup_median_of_pairs={pairs:.2f}")
    print(f"speedup_vs_transformers={ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
