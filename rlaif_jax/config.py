"""The experiment config: `base_config()` composes every module's section, `validate()` checks it.

Each module owns the defaults of its own section (`rewards.default_config()` is `config.reward`, and so on);
this file only assembles them and holds the sections that belong to no single module (policy, critic,
mesh, optimiser, train loop, compute settings, evaluation). Experiment files in experiments/ start from
`base_config()`, change fields, and return it locked.

`validate(config)` runs before anything is compiled or loaded, and every message says what to change. Each
section has a validator (its module's `validate_config`, or one here for the sections above), and a config with a
top-level field that has none is refused (`section_validators`): a new section cannot go unchecked.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import ml_collections

from rlaif_jax import algorithms, errors, hooks, rewards
from rlaif_jax import sharding as shd
from rlaif_jax.models.config import ATTENTION_CHOICES, FLOAT_DTYPES, REMAT_CHOICES

CRITICS = ("value_head", "separate", "none")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adafactor")
# Reward settings that shape a scalar score, each with the value that turns it off: online_dpo learns from the
# judge's preferences alone, and its pull to the reference is algo.dpo_beta.
REWARD_SHAPING_OFF = {"judge_weight": 1.0, "missing_stop_mode": "none", "length_penalty": 0.0, "clip": 0.0,
                      "score_norm": "none", "kl_coef": 0.0, "adaptive_kl": False}


def base_config() -> ml_collections.ConfigDict:
    """Every section with its defaults (unlocked; experiments lock it after their changes)."""
    from rlaif_jax import checkpoint, data, judging, metrics, rollout

    c = ml_collections.ConfigDict()
    c.seed = 0

    c.policy = ml_collections.ConfigDict()
    c.policy.path = ""                 # HF folder or hub id of the initial policy (also the frozen reference)
    c.policy.dtype = "float32"         # compute dtype
    c.policy.param_dtype = "float32"   # storage dtype of the trained params
    # LoRA (rlaif_jax/lora.py): rank r > 0 trains adapters W + alpha / r * A @ B on lora_targets instead of every
    # weight; the base stays frozen and is the reference (one copy), the optimizer state is the adapters' only.
    c.policy.lora_rank = 0
    c.policy.lora_alpha = 16.0
    c.policy.lora_targets = ["q", "k", "v", "o", "gate", "up", "down"]

    c.critic = ml_collections.ConfigDict()
    c.critic.kind = "value_head"       # "value_head" on the policy backbone | "separate" model | "none"
    c.critic.init = "policy"           # separate critic initialised from the "policy" or a "reward_model"
    c.critic.path = ""                 # reward model folder when init == "reward_model"
    # LoRA of a separate critic's backbone (as the policy's above): the train state holds its adapters and value
    # head; the frozen base is the reference (init "policy", no second copy) or the reward model's backbone.
    c.critic.lora_rank = 0
    c.critic.lora_alpha = 16.0
    c.critic.lora_targets = list(c.policy.lora_targets)

    c.judge = judging.default_config()
    c.rollout = rollout.default_config()
    c.reward = rewards.default_config()
    c.algo = algorithms.default_config()
    c.data = data.default_config()
    c.logging = metrics.default_config()
    c.checkpoint = checkpoint.default_config()
    c.eval = eval_config()
    c.compute = compute_config()

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"             # "adamw" | "adafactor" (optax's defaults: factored second moments, decay 0.8,
                                       # no momentum, update clipping 1.0, steps scaled by the parameters' RMS)
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"      # "constant" | "linear" (decay to 0) | "cosine" (decay to 0)
    c.optim.warmup_steps = 0           # optimizer updates of linear warm-up
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9                   # b1, b2, eps: AdamW's (Adafactor has its own and refuses changes to these)
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0        # global-norm gradient clipping; 0 = off
    c.optim.grad_accum = 1             # micro-batches per minibatch (memory only: the update is the same for any value)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # -1: all devices the other axes leave
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = [list(r) for r in shd.DEFAULT_RULES]

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8             # prompts per step (x rollout.n_samples responses)
    c.train.steps = 100
    c.train.export_final = True        # write the final policy as an HF folder in workdir/final_policy
    c.train.allow_tokenizer_mismatch = False  # judge tokenizer differs: allow the host re-tokenisation path
    # Stop the run (FATAL training error) after this many optimizer updates in a row were dropped by the non-finite
    # guard, counted over whole steps (a step with any kept update resets the count); 0 = never stop.
    c.train.max_consecutive_skipped = 64
    return c


def compute_config() -> ml_collections.ConfigDict:
    """Defaults of `config.compute`: how the step is computed, not what it computes (each setting changes speed or
    memory, the results only by float rounding)."""
    c = ml_collections.ConfigDict()
    # Layers unrolled per step of the training forward's lax.scan (policy, reference, separate critic): 1 keeps
    # compile time flat in depth; all layers made bench_step.py's update phase ~10% faster on its 4-layer model.
    c.scan_unroll = 1
    # Forwards over whole groups (n_samples > 1) run each prompt once (tfm.forward_shared_prefix): update phase of
    # bench_step.py 1.44 -> 1.04 s; the judge's, its template's part up to the response (judging.assembly.split_rows):
    # judge phase 1.18 -> 0.85 s. False: every row runs its prompt (the reference the shared path is tested against).
    c.share_prompt_forward = True
    # Activation memory of the trained models' forwards (policy, reference, separate critic; attention also the
    # judge's). remat: what the backward keeps of each layer, the rest recomputed: "none" | "full" (nothing,
    # ~1/3 more compute) | "dots" (matmul outputs) | "minimal" (weight matmuls' outputs, not attention's) |
    # "everything" (MaxText's remat_policy names; transformer.REMAT_POLICIES).
    c.remat = "none"
    # Attention of the forwards without a KV cache: "xla" materialises (B, H, T, T) scores | "chunked" reads
    # attention_chunk keys at a time with an online softmax, memory linear in T (transformer.chunked_attention) |
    # "fused" the backend's kernel: cuDNN flash attention on GPU (bf16 / fp16), Pallas splash attention on TPU,
    # "chunked" on CPU | "cudnn" / "splash" that kernel, refused on another backend (models/fused_attention.py).
    # Plan mode (on CPU) plans a kernel with "chunked", whose memory is linear in T as the kernels' is.
    c.attention = "xla"
    c.attention_chunk = 512
    # Response positions per block of the LM head in the learn phase's log-probs (train_step.response_logprobs):
    # the (rows, R, V) float32 logits are never whole, each block recomputed in the backward; 0 = all at once.
    c.logprob_chunk = 0
    # The forwards that keep no activations for a backward (the judge's, the reference's and the critic's before the
    # update, the rollout's prefill) run their rows in this many micro-batches under lax.map: their activation
    # memory shrinks by this factor for a loop over the chunks (transformer.map_microbatches). 1 = all at once.
    # The rows (per device) must divide into it, whole groups of n_samples where the prompt forward is shared.
    c.forward_microbatches = 1
    return c


def model_compute_settings(cp: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `config.compute` settings that live on a trained model's ModelConfig (builder.build applies them)."""
    return {"scan_unroll": cp.scan_unroll, "remat": cp.remat, "attention": cp.attention,
            "attention_chunk": cp.attention_chunk, "logprob_chunk": cp.logprob_chunk,
            "forward_microbatches": cp.forward_microbatches}


