"""Benchmark: our compiled GRPO train step vs TRL's `GRPOTrainer` (PyTorch CPU), same models, same machine, one process.

Workload (both sides): the tiny random Llama of bench_rollout.py (vocab 512, hidden 256, MLP 688, 4 layers, 4 heads
of 64, 2 KV heads, f32) as the policy, a second one (another seed) as the judge; 32 prompts of 32 tokens (BOS + 31
words) x 4 generations = 128 completions of exactly 64 tokens sampled at temperature 1 (no top-k / top-p); the judge
scores each (prompt, completion) pointwise with the template TEMPLATE (one batched forward, expected score over the
score tokens "1".."5" rescaled to [-1, 1]); GRPO advantages (group mean / std), PPO-clip token-mean (DAPO) loss,
beta = 0, one epoch, one minibatch: one AdamW update from all 128 completions per step.

How the sides are matched (and where they still differ):
  * Full-length responses. Ours: rollout.stop_ids = [VOCAB], an id the policy can never sample, so no row stops.
    TRL: generation_kwargs min_new_tokens=64, which suppresses EOS for the whole budget (HF's
    MinNewTokensLengthLogitsProcessor). Either way every completion is 64 tokens.
  * Beta 0. Ours: reward.kl_coef=0 with kl_in_reward=True, so the reward is the judge score exactly (0 * kl), and
    the learn phase then skips the reference forward; its "old" log-probs are the sampler's own. TRL: beta=0.0
    (it then never runs a reference model) and, with num_iterations=1, logp.detach() as the old log-probs. Each
    side runs one training forward and backward per update.
  * Shared prompts. Ours runs each prompt once for its 4 samples, in the rollout's prefill, in the judge's forward
    (the template's part up to the response) and in the training forward / backward (`tfm.forward_shared_prefix`);
    TRL runs every completion's prompt. The FLOP counts below count what each side executes.
  * One optimizer step per generation, its gradient summed over MICRO_BATCHES micro-batches of 32 completions
    (the same gradient as one batch: tests/test_train_step.py checks ours): ours algo.epochs=1, algo.minibatches=1,
    optim.grad_accum=4. On XLA:CPU this bounds the temporaries the update maps and faults in afresh on every call
    (531 -> 163 MiB per device; see "Host diagnostics" below). TRL is run both ways, per_device_train_batch_size=128
    (counted in completions) with gradient_accumulation_steps=1, and 32 with 4; either way generation_batch_size =
    128 = 32 prompts x 4, generated once per optimizer step; the fastest run is the baseline (Timing, below).
  * Judge. Ours: token-space templating inside the compiled step. TRL: a reward function (TRL's signature:
    prompts, completions -> list[float]) that renders the same template as text, tokenises it with the same
    tokenizer, runs one batched forward of the judge through transformers (only the last position's logits) and
    returns the same pointwise expected score. neutral_threshold is 0 on ours (a random judge puts ~1% of its mass
    on the score tokens, below the default 0.05, which would make every score neutral).
  * The same method. Advantages: ours algo.estimator="grpo" with its defaults (group std with Bessel's correction,
    grpo_std_eps 1e-4, no whitening) is TRL's scale_rewards="group" formula (r - mean) / (std + 1e-4). Loss:
    ours algo.loss_agg="token_mean" is TRL's loss_type="dapo" (sum over the valid tokens / their count), with PPO
    clip 0.2 on both sides (TRL epsilon=0.2). tests/test_conformance.py checks these formulas against TRL's code.
  * Other knobs set alike: learning rate 1e-6, AdamW b1 0.9 b2 0.999 eps 1e-8, no weight decay, clip grad norm 1,
    no missing-EOS penalty, no score normalisation.
  * Our compile settings for this size: compute.scan_unroll=4 unrolls the training forward's 4 layers (the default
    1 keeps compile time flat in depth for real models; unrolled, XLA:CPU's backward is ~10% faster here).

Timing. Everything of ours is compiled first (the fused step, and each phase compiled alone with the same shapes:
rollout, judge, update = learn_phase; and the judge phase with compute.share_prompt_forward=False, every judge row
running its prompt part, the reference for the judge's shared prompts). Then TRL trains for --warmup + --steps
steps; a TrainerCallback records each TRL step from on_step_begin to on_step_end (generation, reward, loss,
backward, optimizer), and after every TRL step runs one fused step of ours and one call of each phase alone (the
per-row judge right after the judge), so load from other processes on this shared machine falls on both sides
alike. Reported: medians (and every raw time) of the steps after the warm-up. TRL is run
once per torch thread count in {os.cpu_count(), 1} (multi-threaded torch suffers badly on a loaded machine) and
gradient accumulation in {1, MICRO_BATCHES}; the fastest of these runs is the baseline, the conservative choice for
our ratio. speedup_vs_trl = median TRL step of the baseline run /
median of our fused steps interleaved with that same run (same load window); the ratio over all our rounds, the
best-vs-best ratio and the median of per-step pairs are printed too.

FLOPs are counted analytically, as executed by each side (model matmuls: 2 * matmul params per token, attention
4 * H * E per (query, real key) pair, the LM head where logits are used, backward = 2 x forward; in our judge's last
layer, queries, attention, o projection and MLP at the read position only, `tfm.last_hidden`). The matmul peak is
measured in this run (bench_rollout.matmul_peak, 2048^3 in JAX and torch, the larger of the two, best of several
measurements spread over the run). XLA's own cost_analysis of each compiled phase is printed for reference only: it
counts a while_loop / scan body once, and the layers run as a lax.scan, so it shows about 1 / num_layers of the
work (and the rollout's decode loop once).

Host diagnostics (bench_rollout.HostCounters), one line per side over its timed steps: cores used, the system-time
share of the CPU time, page faults and context switches per second, the load average, and whether malloc keeps freed
memory (rlaif_jax/host_memory.py: off unless RLAIF_JAX_KEEP_FREED_MEMORY=1; TRL runs in this process, so it gets
the same setting): a slow run shows whether neighbours took the cores (cores used below the thread count, many
involuntary switches, load above the core count) or fresh temporaries were faulted in (many faults, a large system
share).

Our side runs data parallel over --cpu_devices XLA:CPU devices (default one per core: bench_rollout.use_cpu_devices
says why); TRL over torch threads, the fastest run as above.

--algo ppo: our PPO step alone (no TRL run), timed and counted phase by phase. The same models and shapes, the
judge as a reward model (judge.mode="reward_model": the judge's backbone with a fixed value head, written to a
reward-model folder by `write_reward_model`; its template is TEMPLATE, its rows JUDGE_LEN tokens), a frozen
reference (reward.kl_coef 0.05, the k1 KL in the reward, so the reference forward runs), a separate critic
initialised from that reward model (critic.kind="separate", critic.init="reward_model") and GAE (gamma 1, lambda
0.95, whitened advantages). One epoch, one minibatch, as above: the update differs from GRPO's by the critic's
forward and backward. Each phase is compiled alone: rollout, judge (the reward model's forward), ref_critic (the
reference and critic forwards, `train_step.pre_update_forwards`) and update (phases 4-6: shaping, GAE and the
update, fed ref_critic's result), and each round runs one fused step, then each phase once. FLOPs as above, per
phase (`ppo_step_flops`); the fractions are of the larger matmul peak measured before and after the timed rounds.

Usage:  python scripts/bench_step.py [--steps 5] [--warmup 1]
        python scripts/bench_step.py --judge_cot 32   # a reasoning judge's cost per step (no TRL run)
        python scripts/bench_step.py --algo ppo [--steps 5]   # our PPO step, phase by phase (no TRL run)
Last line: speedup_vs_trl=<TRL seconds per step / our seconds per step>; with --algo ppo:
ppo_step_s=<our fused PPO step, median> ppo_fraction_of_peak=<its analytic FLOP/s over the matmul peak>.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench_rollout import (HEADS, HIDDEN, KV_HEADS, LAYERS, MLP, VOCAB, HostCounters, Neighbours, add_cpu_device_args,
                           add_neighbour_args, matmul_peak, python_loop_speed, use_cpu_devices)

from rlaif_jax import config as config_lib
from rlaif_jax import builder, judging, reward_model
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax.models import hf

PROMPTS, GENERATIONS, PROMPT_LEN, NEW = 32, 4, 32, 64
SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
SCORE_WORDS = ["1", "2", "3", "4", "5"]
TEMPLATE_WORDS = ["Q", "R", "S", ":"] + SCORE_WORDS
WORDS = SPECIALS + TEMPLATE_WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(TEMPLATE_WORDS))]
TEMPLATE = "Q : {prompt} R : {response} S :"
# BOS + "Q :" + prompt (31 words, its BOS stripped) + "R :" + response (64) + "S :": every judge row fits exactly.
JUDGE_PROMPT_PART = 1 + 2 + (PROMPT_LEN - 1) + 2  # up to the response: run once per prompt (share_prompt_forward)
JUDGE_LEN = JUDGE_PROMPT_PART + NEW + 2
LEARNING_RATE = 1e-6
MICRO_BATCHES = 4  # the update's gradient accumulation (both sides; TRL also without): see the docstring


# ---------------------------------------------------------------------------------------------- the world
def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over exactly VOCAB words; BOS in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces (no word has "##")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


def write_model(folder: str, seed: int, tokenizer) -> str:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_world(prefix: str) -> tuple[str, transformers.PreTrainedTokenizerFast, dict[str, str]]:
    """Prints the machine's devices and load, then writes the benchmark's policy and judge (HF folders, different
    seeds) into a fresh temporary folder: (folder, tokenizer, {"policy": folder, "judge": folder})."""
    print(f"devices: jax={jax.devices()} cpu_count={os.cpu_count()} load_avg={os.getloadavg()}", flush=True)
    root = tempfile.mkdtemp(prefix=prefix)
    tokenizer = make_tokenizer()
    return root, tokenizer, {"policy": write_model(os.path.join(root, "policy"), 0, tokenizer),
                             "judge": write_model(os.path.join(root, "judge"), 1, tokenizer)}


def make_prompt_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    content = WORDS[len(SPECIALS) + len(TEMPLATE_WORDS):]
    return [" ".join(rng.choice(content, size=PROMPT_LEN - 1)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- FLOPs
def forward_flops(cfg, rows: int, tokens: int, keys_per_query: float, head_positions: int,
                  read_keys: float | None = None) -> float:
    """FLOPs of a forward over `rows` x `tokens` new tokens whose queries see `keys_per_query` real keys on average,
    with the LM head applied at `head_positions` positions per row. `read_keys`: the last layer runs only the
    keys and values at every position and, at the one read position per row (whose query sees `read_keys` keys),
    the query, attention, o projection and MLP (ours' frozen last-position forwards, `tfm.last_hidden`)."""
    D, H, K, E, F, V, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size, cfg.num_layers)
    kv, rest = 2 * (2 * D * K * E), 2 * (D * H * E + H * E * D + 3 * D * F)  # per token and layer
    head = head_positions * 2 * D * V
    if read_keys is None:
        return rows * (tokens * L * (kv + rest) + tokens * keys_per_query * 4 * H * E * L + head)
    return rows * (tokens * (L - 1) * (kv + rest) + tokens * keys_per_query * 4 * H * E * (L - 1)
                   + tokens * kv + rest + read_keys * 4 * H * E + head)


