"""The experiment config: `base_config()` composes every module's section, `validate()` checks it.

Each module owns the defaults of its own section (`rewards.default_config()` is `config.reward`, and so on);
this file only assembles them and holds the sections that belong to no single module (policy, critic,
mesh, optimiser, train loop, compute settings, evaluation). Experiment files in experiments/ start from
`base_config()`, change fields, and return it locked.

`validate(config)` runs before anything is compiled or loaded, and every message says what to change.
"""
from __future__ import annotations

import ml_collections

from rlaif_jax import algorithms, rewards
from rlaif_jax import sharding as shd

CRITICS = ("value_head", "separate", "none")
SCHEDULES = ("constant", "linear", "cosine")
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

    c.critic = ml_collections.ConfigDict()
    c.critic.kind = "value_head"       # "value_head" on the policy backbone | "separate" model | "none"
    c.critic.init = "policy"           # separate critic initialised from the "policy" or a "reward_model"
    c.critic.path = ""                 # reward model folder when init == "reward_model"

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
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"      # "constant" | "linear" (decay to 0) | "cosine" (decay to 0)
    c.optim.warmup_steps = 0           # optimizer updates of linear warm-up
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
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
    return c


def compute_config() -> ml_collections.ConfigDict:
    """Defaults of `config.compute`: how the step is computed, not what it computes (each setting changes speed or
    memory, the results only by float rounding)."""
    c = ml_collections.ConfigDict()
    # Layers unrolled per step of the training forward's lax.scan (policy, reference, separate critic): 1 keeps
    # compile time flat in depth; all layers made bench_step.py's update phase ~10% faster on its 4-layer model.
    c.scan_unroll = 1
    # Forwards over whole groups (n_samples > 1) run each prompt once (tfm.forward_shared_prefix): update phase of
    # bench_step.py 1.44 -> 1.04 s. False: every row runs its prompt (the reference the shared path is tested against).
    c.share_prompt_forward = True
    return c


def eval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval` (the held-out evaluation of evaluate.py)."""
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
    return e


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {choices}")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ValueError naming the field to change when the config is inconsistent."""
    import jax

    from rlaif_jax import data, judging, metrics, rollout

    if not c.policy.path:
        raise ValueError("config.policy.path is empty: set it to an HF checkpoint folder or hub id")
    if c.compute.scan_unroll < 1:
        raise ValueError(f"config.compute.scan_unroll={c.compute.scan_unroll} must be >= 1 (1 = a rolled scan)")
    _check_choice(c.critic.kind, CRITICS, "config.critic.kind")
    _check_choice(c.critic.init, ("policy", "reward_model"), "config.critic.init")
    if c.critic.kind == "separate" and c.critic.init == "reward_model" and not c.critic.path:
        raise ValueError("config.critic.init='reward_model' needs config.critic.path (the reward model folder)")
    if c.algo.estimator in ("gae", "reinforce") and c.critic.kind == "none":
        raise ValueError(f"algo.estimator={c.algo.estimator!r} needs a critic: set config.critic.kind to "
                         "'value_head' or 'separate', or use a critic-free estimator ('grpo', 'rloo')")
    _check_choice(c.optim.schedule, SCHEDULES, "config.optim.schedule")
    for section, module in (("reward", rewards), ("algo", algorithms), ("judge", judging),
                            ("rollout", rollout), ("data", data), ("logging", metrics)):
        check = getattr(module, "validate_config", None)
        if check is not None:
            check(c[section])
    if c.algo.estimator in ("grpo", "rloo", "online_dpo") and c.rollout.n_samples < 2:
        raise ValueError(f"algo.estimator={c.algo.estimator!r} compares samples of one prompt: "
                         f"set config.rollout.n_samples >= 2 (it is {c.rollout.n_samples})")
    if c.algo.estimator == "online_dpo":
        _check_online_dpo(c)

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

# Reward settings that shape a scalar score, each with the value that turns it off: online_dpo learns from the
# judge's preferences alone, and its pull to the reference is algo.dpo_beta.
REWARD_SHAPING_OFF = {"judge_weight": 1.0, "missing_stop_mode": "none", "length_penalty": 0.0, "clip": 0.0,
                      "score_norm": "none", "kl_coef": 0.0, "adaptive_kl": False}


def _check_online_dpo(c: ml_collections.ConfigDict) -> None:
    """What online_dpo needs of the other sections: a pairwise judge, no critic, no reward shaping."""
    if c.judge.mode != "pairwise":
        raise ValueError(f"algo.estimator='online_dpo' learns from a pairwise judge's preferences: set "
                         f"config.judge.mode='pairwise' (it is {c.judge.mode!r}) with a {{response_b}} template")
    if c.critic.kind != "none":
        raise ValueError(f"algo.estimator='online_dpo' trains no critic: set config.critic.kind='none' "
                         f"(it is {c.critic.kind!r})")
    if len(c.reward.rule_weights):
        raise ValueError(f"reward.rule_weights={c.reward.rule_weights.to_dict()} weights rule terms into a scalar "
                         "reward, which online_dpo does not use: set reward.rule_weights={}")
    for name, off in REWARD_SHAPING_OFF.items():
        if c.reward[name] != off:
            raise ValueError(f"reward.{name}={c.reward[name]!r} shapes a scalar reward, which online_dpo does not "
                             f"use (its KL strength is algo.dpo_beta): set reward.{name}={off!r}")