def eval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval` (the held-out evaluation of evaluate.py)."""
    from rlaif_jax import independent_eval

    e = ml_collections.ConfigDict()
    e.every = 25            # evaluate every N steps (and after the last); 0 = never
    e.max_prompts = 64      # held-out prompts per evaluation (rounded up to whole batches)
    e.samples_per_prompt = 1  # responses sampled per held-out prompt (more: less noisy rates)
    e.win_rate = True       # pairwise judge: current policy vs the initial policy, both orders
    e.pairwise_template = ""  # "" = judging's default pairwise template
    e.num_samples_logged = 16
    # A ground-truth grader the judge never sees: "module:function" taking (prompt_texts, response_texts,
    # stopped) and returning {metric: per-example list}; "" = none.
    e.ground_truth = ""
    # An evaluator model that is not the training reward (rlaif_jax/independent_eval.py): win rate against
    # `baseline`, its interval, the length-controlled win rate and the harmless rate; path "" = off.
    e.evaluator = independent_eval.default_config()
    return e


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {choices}")


# ---------------------------------------------------------------------------------------------- the sections
# The sections that belong to no single module are checked here; every other module checks its own section
# with its `validate_config`. `section_validators` lists them all.

def _validate_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"config.seed={seed!r} must be an int")


def _validate_policy(p: ml_collections.ConfigDict) -> None:
    if not p.path:
        raise ValueError("config.policy.path is empty: set it to an HF checkpoint folder or hub id")
    _check_choice(p.dtype, FLOAT_DTYPES, "config.policy.dtype")
    _check_choice(p.param_dtype, FLOAT_DTYPES, "config.policy.param_dtype")
    from rlaif_jax import lora
    lora.validate_config(p)


def _validate_critic(cr: ml_collections.ConfigDict) -> None:
    _check_choice(cr.kind, CRITICS, "config.critic.kind")
    _check_choice(cr.init, ("policy", "reward_model"), "config.critic.init")
    from rlaif_jax import lora
    lora.validate_config(cr, "config.critic")
    if cr.lora_rank and cr.kind != "separate":
        raise ValueError(f"config.critic.lora_rank={cr.lora_rank} adapts a separate critic's backbone, and "
                         f"config.critic.kind={cr.kind!r}: set kind='separate' or lora_rank=0 (a value head reads "
                         "the policy's backbone, whose LoRA is config.policy.lora_rank)")
    from_reward_model = cr.kind == "separate" and cr.init == "reward_model"
    if from_reward_model and not cr.path:
        raise ValueError("config.critic.init='reward_model' needs config.critic.path (the reward model folder)")
    if cr.path and not from_reward_model:
        raise ValueError(f"config.critic.path={cr.path!r} is only read by a separate critic initialised from a "
                         "reward model: set config.critic.kind='separate' and init='reward_model', or clear the path")


def _validate_compute(cp: ml_collections.ConfigDict) -> None:
    if cp.scan_unroll < 1:
        raise ValueError(f"config.compute.scan_unroll={cp.scan_unroll} must be >= 1 (1 = a rolled scan)")
    _check_choice(cp.remat, REMAT_CHOICES, "config.compute.remat")
    _check_choice(cp.attention, ATTENTION_CHOICES, "config.compute.attention")
    if cp.attention_chunk < 1:
        raise ValueError(f"config.compute.attention_chunk={cp.attention_chunk} must be >= 1 (keys per block)")
    if cp.logprob_chunk < 0:
        raise ValueError(f"config.compute.logprob_chunk={cp.logprob_chunk} must be >= 0 (0 = no chunking)")
    if cp.forward_microbatches < 1:
        raise ValueError(f"config.compute.forward_microbatches={cp.forward_microbatches} must be >= 1 (1 = all rows "
                         "at once)")


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    from rlaif_jax import independent_eval

    if e.every < 0:
        raise ValueError(f"config.eval.every={e.every} must be >= 0 (0 = never evaluate)")
    if e.max_prompts < 1 or e.samples_per_prompt < 1:
        raise ValueError(f"config.eval.max_prompts={e.max_prompts} and config.eval.samples_per_prompt="
                         f"{e.samples_per_prompt} must be >= 1 (turn evaluation off with config.eval.every=0)")
    if e.num_samples_logged < 0:
        raise ValueError(f"config.eval.num_samples_logged={e.num_samples_logged} must be >= 0")
    if e.pairwise_template and not e.win_rate:
        raise ValueError("config.eval.pairwise_template is only used for the win rate; set config.eval.win_rate=True "
                         "or clear the template")
    if e.ground_truth:
        hooks.load_function(e.ground_truth, "config.eval.ground_truth")
    independent_eval.validate_config(e.evaluator)
    if e.evaluator.path and not e.every:
        raise ValueError("config.eval.evaluator.path is set but config.eval.every=0 never evaluates; set "
                         "config.eval.every or clear the path")


def _validate_optim(o: ml_collections.ConfigDict) -> None:
    if not (o.learning_rate > 0 and math.isfinite(o.learning_rate)):
        raise ValueError(f"config.optim.learning_rate={o.learning_rate} must be finite and > 0")
    _check_choice(o.name, OPTIMIZERS, "config.optim.name")
    _check_choice(o.schedule, SCHEDULES, "config.optim.schedule")
    if o.name == "adafactor":
        adam = {k: v for k, v in (("b1", 0.9), ("b2", 0.95), ("eps", 1e-8)) if o[k] != v}
        if adam:
            raise ValueError(f"config.optim.{', '.join(f'{k}={o[k]}' for k in adam)} set AdamW's moments, which "
                             "optim.name='adafactor' does not have: leave them at their defaults or use adamw")
    if o.warmup_steps < 0:
        raise ValueError(f"config.optim.warmup_steps={o.warmup_steps} must be >= 0")
    if o.weight_decay < 0 or o.max_grad_norm < 0:
        raise ValueError(f"config.optim.weight_decay={o.weight_decay} and config.optim.max_grad_norm="
                         f"{o.max_grad_norm} must be >= 0 (0 turns each off)")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ValueError(f"config.optim.b1={o.b1} and config.optim.b2={o.b2} must lie in [0, 1)")
    if not o.eps > 0:
        raise ValueError(f"config.optim.eps={o.eps} must be > 0")
    if o.grad_accum < 1:
        raise ValueError(f"config.optim.grad_accum={o.grad_accum} must be >= 1 (1 = no accumulation)")


def _validate_mesh(m: ml_collections.ConfigDict) -> None:
    if not (m.data == -1 or m.data >= 1) or m.fsdp < 1 or m.tensor < 1:
        raise ValueError(f"config.mesh data={m.data}, fsdp={m.fsdp}, tensor={m.tensor}: each must be >= 1 "
                         "(data may be -1: the devices the other axes leave)")
    named = set()
    for rule in m.rules:
        axes = rule[1] if len(rule) == 2 else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if len(rule) != 2 or not isinstance(rule[0], str) or not set(axes) <= set(shd.MESH_AXES):
            raise ValueError(f"config.mesh.rules entry {list(rule)!r} is not [logical axis, None | mesh axis | "
                             f"list of mesh axes] with mesh axes from {shd.MESH_AXES}")
        named.add(rule[0])
    missing = [name for name, _ in shd.DEFAULT_RULES if name not in named]
    if missing:
        raise ValueError(f"config.mesh.rules has no entry for the logical axes {missing}; add [name, None] to "
                         "replicate them")


def _validate_train(t: ml_collections.ConfigDict) -> None:
    if t.batch_size < 1 or t.steps < 1:
        raise ValueError(f"config.train.batch_size={t.batch_size} and config.train.steps={t.steps} must be >= 1")
    if t.max_consecutive_skipped < 0:
        raise ValueError(f"config.train.max_consecutive_skipped={t.max_consecutive_skipped} must be >= 0 (0 = never "
                         "stop on skipped updates)")


def _validate_testbed(t: ml_collections.ConfigDict) -> None:
    # experiments/testbed.py's request that the program build (or reuse) the testbed: testbed.build.ensure_built
    # reads it. Checked here, not in testbed/build.py, whose source is part of the testbed's cache key.
    seeds = t.get("ensemble_seeds", ())
    if (not {"build", "seed"} <= set(t.keys()) <= {"build", "seed", "ensemble_seeds"} or not isinstance(t.build, bool)
            or isinstance(t.seed, bool) or not isinstance(t.seed, int) or isinstance(seeds, str)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"config.testbed={t.to_dict()!r}; it holds build, a bool (True: build or reuse the "
                         "testbed's models before anything loads), seed, the build seed (an int), and optionally "
                         "ensemble_seeds, the builds (ints) whose judges join a judge ensemble")


def section_validators() -> dict[str, Callable[[Any], None]]:
    """Every top-level field of a run config -> the function that checks it. `validate` refuses a field that is
    not listed here, so that a new section cannot go unchecked."""
    from rlaif_jax import checkpoint, data, judging, metrics, rollout

    return {
        "seed": _validate_seed, "policy": _validate_policy, "critic": _validate_critic,
        "judge": judging.validate_config, "rollout": rollout.validate_config, "reward": rewards.validate_config,
        "algo": algorithms.validate_config, "data": data.validate_config, "logging": metrics.validate_config,
        "checkpoint": checkpoint.validate_config, "eval": _validate_eval, "compute": _validate_compute,
        "optim": _validate_optim, "mesh": _validate_mesh, "train": _validate_train,
        "testbed": _validate_testbed,
    }


# ---------------------------------------------------------------------------------------------- the whole config
def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises `errors.ConfigError` (a ValueError) with one line naming the field to change when the config is
    inconsistent: each section by its validator, then the settings that span sections. Reads no weights, builds
    nothing. The validators raise plain ValueErrors; they become config errors here, in one place."""
    as_config_error(_validate, c, num_devices)


def as_config_error(check: Callable[..., None], *args) -> None:
    """Runs a validator; its plain ValueError becomes a one-line `errors.ConfigError` (a UserError passes as is).
    The validators of every program's config (training, SFT, reward model) go through here."""
    try:
        check(*args)
    except errors.UserError:
        raise
    except ValueError as e:
        raise errors.ConfigError(str(e)) from None


def _validate(c: ml_collections.ConfigDict, num_devices: int | None) -> None:
    import jax

    validators = section_validators()
    unchecked = sorted(set(c.keys()) - set(validators))
    if unchecked:
        raise ValueError(f"config has sections without a validator: {unchecked}; add each one's check to "
                         "rlaif_jax.config.section_validators (or remove the section)")
    for name, check in validators.items():
        if name in c:
            check(c[name])

    if c.algo.estimator in ("gae", "reinforce") and c.critic.kind == "none":
        raise ValueError(f"algo.estimator={c.algo.estimator!r} needs a critic: set config.critic.kind to "
                         "'value_head' or 'separate', or use a critic-free estimator ('grpo', 'rloo')")
    if c.algo.estimator in ("grpo", "rloo", "online_dpo") and c.rollout.n_samples < 2:
        raise ValueError(f"algo.estimator={c.algo.estimator!r} compares samples of one prompt: "
                         f"set config.rollout.n_samples >= 2 (it is {c.rollout.n_samples})")
    if c.algo.estimator == "online_dpo":
        _check_online_dpo(c)
    if c.train.batch_size % c.compute.forward_microbatches:
        raise ValueError(f"config.compute.forward_microbatches={c.compute.forward_microbatches} must divide "
                         f"config.train.batch_size={c.train.batch_size} (the step's prompts split into micro-batches)")
    _check_references(c)
    if c.eval.win_rate and c.judge.mode in ("reward_model", "remote"):
        raise ValueError(f"config.eval.win_rate=True asks the judge to compare two responses, which a "
                         f"{'reward model' if c.judge.mode == 'reward_model' else 'remote judge'} (judge.mode="
                         f"{c.judge.mode!r}) cannot: set config.eval.win_rate=False (a win rate by another model: "
                         "config.eval.evaluator.path)")

    # Batch divisibility on the mesh: the rollout batch is split over data x fsdp, each update's minibatch too.
    num_devices = jax.device_count() if num_devices is None else num_devices
    fsdp, tensor = c.mesh.fsdp, c.mesh.tensor
    data = c.mesh.data if c.mesh.data != -1 else num_devices // max(fsdp * tensor, 1)
    if data * fsdp * tensor != num_devices:
        raise ValueError(f"config.mesh data={c.mesh.data} x fsdp={fsdp} x tensor={tensor} does not match the "
                         f"{num_devices} devices; change config.mesh so the product is {num_devices}")
    batch_shards = data * fsdp
    if c.train.batch_size % batch_shards:
        raise ValueError(f"config.train.batch_size={c.train.batch_size} is not divisible by the mesh's batch "
                         f"shards (data x fsdp = {batch_shards}); use a multiple of {batch_shards}")
    per_update = c.algo.minibatches * c.optim.grad_accum
    if c.algo.estimator == "online_dpo":  # it learns from each prompt's (chosen, rejected) pair of rows
        rows, group, what = 2 * c.train.batch_size, 2, (
            "rows of (chosen, rejected) pairs per step (2 x train.batch_size)")
    else:
        rows, group, what = c.train.batch_size * c.rollout.n_samples, 1, (
            "responses per step (train.batch_size x rollout.n_samples)")
    if rows % (per_update * group) or (rows // per_update) % batch_shards:
        raise ValueError(
            f"{rows} {what} cannot be split into algo.minibatches={c.algo.minibatches} x optim.grad_accum="
            f"{c.optim.grad_accum} micro-batches{' of whole pairs' if group == 2 else ''} of a size divisible by "
            f"data x fsdp = {batch_shards}; change one of them")


def _check_references(c: ml_collections.ConfigDict) -> None:
    """A pairwise reward names its baseline, a dataset reference is read only where something uses it, and a judge
    template's {reference} slot has a reference column to fill it."""
    baseline, field = c.reward.pairwise_baseline, c.data.reference_field
    pairwise_reward = c.judge.mode == "pairwise" and c.algo.estimator != "online_dpo"
    if pairwise_reward and not baseline:
        raise ValueError("config.judge.mode='pairwise' scores each sample against a baseline: set "
                         "reward.pairwise_baseline='reference_sample' (a sample of the frozen reference policy) or "
                         "'dataset_reference' (with config.data.reference_field)")
    if baseline and not pairwise_reward:
        raise ValueError(f"reward.pairwise_baseline={baseline!r} is only read by a pairwise judge's reward "
                         f"(judge.mode='pairwise', an estimator other than online_dpo); set it to ''")
    uses_slot = "{reference}" in (c.judge.template or "") + (c.eval.pairwise_template or "")
    evaluator_reads = bool(c.eval.evaluator.path) and c.eval.evaluator.baseline == "reference"
    if evaluator_reads and not field:
        raise ValueError("config.eval.evaluator.baseline='reference' compares with the data's reference responses: "
                         "set config.data.reference_field to their column")
    if baseline == "dataset_reference" and not field:
        raise ValueError("reward.pairwise_baseline='dataset_reference' needs config.data.reference_field (the "
                         "column of reference responses)")
    if uses_slot and not field:
        raise ValueError("config.judge.template has {reference}: set config.data.reference_field to the column "
                         "that fills it")
    if field and not (uses_slot or baseline == "dataset_reference" or evaluator_reads):
        raise ValueError(f"config.data.reference_field={field!r} is read by nothing: use it as the pairwise "
                         "baseline (reward.pairwise_baseline='dataset_reference'), in the judge template's "
                         "{reference} slot or as the evaluator's baseline (config.eval.evaluator.baseline="
                         "'reference'), or clear it")


def _check_online_dpo(c: ml_collections.ConfigDict) -> None:
    """What online_dpo needs of the other sections: a pairwise judge (a judge ensemble's mean), no critic, no reward
    shaping."""
    if c.judge.mode != "pairwise":
        raise ValueError(f"algo.estimator='online_dpo' learns from a pairwise judge's preferences: set "
                         f"config.judge.mode='pairwise' (it is {c.judge.mode!r}) with a {{response_b}} template")
    if c.judge.ensemble_aggregate != "mean":
        # min_k P_k(a > b) = 1 - max_k P_k(b > a): a pessimistic aggregate lowers both orders of a pair.
        raise ValueError(f"config.judge.ensemble_aggregate={c.judge.ensemble_aggregate!r} with algo.estimator="
                         "'online_dpo': its win rates need P(b better) = 1 - P(a better), which only the members' "
                         "'mean' keeps; set config.judge.ensemble_aggregate='mean'")
    if c.critic.kind != "none":
        raise ValueError(f"algo.estimator='online_dpo' trains no critic: set config.critic.kind='none' "
                         f"(it is {c.critic.kind!r})")
    if len(c.reward.rule_weights):
        raise ValueError(f"reward.rule_weights={c.reward.rule_weights.to_dict()} weights rule terms into a scalar "
                         "reward, which online_dpo does not use: set reward.rule_weights={}")
    if len(c.reward.functions):
        raise ValueError(f"reward.functions={c.reward.functions.to_dict()} are terms of a scalar reward, which "
                         "online_dpo does not use: set reward.functions={} and reward.function_weights={}")
    for name, off in REWARD_SHAPING_OFF.items():
        if c.reward[name] != off:
            raise ValueError(f"reward.{name}={c.reward[name]!r} shapes a scalar reward, which online_dpo does not "
                             f"use (its KL strength is algo.dpo_beta): set reward.{name}={off!r}")