def causal_keys(prefix: int, tokens: int) -> float:
    """Mean number of keys a query sees: queries at positions prefix + 1 .. prefix + tokens (causal)."""
    return prefix + (tokens + 1) / 2


def step_flops(cfg, ours: bool) -> dict[str, float]:
    """Executed FLOPs per phase. Ours runs each prompt once per group (32 rows) in the prefill, the judge and the
    training forward; TRL runs all 128 rows' prompts. Each side: one training forward + backward (= 3 forwards)."""
    N, P, R = PROMPTS * GENERATIONS, PROMPT_LEN, NEW
    prompt_rows = PROMPTS if ours else N
    fed = R - 1  # the last sampled token is never fed back
    rollout = (forward_flops(cfg, prompt_rows, P, causal_keys(0, P), 1)
               + forward_flops(cfg, N, fed, P + (fed + 1) / 2 + 0.5, 1))
    if ours:  # the prompt parts (no LM head), then each row's response and suffix (the answer's LM head); the last
        # layer at the prompt part's last position and the answer's only
        rest = JUDGE_LEN - JUDGE_PROMPT_PART
        judge = (forward_flops(cfg, prompt_rows, JUDGE_PROMPT_PART, causal_keys(0, JUDGE_PROMPT_PART), 0,
                               read_keys=JUDGE_PROMPT_PART)
                 + forward_flops(cfg, N, rest, causal_keys(JUDGE_PROMPT_PART, rest), 1, read_keys=JUDGE_LEN))
    else:
        judge = forward_flops(cfg, N, JUDGE_LEN, causal_keys(0, JUDGE_LEN), 1)
    update = 3 * training_forward_flops(cfg, prompt_rows, lm_head=True)
    return {"rollout": rollout, "judge": judge, "update": update, "step": rollout + judge + update}


def training_forward_flops(cfg, prompt_rows: int, lm_head: bool) -> float:
    """A forward over the 128 [prompt, response] rows as the learn phase runs it: the prompt positions of
    `prompt_rows` rows (no LM head), the response positions of all rows with the LM head on all R of them when
    `lm_head` (log-probs). A critic's forward has none: its log-probs are unused, so XLA drops its LM head."""
    N, P, R = PROMPTS * GENERATIONS, PROMPT_LEN, NEW
    return (forward_flops(cfg, prompt_rows, P, causal_keys(0, P), 0)
            + forward_flops(cfg, N, R, causal_keys(P, R), R if lm_head else 0))


def ppo_step_flops(c, models: ts.Models) -> dict[str, float]:
    """Executed FLOPs per phase of the --algo ppo step. Rollout: GRPO's (ours). Judge: the reward model's forward
    over the judge rows, with no LM head, only a value head (2 D per row). ref_critic: the reference's forward
    (the policy's shape, log-probs) and the critic's (value head at each response position). Update: per epoch
    a forward and backward (3 forwards) of the policy and of the critic, both trained. Reward shaping and GAE
    are a few element-wise passes over the (128, 64) rewards: not counted."""
    N = PROMPTS * GENERATIONS
    critic = models.critic or models.policy
    rollout = step_flops(models.policy, ours=True)["rollout"]
    judge = (forward_flops(models.judge, N, JUDGE_LEN, causal_keys(0, JUDGE_LEN), 0, read_keys=JUDGE_LEN)
             + N * 2 * models.judge.hidden_size)
    policy_forward = training_forward_flops(models.policy, PROMPTS, lm_head=True)
    critic_forward = training_forward_flops(critic, PROMPTS, lm_head=False) + N * NEW * 2 * critic.hidden_size
    ref_critic = policy_forward + critic_forward
    update = c.algo.epochs * 3 * (policy_forward + critic_forward)
    return {"rollout": rollout, "judge": judge, "ref_critic": ref_critic, "update": update,
            "step": rollout + judge + ref_critic + update}


def cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


# ---------------------------------------------------------------------------------------------- ours
def our_config(world: dict[str, str], judge_cot: int = 0):
    """The benchmark's run; judge_cot > 0: the judge writes a greedy rationale of up to that many tokens before
    its score (config.judge.cot), its row asking "Q :" where the plain row asks "S :", the answer prompt " S :"."""
    c = config_lib.base_config()
    c.policy.path = world["policy"]
    c.judge.path = world["judge"]
    c.judge.mode = "pointwise"
    c.judge.template = TEMPLATE
    c.judge.max_len = JUDGE_LEN
    c.judge.neutral_threshold = 0.0
    c.critic.kind = "none"
    c.compute.scan_unroll = LAYERS  # all 4 layers unrolled: ~10% faster backward on XLA:CPU at this size
    c.algo.estimator = "grpo"
    c.algo.grpo_scale_std = True      # TRL scale_rewards="group"
    c.algo.grpo_std_eps = 1e-4        # TRL's constant
    c.algo.whiten_advantages = False  # TRL's GRPOTrainer does not whiten
    c.algo.clip_low = c.algo.clip_high = 0.2  # TRL epsilon=0.2
    c.algo.epochs = 1
    c.algo.minibatches = 1
    c.algo.loss_agg = "token_mean"    # TRL loss_type="dapo"
    c.rollout.n_samples = GENERATIONS
    c.rollout.max_new_tokens = NEW
    c.rollout.temperature = 1.0
    c.rollout.stop_ids = [VOCAB]  # never sampled: every response runs the full budget
    c.reward.kl_coef = 0.0
    c.reward.kl_in_reward = True
    c.reward.adaptive_kl = False
    c.reward.missing_stop_mode = "none"
    c.reward.score_norm = "none"
    c.optim.learning_rate = LEARNING_RATE
    c.optim.b2 = 0.999
    c.optim.grad_accum = MICRO_BATCHES  # the same gradient; bounds the per-call temporaries (docstring)
    c.train.batch_size = PROMPTS
    c.train.steps = 1000
    c.mesh.data = len(jax.devices())  # data parallel over the XLA:CPU devices (bench_rollout.use_cpu_devices)
    c.data.path = "(unread: the benchmark feeds its own prompt batches)"
    c.data.max_prompt_len = PROMPT_LEN
    if judge_cot:
        c.judge.template = TEMPLATE.replace("S :", "Q :")
        c.judge.cot.enabled = True
        c.judge.cot.max_new_tokens = judge_cot
        c.judge.cot.answer_prompt = " S :"
    config_lib.validate(c, num_devices=len(jax.devices()))
    return c


def ppo_config(world: dict[str, str], rm_folder: str):
    """--algo ppo: the benchmark's run with the reward model of `rm_folder` (`write_reward_model`) as the judge and
    as the critic's initialisation, a frozen reference in the reward's KL, and GAE. Shapes, epochs and minibatches
    as our_config; its GRPO-only settings (grpo_*) do not apply to GAE."""
    c = our_config(world)
    c.judge.mode = "reward_model"
    c.judge.path = rm_folder
    c.critic.kind = "separate"
    c.critic.init = "reward_model"
    c.critic.path = rm_folder
    c.algo.estimator = "gae"
    c.algo.whiten_advantages = True  # as the PPO recipes do (a pass over (128, 64): free)
    c.reward.kl_coef = 0.05  # > 0: the reference forward runs
    c.eval.win_rate = False  # a reward model cannot compare two responses (and the benchmark never evaluates)
    config_lib.validate(c, num_devices=len(jax.devices()))
    return c


def write_reward_model(folder: str, judge_folder: str, judge_config) -> str:
    """The judge's backbone (HF folder) with a fixed value head, saved as a reward-model folder with the read
    settings of `judge_config` (the reward-model judge that will read it), as tests/test_train_step.py does. The
    head is linspace(-1, 1) / sqrt(D), so that values are of order 1 on the backbone's unit-RMS hidden states."""
    cfg, params = hf.load_model(judge_folder)
    tokenizer = hf.load_tokenizer(judge_folder)
    spec = judging.make_spec(judge_config, tokenizer)
    head = {"kernel": jnp.linspace(-1.0, 1.0, cfg.hidden_size) / np.sqrt(cfg.hidden_size), "bias": jnp.zeros(())}
    reward_model.save_reward_model(folder, cfg, params, head, tokenizer, spec)
    return folder


class Ours:
    """Our fused step and each phase compiled alone, with the state threaded through calls. The phases: rollout,
    judge, update (`train_step.learn_phase`: phases 3-6). With a reference forward or a critic (--algo ppo) phase 3
    is a phase of its own, ref_critic (`train_step.pre_update_forwards`), whose result the update is fed."""

    def __init__(self, c, batches):
        self.mesh = shd.make_mesh(c.mesh.data, 1, 1)
        self.rules = [tuple(r) for r in c.mesh.rules]
        self.c, self.batches, self.i = c, batches, 0
        self.host = HostCounters("ours_step")  # the fused steps' host diagnostics
        self.keys = iter(jax.random.split(jax.random.key(123), 100000))
        with self._ctx():
            s = builder.build(c, self.mesh, self.rules)
            self.s, self.frozen = s, s.frozen
            models, spec = s.models, s.judge_spec
            assert spec.path == "token_space", spec.path
            sampling = rollout_lib.SamplingConfig.from_config(c.rollout, models.policy)
            tokens, mask = batches[0]
            self.compile_s = {}

            t0 = time.perf_counter()
            lowered = s.step_fn.lower(s.state, s.frozen, tokens, mask)
            self.compile_s["lower"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.step = lowered.compile()
            self.compile_s["compile"] = time.perf_counter() - t0

            def rollout(params, frozen, tokens, mask, key):  # the step's rollout phase (a LoRA merged in it, as there)
                return ts.rollout_phase(c, models, sampling, ts.trained_policy(c, params, frozen), tokens, mask, key)

            self.rollout = self._compile("rollout", jax.jit(rollout), s.state.params, s.frozen, tokens, mask,
                                         next(self.keys))

            def judge(judge_params, roll, key, share_prompt):  # the step's judge phase
                score_fn = functools.partial(judging.score, judge_params, models.judge, spec,
                                             share_prompt=share_prompt)
                scores_b, metrics = ts.judge_phase(c, score_fn, roll, key)
                return scores_b, metrics.summary(spec)

            def learn(state, frozen, roll, scores_b, judge_metrics, key, forwards):
                return ts.learn_phase(c, models, state, frozen, roll, scores_b, judge_metrics, key,
                                      forwards=forwards)

            self.state = jax.tree.map(jnp.copy, s.state)        # threaded through the fused step
            self.learn_state = jax.tree.map(jnp.copy, s.state)  # threaded through the learn phase alone
            self.roll = self.rollout(self.state.params, self.frozen, tokens, mask, next(self.keys))
            assert int(self.roll.lengths_b.min()) == NEW, "every row must run the full budget"
            self.judge = self._compile("judge", jax.jit(functools.partial(
                judge, share_prompt=c.compute.share_prompt_forward)), self.frozen.judge, self.roll, next(self.keys))
            # The reference: every judge row runs its prompt part (compute.share_prompt_forward=False).
            self.judge_per_row = self._compile("judge_per_row", jax.jit(functools.partial(judge, share_prompt=False)),
                                               self.frozen.judge, self.roll, next(self.keys))
            self.scores, self.judge_metrics = self.judge(self.frozen.judge, self.roll, next(self.keys))
            # Phase 3 runs a forward only for a reference (a KL weighted by more than a fixed 0) or a critic. Without
            # either (the GRPO run) it is empty: the update alone is then the whole learn phase.
            self.ref_critic = forwards = None
            if c.critic.kind != "none" or c.reward.kl_coef != 0 or c.reward.adaptive_kl:
                ref_critic = jax.jit(functools.partial(ts.pre_update_forwards, c, models))
                self.ref_critic = self._compile("ref_critic", ref_critic, self.learn_state, self.frozen, self.roll)
                forwards = self.ref_critic(self.learn_state, self.frozen, self.roll)
            self.learn = self._compile("update", jax.jit(learn, donate_argnums=0), self.learn_state, self.frozen,
                                       self.roll, self.scores, self.judge_metrics, next(self.keys), forwards)
        self.phases = ("rollout", "judge") + (("ref_critic",) if self.ref_critic is not None else ()) + ("update",)
        compiled = {"step": self.step, "rollout": self.rollout, "judge": self.judge, "ref_critic": self.ref_critic,
                    "update": self.learn}
        self.cost = {k: cost_flops(compiled[k]) for k in ("step",) + self.phases}
        self.times = {k: [] for k in ("step", "judge_per_row") + self.phases}

    def _ctx(self):
        class Ctx:
            def __enter__(ctx):
                ctx.a, ctx.b = shd.use_rules(self.rules), jax.set_mesh(self.mesh)
                ctx.a.__enter__(), ctx.b.__enter__()

            def __exit__(ctx, *exc):
                ctx.b.__exit__(*exc), ctx.a.__exit__(*exc)
        return Ctx()

    def _compile(self, name, fn, *args):
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        self.compile_s[name] = time.perf_counter() - t0
        return compiled

    def run_step(self) -> float:
        tokens, mask = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.host:
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, self.frozen, tokens, mask)
            self.last_metrics = jax.device_get(metrics)  # what the training loop reads back every step
            return time.perf_counter() - t0

    def run_phases(self) -> dict[str, float]:
        tokens, mask = self.batches[self.i % len(self.batches)]
        out = {}
        t0 = time.perf_counter()
        roll = jax.block_until_ready(self.rollout(self.learn_state.params, self.frozen, tokens, mask,
                                                  next(self.keys)))
        out["rollout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, jm = jax.block_until_ready(self.judge(self.frozen.judge, roll, next(self.keys)))
        out["judge"] = time.perf_counter() - t0
        key = next(self.keys)
        t0 = time.perf_counter()
        jax.block_until_ready(self.judge_per_row(self.frozen.judge, roll, key))
        out["judge_per_row"] = time.perf_counter() - t0
        forwards = None
        if self.ref_critic is not None:
            t0 = time.perf_counter()
            forwards = jax.block_until_ready(self.ref_critic(self.learn_state, self.frozen, roll))
            out["ref_critic"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.learn_state, metrics = self.learn(self.learn_state, self.frozen, roll, scores, jm, next(self.keys),
                                               forwards)
        jax.device_get(metrics)
        out["update"] = time.perf_counter() - t0
        return out

    def record_round(self):
        """One fused step, then one call of each phase alone (alternated with TRL's steps by the caller)."""
        self.times["step"].append(self.run_step())
        for k, v in self.run_phases().items():
            self.times[k].append(v)


# ---------------------------------------------------------------------------------------------- TRL
def make_judge_reward(judge_folder: str, tokenizer):
    """TRL reward function: the pointwise expected score of the judge, read from its last-position logits over the
    score tokens (same template, same rescaling 2 (E - 1) / (K - 1) - 1 as judging.scoring.pointwise_scores)."""
    judge = transformers.AutoModelForCausalLM.from_pretrained(judge_folder, dtype=torch.float32).eval()
    score_ids = torch.tensor(tokenizer.convert_tokens_to_ids(SCORE_WORDS))
    ks = torch.arange(1, len(SCORE_WORDS) + 1, dtype=torch.float32)

    def judge_reward(prompts, completions, **kwargs) -> list[float]:
        texts = [TEMPLATE.format(prompt=p, response=r) for p, r in zip(prompts, completions)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = judge(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits[:, score_ids].float(), dim=-1)
        expected = probs @ ks
        return (2.0 * (expected - 1.0) / (len(SCORE_WORDS) - 1) - 1.0).tolist()

    return judge_reward


class Interleave(transformers.TrainerCallback):
    """Times each TRL optimizer step and runs one round of ours after it."""

    def __init__(self, ours: Ours | None, host: HostCounters):
        self.ours, self.trl_s, self._t0, self.host = ours, [], None, host

    def on_step_begin(self, args, state, control, **kwargs):
        self.host.__enter__()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trl_s.append(time.perf_counter() - self._t0)
        self.host.__exit__(None, None, None)
        if self.ours is not None:
            self.ours.record_round()


def run_trl(world, tokenizer, prompt_texts, steps: int, threads: int, accum: int, ours: Ours | None, workdir: str):
    import datasets
    import trl
    torch.set_num_threads(threads)
    policy = transformers.AutoModelForCausalLM.from_pretrained(world["policy"], dtype=torch.float32)
    args = trl.GRPOConfig(
        output_dir=workdir, use_cpu=True, bf16=False, fp16=False, report_to="none", logging_strategy="no",
        save_strategy="no", disable_tqdm=True, seed=0, learning_rate=LEARNING_RATE, adam_beta2=0.999,
        max_grad_norm=1.0, num_generations=GENERATIONS, max_completion_length=NEW, beta=0.0, temperature=1.0,
        top_k=0, top_p=1.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        per_device_train_batch_size=PROMPTS * GENERATIONS // accum, gradient_accumulation_steps=accum, max_steps=steps,
        generation_kwargs={"min_new_tokens": NEW}, dataloader_num_workers=0)
    callback = Interleave(ours, HostCounters(f"trl_threads={threads}_accum={accum}"))
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=make_judge_reward(world["judge"], tokenizer), args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompt_texts}),
                              processing_class=tokenizer, callbacks=[callback])
    assert trainer.args.generation_batch_size == PROMPTS * GENERATIONS, trainer.args.generation_batch_size
    trainer.train()
    length = trainer._metrics["train"].get("completions/min_length", [NEW])
    assert min(length) == NEW, f"TRL completions shorter than {NEW}: {length}"
    torch.set_num_threads(os.cpu_count())
    print(callback.host.line(), flush=True)
    return callback.trl_s


# ---------------------------------------------------------------------------------------------- main
def fmt(xs):
    return [round(x, 3) for x in xs]


def judge_cot_cost(world, batches, rationale_tokens: int, warmup: int, steps: int) -> None:
    """--judge_cot R: the cost of a reasoning judge per training step. The same run with the plain judge and with
    judge.cot (a greedy rationale of up to R tokens before the score), each compiled once, their fused steps (and
    their judge phases alone) alternated, so load from other processes falls on both alike. No TRL run."""
    plain, cot = Ours(our_config(world), batches), Ours(our_config(world, rationale_tokens), batches)
    for name, o in (("plain", plain), ("cot", cot)):
        print(f"{name}_compile_s: fused step={o.compile_s['lower'] + o.compile_s['compile']:.2f} "
              f"judge alone={o.compile_s['judge']:.2f}", flush=True)
    times = {k: [] for k in ("plain_step", "cot_step", "plain_judge", "cot_judge")}
    for i in range(warmup + steps):
        row = {"plain_step": plain.run_step(), "cot_step": cot.run_step(),
               "plain_judge": plain.run_phases()["judge"], "cot_judge": cot.run_phases()["judge"]}
        if i >= warmup:
            for k, v in row.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"judge_cot: rationale budget={rationale_tokens} tokens, mean rationale length="
          f"{cot.last_metrics['judge/rationale_length']:.1f}; judge rows={PROMPTS * GENERATIONS} of {JUDGE_LEN} "
          f"tokens; policy: {PROMPTS} prompts x {GENERATIONS} x {NEW} tokens")
    for k, v in times.items():
        print(f"{k}_s_median={med[k]:.4f} all={fmt(v)}")
    print(plain.host.line())
    print(cot.host.line())
    print(f"judge_phase: plain share of step={med['plain_judge'] / med['plain_step']:.3f}, "
          f"cot/plain={med['cot_judge'] / med['plain_judge']:.2f}")
    print(f"judge_cot_extra_s_per_step={med['cot_step'] - med['plain_step']:.4f} "
          f"judge_cot_step_ratio={med['cot_step'] / med['plain_step']:.2f}")


def ppo_cost(root, world, batches, warmup: int, steps: int, peak_repeats: int) -> None:
    """--algo ppo: our PPO step (reward-model judge, reference, separate critic from the reward model, GAE), the
    fused step and each phase alone, rounds of one fused step then each phase once; each phase's analytic FLOPs
    and fraction of the matmul peak, measured before and after the timed rounds. No TRL run."""
    rm_folder = os.path.join(root, "reward_model")
    c = ppo_config(world, rm_folder)
    write_reward_model(rm_folder, world["judge"], c.judge)
    peaks = [matmul_peak(peak_repeats)]
    ours = Ours(c, batches)
    phases = ours.phases
    print("ppo_compile_s: fused step lower={lower:.2f} compile={compile:.2f}; alone: ".format(**ours.compile_s)
          + " ".join(f"{k}={ours.compile_s[k]:.2f}" for k in phases), flush=True)
    for _ in range(warmup):
        ours.record_round()
    # The warm-up rounds are neither timed nor in the host diagnostics.
    ours.times, ours.host = {k: [] for k in ours.times}, HostCounters("ppo_step")
    for _ in range(steps):
        ours.record_round()
    peaks.append(matmul_peak(peak_repeats))

    times, m, models = ours.times, ours.last_metrics, ours.s.models
    med = {k: statistics.median(v) for k, v in times.items()}
    phase_sum = sum(med[k] for k in phases)
    peak_jax, peak_torch = max(p[0] for p in peaks), max(p[1] for p in peaks)
    peak = max(peak_jax, peak_torch)  # as the TRL comparison: the larger, the conservative fraction
    flops = ppo_step_flops(c, models)
    print(f"model: llama vocab={VOCAB} hidden={HIDDEN} mlp={MLP} layers={LAYERS} heads={HEADS} kv_heads={KV_HEADS} "
          f"f32 (policy, reference, judge and critic); {PROMPTS} prompts x {GENERATIONS} generations, "
          f"prompt={PROMPT_LEN} completion={NEW} judge_row={JUDGE_LEN} tokens; PPO: GAE gamma={c.algo.gamma} "
          f"lambda={c.algo.lam}, KL coef={c.reward.kl_coef} ({c.reward.kl_estimator} in the reward), judge "
          f"mode={c.judge.mode}, critic={c.critic.kind} (init {c.critic.init}), {c.algo.epochs} epoch x "
          f"{c.algo.minibatches} minibatch")
    print(f"ppo: response/length={m['response/length']:.1f} judge/score={m['judge/score']:.4f} "
          f"kl/k1={m['kl/k1']:.2e} value/loss={m['value/loss']:.4g} "
          f"value/explained_variance_before={m['value/explained_variance_before']:.3f} "
          f"optim/loss={m['optim/loss']:.4g} logp_mismatch={m['policy/logp_mismatch']:.2e} "
          f"skipped_updates={int(m['guard/skipped_updates'])}")
    print(f"ppo_step_s_median={med['step']:.4f} all={fmt(times['step'])}")
    for k in phases:
        print(f"ppo_{k}_alone_s_median={med[k]:.4f} all={fmt(times[k])} share={med[k] / phase_sum:.3f}")
    print(f"ppo_phases_sum_s={phase_sum:.4f} (fused step / sum of phases = {med['step'] / phase_sum:.3f})")
    print(f"matmul_peak_gflops jax={peak_jax / 1e9:.1f} torch={peak_torch / 1e9:.1f} "
          f"(all: {[(round(a / 1e9, 1), round(b / 1e9, 1)) for a, b in peaks]})")
    print(ours.host.line())
    print("flops_gflop analytic: " + " ".join(f"{k}={v / 1e9:.3f}" for k, v in flops.items())
          + "; xla cost_analysis: " + " ".join(f"{k}={v / 1e9:.3f}" for k, v in ours.cost.items()))
    for k in phases:
        print(f"ppo_{k}_gflops={flops[k] / med[k] / 1e9:.2f} fraction_of_peak={flops[k] / med[k] / peak:.3f}")
    print(f"ppo_step_s={med['step']:.4f} ppo_fraction_of_peak={flops['step'] / med['step'] / peak:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each TRL run")
    parser.add_argument("--peak_repeats", type=int, default=3)
    parser.add_argument("--judge_cot", type=int, default=0, metavar="R",
                        help="instead of the TRL comparison: our step with a reasoning judge (a rationale of up to R "
                             "tokens, config.judge.cot) against our plain step")
    parser.add_argument("--algo", choices=("grpo", "ppo"), default="grpo",
                        help="grpo: against TRL's GRPOTrainer; ppo: our PPO step alone, phase by phase (no TRL run)")
    add_neighbour_args(parser)
    add_cpu_device_args(parser)
    args = parser.parse_args()
    use_cpu_devices(args.cpu_devices)
    if args.judge_cot and args.algo != "grpo":
        parser.error("--judge_cot measures the GRPO run's judge: leave --algo at grpo")
    with Neighbours(args.neighbours, args.neighbour_kind):
        run(args)


def run(args):
    root, tokenizer, world = make_world("bench_step_")
    total = args.warmup + args.steps
    prompt_texts = make_prompt_texts(PROMPTS * total)
    ids = np.asarray(tokenizer(prompt_texts)["input_ids"], np.int32)
    assert ids.shape == (PROMPTS * total, PROMPT_LEN), ids.shape
    batches = [(jnp.asarray(ids[i:i + PROMPTS]), jnp.ones((PROMPTS, PROMPT_LEN), jnp.int32))
               for i in range(0, len(ids), PROMPTS)]

    if args.judge_cot:
        return judge_cot_cost(world, batches, args.judge_cot, args.warmup, args.steps)
    if args.algo == "ppo":
        return ppo_cost(root, world, batches, args.warmup, args.steps, args.peak_repeats)
    peaks = [matmul_peak(args.peak_repeats)]
    ours = Ours(our_config(world), batches)
    print(f"ours_compile_s: fused step lower={ours.compile_s['lower']:.2f} compile={ours.compile_s['compile']:.2f}; "
          f"alone: rollout={ours.compile_s['rollout']:.2f} judge={ours.compile_s['judge']:.2f} "
          f"(per row {ours.compile_s['judge_per_row']:.2f}) update={ours.compile_s['update']:.2f}", flush=True)
    for _ in range(args.warmup):
        ours.run_step(), ours.run_phases()

    trl_runs = [(t, a) for t in sorted({os.cpu_count(), 1}, reverse=True) for a in (1, MICRO_BATCHES)]
    trl_all = {}
    for threads, accum in trl_runs:
        trl_s = run_trl(world, tokenizer, prompt_texts, total, threads, accum, ours,
                        os.path.join(root, f"trl{threads}_{accum}"))
        trl_all[threads, accum] = trl_s[args.warmup:]
        print(f"trl[torch_threads={threads} grad_accum={accum}] step_s all (first {args.warmup} = warm-up): "
              f"{fmt(trl_s)}", flush=True)
        peaks.append(matmul_peak(args.peak_repeats))
    # Our rounds ran after every TRL step, warm-up steps included: drop as many from each TRL run.
    keep = [i for r in range(len(trl_runs)) for i in range(r * total + args.warmup, (r + 1) * total)]
    ours_t = {k: [v[i] for i in keep] for k, v in ours.times.items()}
    med = {k: statistics.median(v) for k, v in ours_t.items()}
    trl_med = {t: statistics.median(v) for t, v in trl_all.items()}
    best = min(trl_med, key=trl_med.get)
    trl_s = trl_med[best]

    peak_jax, peak_torch = max(p[0] for p in peaks), max(p[1] for p in peaks)
    peak = max(peak_jax, peak_torch)
    cfg = ours.s.models.policy
    f_ours, f_trl = step_flops(cfg, ours=True), step_flops(cfg, ours=False)
    phase_sum = med["rollout"] + med["judge"] + med["update"]
    m = ours.last_metrics

    print(f"model: llama vocab={VOCAB} hidden={HIDDEN} mlp={MLP} layers={LAYERS} heads={HEADS} kv_heads={KV_HEADS} "
          f"f32 (policy and judge); {PROMPTS} prompts x {GENERATIONS} generations, prompt={PROMPT_LEN} "
          f"completion={NEW} judge_row={JUDGE_LEN} tokens; GRPO beta=0, 1 epoch x 1 minibatch")
    print(f"ours: response/length={m['response/length']:.1f} stopped_frac={m['response/stopped_frac']:.2f} "
          f"judge/score={m['judge/score']:.4f} optim/loss={m['optim/loss']:.4g} logp_mismatch="
          f"{m['policy/logp_mismatch']:.2e}")
    print(f"ours_compile_s={ours.compile_s['lower'] + ours.compile_s['compile']:.2f}")
    print(f"ours_step_s_median={med['step']:.4f} all={fmt(ours_t['step'])}")
    for k in ("rollout", "judge", "update"):
        print(f"ours_{k}_alone_s_median={med[k]:.4f} all={fmt(ours_t[k])} share={med[k] / phase_sum:.3f}")
    ratios = [a / b for a, b in zip(ours_t["judge"], ours_t["judge_per_row"])]  # the same round: the same load
    print(f"ours_judge_per_row_alone_s_median={med['judge_per_row']:.4f} all={fmt(ours_t['judge_per_row'])} "
          f"(compute.share_prompt_forward=False); judge / judge_per_row = {med['judge'] / med['judge_per_row']:.3f}, "
          f"median of the rounds' ratios {statistics.median(ratios):.3f}")
    print(f"ours_phases_sum_s={phase_sum:.4f} (fused step / sum of phases = {med['step'] / phase_sum:.3f})")
    for t, a in trl_runs:
        print(f"trl_step_s_median[torch_threads={t} grad_accum={a}]={trl_med[t, a]:.4f} all={fmt(trl_all[t, a])}")
    print(f"trl_baseline=torch_threads={best[0]} grad_accum={best[1]}")
    print(f"matmul_peak_gflops jax={peak_jax / 1e9:.1f} torch={peak_torch / 1e9:.1f} "
          f"(all: {[(round(a / 1e9, 1), round(b / 1e9, 1)) for a, b in peaks]})")
    print(ours.host.line())
    # XLA:CPU allocates a program's temporaries as one buffer per call; with glibc's defaults it is mapped fresh each
    # call and every page faulted in (RLAIF_JAX_KEEP_FREED_MEMORY=1 keeps it mapped: rlaif_jax/host_memory.py).
    temp = ours.learn.memory_analysis().temp_size_in_bytes
    print(f"ours_update_temp_mib={temp / 2**20:.0f} (4 KiB pages faulted per call if fresh: {temp // 4096}) "
          f"python_loop_mops={python_loop_speed():.1f}")
    print("flops_gflop analytic ours: " + " ".join(f"{k}={v / 1e9:.3f}" for k, v in f_ours.items())
          + "; xla cost_analysis: " + " ".join(f"{k}={v / 1e9:.3f}" for k, v in ours.cost.items()))
    print("flops_gflop analytic trl:  " + " ".join(f"{k}={v / 1e9:.3f}" for k, v in f_trl.items()))
    for k in ("rollout", "judge", "update"):
        print(f"ours_{k}_gflops={f_ours[k] / med[k] / 1e9:.2f} fraction_of_peak={f_ours[k] / med[k] / peak:.3f}")
    print(f"ours_step_gflops={f_ours['step'] / med['step'] / 1e9:.2f} "
          f"ours_fraction_of_peak={f_ours['step'] / med['step'] / peak:.3f} "
          f"trl_fraction_of_peak={f_trl['step'] / trl_s / peak:.3f}")
    # The ratio compares TRL's baseline run with our steps interleaved with that same run (same load window).
    window = ours_t["step"][trl_runs.index(best) * args.steps:][:args.steps]
    pairs = [h / o for h, o in zip(trl_all[best], window)]
    print(f"ours_step_s_median_in_baseline_window={statistics.median(window):.4f} all={fmt(window)}")
    print(f"speedup_all_rounds={trl_s / med['step']:.2f} speedup_min_over_min={min(trl_all[best]) / min(window):.2f} "
          f"speedup_median_of_pairs={statistics.median(pairs):.2f}")
    print(f"speedup_vs_trl={trl_s / statistics.median(window):.2f}")


if __name__ == "__main__":
    main()
