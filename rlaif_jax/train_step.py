"""The one compiled RLAIF step: rollout -> judge -> reference/values -> shaping -> advantages -> update.

    train_step(state, frozen, prompts_bp, prompt_mask_bp[, references_bf, reference_mask_bf]) -> (state, metrics)

is one `jax.jit` with in/out shardings on the mesh and `state` donated. Python only feeds prompts in and
reads metrics out. The phases are separate functions so that (a) the host path (the judge's tokenizer differs
from the policy's, or Python reward functions score the text) can run `rollout_phase` and `learn_phase` as two
programs with the host work between them (`make_host_judge_step`), and (b) the step benchmark can compile each
phase alone.

Trainable params are one pytree, `state.params`:
  {"policy": ...}                                        critic.kind == "none"   (GRPO, RLOO)
  {"policy": ..., "value_head": {kernel, bias}}          critic.kind == "value_head" (shares the backbone)
  {"policy": ..., "critic": {"backbone": ..., "head": ...}}   critic.kind == "separate"
  {"policy": ..., "critic": {"lora": ..., "head": ...}}       ... with critic.lora_rank > 0 (`critic_backbone`)
With policy.lora_rank > 0 "policy" holds the policy's LoRA adapters (`trained_policy`, rlaif_jax/lora.py).
One optax optimiser updates all of it; the frozen reference and judge (and a LoRA critic's reward-model base) live
in `frozen`.

A pairwise judge as the reward of the PPO family scores each sample against a baseline response of its prompt
(`judge_inputs`): a sample of the frozen reference policy drawn in the same step, or the data's reference response
passed in with the prompts (`reward.pairwise_baseline`).

Online DPO (`algo.estimator = "online_dpo"`, critic.kind == "none") runs the same rollout, then judges every two
samples of a prompt with the pairwise judge (`judge_phase`), and learns from each prompt's chosen and rejected
response with the DPO loss against the reference (`dpo_learn_phase`) through the same epochs x minibatches update
(`run_updates`), in the same one compiled step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from rlaif_jax import algorithms, judging, lora, ops, reward_functions, reward_rules, rewards
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

Params = Any


@flax.struct.dataclass
class TrainState:
    params: Params            # trainable: policy (+ value head or separate critic)
    opt_state: Any
    reward: rewards.RewardState  # KL controller and running score statistics
    rng: jax.Array            # split once per step; never a constant key inside the step
    step: jax.Array           # () int32, completed steps
    skipped_updates: jax.Array  # () int32, optimizer updates dropped by the non-finite guard


@flax.struct.dataclass
class Frozen:
    reference: Params         # the initial policy, frozen
    judge: Params             # judge params (and value head in reward-model mode)
    # A judge ensemble's other members (config.judge.ensemble_paths, in order; `judge` is member 0): () = one judge.
    extra_judges: tuple[Params, ...] = ()
    # The frozen backbone under a LoRA critic initialised from a reward model (critic.lora_rank > 0 and
    # critic.init == "reward_model"), else None. A LoRA critic initialised from the policy has `reference` as its
    # base: no second copy.
    critic_base: Params | None = None


@dataclasses.dataclass(frozen=True)
class Models:
    """The static (hashable) description of every model in the step."""
    policy: ModelConfig
    judge: ModelConfig
    critic: ModelConfig | None = None  # separate critic's backbone config
    extra_judges: tuple[ModelConfig, ...] = ()  # the configs of Frozen.extra_judges (a judge ensemble's other members)


# ---------------------------------------------------------------------------------------------- helpers
def response_logprobs(params: Params, cfg: ModelConfig, prompt_bp, prompt_mask_bp, response_br, response_mask_br,
                      temperature: float, rows_per_prompt: int = 1):
    """One forward over [prompt, response]; returns log pi(response_t | ...) at `temperature` (B, R), the entropy
    of the tempered distribution at each response position (B, R, 0 at padding; `token_logprobs`) and the hidden
    states that precede each response token (B, R, D).

    rows_per_prompt = n > 1 says rows b * n .. b * n + n - 1 share one prompt (the n samples of a group): each
    prompt then runs once (`tfm.forward_shared_prefix`), which saves (n - 1) / n of the prompt positions'
    forward and backward, where the prompts split over the batch's devices (`tfm.prompt_sharing`). Only the R
    positions that predict a response token go through the LM head (the forward's own all-position logits are
    unused, so XLA drops them): at real vocabulary sizes the prompt positions' projection is large."""
    P = prompt_bp.shape[1]
    mask_dtype = prompt_mask_bp.dtype
    if tfm.prompt_sharing(rows_per_prompt, prompt_bp.shape[0]) > 1:
        n = rows_per_prompt
        prompt_out, response_out = tfm.forward_shared_prefix(
            params, cfg, prompt_bp[::n], prompt_mask_bp[::n], response_br, response_mask_br.astype(mask_dtype))
        # The last prompt position predicts response token 0, response position t - 1 predicts token t.
        last_prompt_b1d = jnp.repeat(prompt_out.hidden[:, -1:], n, axis=0)
        hidden_brd = jnp.concatenate([last_prompt_b1d, response_out.hidden[:, :-1]], axis=1)
    else:
        tokens = jnp.concatenate([prompt_bp, response_br], axis=1)
        mask = jnp.concatenate([prompt_mask_bp, response_mask_br.astype(mask_dtype)], axis=1)
        # Position P - 1 + t holds the hidden state that predicts response token t.
        hidden_brd = tfm.forward(params, cfg, tokens, mask).hidden[:, P - 1:-1]
    logp_br, entropy_br = token_logprobs(params, cfg, hidden_brd, response_br, response_mask_br, temperature)
    return logp_br, entropy_br, hidden_brd


def token_logprobs(params: Params, cfg: ModelConfig, hidden_brd, response_br, response_mask_br, temperature: float):
    """The LM head on the hidden states before each response token: (log pi(response_t) at `temperature`, the
    tempered distribution's entropy `algorithms.entropy_from_logits`), (B, R) float32 each.

    With cfg.logprob_chunk = C > 0 (config.compute.logprob_chunk) the R positions go through the head C at a time
    (`lax.map` over blocks, each under `jax.checkpoint`): the (B, R, V) float32 logits, at real vocabularies the
    learn phase's largest activation, are never whole; the backward recomputes each block's logits from its
    hidden states (one more (B, R, D) x (D, V) matmul)."""
    def block(hidden_bcd, tokens_bc, mask_bc):
        logits_bcv = shd.constrain(tfm.unembed(params, cfg, hidden_bcd), ("batch", "length", "vocab")) / temperature
        logp_bc = jnp.take_along_axis(jax.nn.log_softmax(logits_bcv, axis=-1), tokens_bc[..., None], axis=-1)[..., 0]
        return logp_bc, algorithms.entropy_from_logits(logits_bcv, mask_bc)

    B, R = response_br.shape
    C = cfg.logprob_chunk
    if not 0 < C < R:
        return block(hidden_brd, response_br, response_mask_br)
    n = -(-R // C)

    def blocks(x_br):  # (B, R, ...) -> (n, B, C, ...), R padded to n * C
        x = jnp.pad(x_br, ((0, 0), (0, n * C - R)) + ((0, 0),) * (x_br.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, C, *x_br.shape[2:]), 1, 0)

    logp_nbc, entropy_nbc = jax.lax.map(lambda xs: jax.checkpoint(block)(*xs),
                                        (blocks(hidden_brd), blocks(response_br), blocks(response_mask_br)))
    unblock = lambda x_nbc: jnp.moveaxis(x_nbc, 0, 1).reshape(B, n * C)[:, :R]  # noqa: E731
    return unblock(logp_nbc), unblock(entropy_nbc)


def group_permutation(key: jax.Array, rows: int, n: int) -> jax.Array:
    """A random order of `rows` rows that shuffles groups of n consecutive rows (the samples of one prompt) and
    keeps each group's rows together and in order, so every minibatch cut from it holds whole groups."""
    return (jax.random.permutation(key, rows // n)[:, None] * n + jnp.arange(n)).reshape(rows)


def learning_rate_schedule(c: ml_collections.ConfigDict, total_updates: int) -> optax.Schedule:
    """Learning rate by optimizer update: linear warm-up over optim.warmup_steps, then constant / linear / cosine
    decay (to 0 at `total_updates`), `optim.schedule`."""
    o = c.optim
    decay_steps = max(total_updates - o.warmup_steps, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), after],
                                    [o.warmup_steps]) if o.warmup_steps else after
    return schedule


def make_optimizer(c: ml_collections.ConfigDict, total_updates: int) -> optax.GradientTransformation:
    """AdamW (or Adafactor, `optim.name`) at `learning_rate_schedule`, after global-norm clipping. Weight decay is
    decoupled in both (added to the update, scaled by the schedule)."""
    o, schedule = c.optim, learning_rate_schedule(c, total_updates)
    chain = [optax.clip_by_global_norm(o.max_grad_norm)] if o.max_grad_norm > 0 else []
    if o.name == "adafactor":
        chain.append(optax.adafactor(schedule, weight_decay_rate=o.weight_decay or None))
    else:
        chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*chain)


def accumulate_gradients(loss_fn: Callable, params: Params, minibatch: dict, accum: int, group: int = 1):
    """Loss, aux and gradients of one minibatch from `accum` micro-batches of its rows (a lax.scan).

    `loss_fn(params, micro) -> (loss, (metrics, rows))` returns a micro-batch's *share* of the minibatch's loss
    and metrics (normalised by the whole minibatch's counts, ops.LossNorm), so shares and their gradients are
    summed, never averaged: the result is the same for any `accum`. `rows` is None or per-row arrays of the
    micro-batch, returned concatenated over the minibatch's rows. Returns (loss, (metrics, rows), grads).

    Under a plain data-parallel mesh (`sharding.data_parallel_axis`), each device takes its own rows of the
    minibatch, sums its micro-batches' gradients, and the devices' sums are added once, after the last
    micro-batch (a `shard_map`): one gradient all-reduce per minibatch, where XLA would otherwise reduce inside
    the loop, once per micro-batch. The sum is the same; only which rows share a micro-batch differs.
    Consecutive runs of `group` rows stay in one micro-batch (2 for DPO's pairs); where a device's micro-batch
    could not hold whole groups, the micro-batches are the minibatch's own rows, as without a mesh.
    """
    if micro_batch_devices(jax.tree.leaves(minibatch)[0].shape[0], accum, group) == 1:
        return _summed_micro_batches(loss_fn, params, minibatch, accum)
    name = shd.data_parallel_axis()[0]

    def per_shard(params, shard):  # one device: its rows' gradient, summed over its micro-batches, then over devices
        loss, (metrics, rows), grads = _summed_micro_batches(loss_fn, params, shard, accum)
        return jax.lax.psum((loss, metrics, grads), name), rows

    # check_vma=False: unchecked, the gradient with respect to the replicated params is each device's own (with
    # the check JAX would sum it across devices in every micro-batch, the transpose of its implicit broadcast),
    # and the model's scans need no varying-axis annotations.
    (loss, metrics, grads), rows = jax.shard_map(
        per_shard, in_specs=(P(), P(name)), out_specs=(P(), P(name)), check_vma=False)(params, minibatch)
    return loss, (metrics, rows), grads


def micro_batch_devices(rows: int, accum: int, group: int = 1) -> int:
    """Over how many data-parallel devices `accumulate_gradients` splits each of the `accum` micro-batches of a
    minibatch of `rows` rows: the data-parallel axis's size where each device's part holds whole groups of
    `group` rows, else 1 (the loss function then sees rows // (accum * this) rows at a time)."""
    axis = shd.data_parallel_axis()
    if axis is None or rows % (accum * axis[1]) or (rows // (accum * axis[1])) % group:
        return 1
    return axis[1]


def _summed_micro_batches(loss_fn: Callable, params: Params, minibatch: dict, accum: int):
    """`accumulate_gradients` on the rows given (all of them, or one data-parallel device's)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), minibatch)

    def add_micro_batch(total, m):
        (loss, (metrics, rows)), grads = grad_fn(params, m)
        return jax.tree.map(jnp.add, total, (loss, metrics, grads)), rows

    (loss, (metrics, _)), grads = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
    (loss, metrics, grads), rows = jax.lax.scan(add_micro_batch, zeros, micro)
    rows = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), rows)
    return loss, (metrics, rows), grads


def tree_all_finite(tree) -> jax.Array:
    """() bool: no NaN or inf in any leaf (integer leaves are always finite)."""
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)],
                            jnp.array(True))


def guarded_update(optimizer: optax.GradientTransformation, grads: Params, opt_state, params: Params,
                   loss: jax.Array):
    """One optax update behind the non-finite guard: it is kept only when the loss, the gradients and the
    resulting params and optimizer state are all finite; otherwise params and optimizer state come back as they
    were. Returns (params, opt_state, kept: () bool, grad_norm)."""
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    kept = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite((new_params, new_opt_state))
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(kept, new, old), (new_params, new_opt_state),
                                     (params, opt_state))
    return params, opt_state, kept, grad_norm


def total_updates(c: ml_collections.ConfigDict) -> int:
    return c.train.steps * c.algo.epochs * c.algo.minibatches


def trained_policy(c: ml_collections.ConfigDict, params: Params, frozen: Frozen) -> Params:
    """The policy's full params from the trainable ones: themselves, or with LoRA (policy.lora_rank > 0) the frozen
    reference with the trained adapters merged in (`lora.merge`)."""
    if not c.policy.lora_rank:
        return params["policy"]
    return lora.merge(frozen.reference, params["policy"], lora.scale(c.policy))


def critic_backbone(c: ml_collections.ConfigDict, params: Params, frozen: Frozen) -> Params:
    """A separate critic's full backbone params from the trainable ones: themselves, or with LoRA
    (critic.lora_rank > 0) its frozen base (the reference, or `Frozen.critic_base` for a critic initialised from
    a reward model) with the trained adapters merged in (`lora.merge`)."""
    if not c.critic.lora_rank:
        return params["critic"]["backbone"]
    base = frozen.reference if c.critic.init == "policy" else frozen.critic_base
    return lora.merge(base, params["critic"]["lora"], lora.scale(c.critic))


def init_trainable(c: ml_collections.ConfigDict, models: Models, policy_params: Params, key: jax.Array,
                   critic_params: Params | None = None) -> Params:
    """The trainable pytree for `c.critic.kind` (see the module docstring); with LoRA the policy's part is its
    adapters (`lora.init`), and so is a separate critic's backbone. `critic_params`: a separate critic initialised
    from a reward model, {"backbone", "head"}, or {"head"} with critic LoRA (its backbone is `Frozen.critic_base`);
    None: initialised from the policy."""
    if c.policy.lora_rank:
        key, lora_key = jax.random.split(key)
        trainable = {"policy": lora.init(models.policy, c.policy.lora_rank, c.policy.lora_targets, lora_key)}
    else:
        trainable = {"policy": policy_params}
    if c.critic.kind == "value_head":
        trainable["value_head"] = tfm.init_value_head(models.policy, key)
    elif c.critic.kind == "separate":
        if critic_params is None:  # initialised from the policy: a copy that trains on its own (or, with LoRA,
            # adapters on the reference)
            critic_params = {"head": tfm.init_value_head(models.policy, key)}
            if not c.critic.lora_rank:
                critic_params["backbone"] = jax.tree.map(jnp.copy, policy_params)
        if c.critic.lora_rank:
            # A key folded from `key`, not split off it: the value head starts as it would without LoRA.
            critic_params = {**critic_params, "lora": lora.init(models.critic or models.policy, c.critic.lora_rank,
                                                                c.critic.lora_targets, jax.random.fold_in(key, 1))}
        trainable["critic"] = critic_params
    return trainable


def init_state(c: ml_collections.ConfigDict, models: Models, policy_params: Params, key: jax.Array,
               critic_params: Params | None = None) -> TrainState:
    """A fresh train state. Jit it with `state_shardings` as out_shardings (rlaif_jax/builder.py does) so every
    array is created in its shards."""
    init_key, rng = jax.random.split(key)
    trainable = init_trainable(c, models, policy_params, init_key, critic_params)
    optimizer = make_optimizer(c, total_updates(c))
    return TrainState(params=trainable, opt_state=optimizer.init(trainable), reward=rewards.init_state(c.reward),
                      rng=rng, step=jnp.zeros((), jnp.int32), skipped_updates=jnp.zeros((), jnp.int32))


def trainable_logical_axes(c: ml_collections.ConfigDict, models: Models) -> Params:
    """Logical axis names of every trainable param, the structure of `init_trainable`'s output."""
    axes = {"policy": (lora.logical_axes(models.policy, c.policy.lora_targets) if c.policy.lora_rank
                       else tfm.param_logical_axes(models.policy))}
    if c.critic.kind == "value_head":
        axes["value_head"] = tfm.value_head_logical_axes()
    elif c.critic.kind == "separate":
        ccfg = models.critic or models.policy
        axes["critic"] = {"head": tfm.value_head_logical_axes()}
        if c.critic.lora_rank:
            axes["critic"]["lora"] = lora.logical_axes(ccfg, c.critic.lora_targets)
        else:
            axes["critic"]["backbone"] = tfm.param_logical_axes(ccfg)
    return axes


def state_shardings(c: ml_collections.ConfigDict, models: Models, mesh: jax.sharding.Mesh,
                    abstract_state: TrainState) -> TrainState:
    """Shardings of the whole train state: params by their logical axes, every optimizer leaf of its param's
    shape (Adam's moments, Adafactor's unfactored ones) like its param, the small rest (step, counters, KL
    controller, rng, Adafactor's factored row and column statistics) replicated. Stated explicitly rather than
    left to propagation, which may replicate `zeros_like` moments."""
    params = shd.tree_shardings(mesh, trainable_logical_axes(c, models), abstract_state.params)
    replicated = shd.replicated(mesh)
    opt_state = optimizer_state_shardings(make_optimizer(c, total_updates(c)), abstract_state.opt_state,
                                          abstract_state.params, params, replicated)
    rest = jax.tree.map(lambda _: replicated, abstract_state.replace(params=None, opt_state=None))
    return rest.replace(params=params, opt_state=opt_state)


def optimizer_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, abstract_params: Params,
                              param_shardings, replicated: jax.sharding.Sharding):
    """Each optimizer-state leaf that has its param's shape sharded like the param, every other leaf (counts,
    Adafactor's factored row / column statistics, which drop one of the param's axes) replicated."""
    return optax.tree_map_params(
        optimizer, lambda leaf, sharding, param: sharding if leaf.shape == param.shape else replicated,
        abstract_opt_state, param_shardings, abstract_params, transform_non_params=lambda _: replicated)


def _values(params: Params, c: ml_collections.ConfigDict, models: Models, frozen: Frozen, policy_hidden_brd,
            prompt_bp, prompt_mask_bp, response_br, response_mask_br, rows_per_prompt: int):
    """Critic values V(s_t) at the state before each response token, (B, R) float32 (zeros without a critic)."""
    if c.critic.kind == "value_head":
        return tfm.apply_value_head(params["value_head"], policy_hidden_brd)
    if c.critic.kind == "separate":
        ccfg = models.critic or models.policy
        _, _, hidden = response_logprobs(critic_backbone(c, params, frozen), ccfg, prompt_bp, prompt_mask_bp,
                                         response_br, response_mask_br, 1.0, rows_per_prompt)
        return tfm.apply_value_head(params["critic"]["head"], hidden)
    return jnp.zeros(response_br.shape, jnp.float32)


def make_loss_fn(c: ml_collections.ConfigDict, models: Models, kl_coef: jax.Array, rows_per_prompt: int,
                 frozen: Frozen) -> Callable:
    """`loss_fn(params, micro, norm) -> (loss, (metrics, values))`: the update's loss on one micro-batch (a dict
    of the learn phase's per-row arrays), as its share of the minibatch's (norm: the minibatch's ops.LossNorm):
    PPO-clip policy loss, entropy bonus, value loss (with a critic) and the KL loss term (KL not in the reward),
    all aggregated with c.algo.loss_agg. Metrics are shares of the minibatch's token means too; `values` are the
    critic's values of the micro-batch's rows (None without a critic), for the minibatch's explained variance."""
    temperature = c.rollout.temperature

    def loss_fn(params: Params, d: dict, norm: ops.LossNorm):
        logp, entropy, hidden = response_logprobs(trained_policy(c, params, frozen), models.policy, d["prompt"],
                                                  d["pmask"], d["resp"], d["rmask"], temperature, rows_per_prompt)
        loss, metrics = algorithms.ppo_policy_loss(logp, d["old_logp"], d["advantages"], d["rmask"], c.algo, norm)
        metrics["policy/logp_mismatch"] = ops.aggregate(jnp.abs(jax.lax.stop_gradient(logp) - d["old_logp"]),
                                                        d["rmask"], "token_mean", norm)
        ent_loss, ent_metrics = algorithms.entropy_loss(entropy, d["rmask"], c.algo, norm)
        loss, metrics = loss + ent_loss, {**metrics, **ent_metrics}
        values = None
        if c.critic.kind != "none":
            values = _values(params, c, models, frozen, hidden, d["prompt"], d["pmask"], d["resp"], d["rmask"],
                             rows_per_prompt)
            v_loss, v_metrics = algorithms.value_loss(values, d["old_values"], d["returns"], d["rmask"], c.algo,
                                                      norm)
            loss, metrics = loss + v_loss, {**metrics, **v_metrics}
            values = jax.lax.stop_gradient(values)
        if not c.reward.kl_in_reward:
            kl_loss, kl = rewards.kl_loss_term(logp, d["ref_logp"], d["rmask"], kl_coef, c.reward.kl_estimator,
                                               c.algo.loss_agg, norm)
            loss, metrics = loss + kl_loss, {**metrics, "policy/kl_loss_term": kl}
        return loss, (metrics, values)

    return loss_fn


def make_dpo_loss_fn(c: ml_collections.ConfigDict, models: Models, rows_per_prompt: int, frozen: Frozen) -> Callable:
    """`loss_fn(params, micro, pairs) -> (loss, (metrics, None))`: online DPO's loss on one micro-batch of
    (chosen, rejected) rows laid out in consecutive pairs, as its share of the minibatch's `pairs` pairs
    (`algorithms.dpo_loss`). Sequence log-probs are of the model itself, at temperature 1 whatever the sampling
    temperature (as TRL's OnlineDPOTrainer `_forward`): DPO's implicit reward is beta log pi / pi_ref of the policy,
    and the samples only supply the pairs."""

    def loss_fn(params: Params, d: dict, pairs: int):
        logp, _, _ = response_logprobs(trained_policy(c, params, frozen), models.policy, d["prompt"], d["pmask"],
                                       d["resp"], d["rmask"], 1.0, rows_per_prompt)
        logp_p2 = ops.masked_sum(logp, d["rmask"], axis=-1).reshape(-1, 2)
        ref_p2 = d["ref_logp_sum"].reshape(-1, 2)
        loss, metrics = algorithms.dpo_loss(logp_p2[:, 0], logp_p2[:, 1], ref_p2[:, 0], ref_p2[:, 1],
                                            c.algo.dpo_beta, pairs)
        return loss, (metrics, None)

    return loss_fn


# ---------------------------------------------------------------------------------------------- phases
def rollout_phase(c, models: Models, sampling: rollout_lib.SamplingConfig, policy: Params, prompts_bp, prompt_mask_bp,
                  key) -> rollout_lib.Rollout:
    """Phase 1: the policy (its full params, `trained_policy`) samples responses (n per prompt, one prefill)."""
    return rollout_lib.rollout(policy, models.policy, prompts_bp, prompt_mask_bp, key, sampling)


def judge_inputs(c: ml_collections.ConfigDict, models: Models, sampling: rollout_lib.SamplingConfig, frozen: Frozen,
                 judge_spec: judging.JudgeSpec, prompts_bp, prompt_mask_bp, references_bf, reference_mask_bf, key
                 ) -> dict:
    """The judge's inputs besides the rollout, as keyword arguments of `judging.score` with rows repeated for the n
    samples of each prompt: the data's reference responses for a {reference} slot, and the baseline a pairwise
    reward compares every sample with (`reward.pairwise_baseline`): one sample of the frozen reference policy per
    prompt, drawn here (an extra rollout of B rows at the policy's sampling settings), or the data's reference.
    Empty for every other judge (and for online_dpo, which pairs the samples themselves)."""
    n, out = c.rollout.n_samples, {}
    repeat = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  prompt-major rows: prompt * n + sample
    if references_bf is not None and "reference" in judge_spec.slots:
        out.update(references_bf=repeat(references_bf), reference_mask_bf=repeat(reference_mask_bf))
    if c.reward.pairwise_baseline == "reference_sample":
        base = rollout_lib.rollout(frozen.reference, models.policy, prompts_bp, prompt_mask_bp, key,
                                   dataclasses.replace(sampling, n_samples=1))
        out.update(responses_b_br=repeat(base.response_tokens_br), response_b_mask_br=repeat(base.response_mask_br))
    elif c.reward.pairwise_baseline == "dataset_reference":
        out.update(responses_b_br=repeat(references_bf), response_b_mask_br=repeat(reference_mask_bf))
    return out


def judged_examples(c: ml_collections.ConfigDict) -> int:
    """Examples of one step's judge call (`judge_phase`): each response, or online_dpo's pairs of samples."""
    B, n = c.train.batch_size, c.rollout.n_samples
    return B * len(algorithms.sample_pairs(n)[0]) if c.algo.estimator == "online_dpo" else B * n


def judge_members(models: Models, judge_params: Params, extra_judges: Sequence[Params] = ()
                  ) -> tuple[tuple[Params, ModelConfig], ...]:
    """(params, config) of every judge the reward reads: the judge (`Frozen.judge`), then a judge ensemble's other
    members (`Frozen.extra_judges`, configs `models.extra_judges`)."""
    if len(extra_judges) != len(models.extra_judges):
        raise ValueError(f"{len(extra_judges)} extra judges' params for {len(models.extra_judges)} extra judge configs")
    return ((judge_params, models.judge),) + tuple(zip(extra_judges, models.extra_judges))


def ensemble_score_fn(c: ml_collections.ConfigDict, members: Sequence[tuple[Params, ModelConfig]],
                      bind: Callable) -> Callable:
    """The judge's score function as `judge_phase` calls it: `bind(params, cfg)` of each member (`judge_members`),
    aggregated by `judging.ensemble.combine` as config.judge.ensemble_aggregate says (one member: its own)."""
    return judging.ensemble.combine([bind(params, cfg) for params, cfg in members], c.judge.ensemble_aggregate,
                                    c.judge.ensemble_std_coef)


def token_space_score_fn(c: ml_collections.ConfigDict, models: Models, judge_spec: judging.JudgeSpec, judge_params,
                         score: Callable | None = None, extra_judges: tuple = ()) -> Callable:
    """`judging.score` (or `score_jit`) with the judge bound, as `judge_phase` calls it: the prompt part of a group's
    judge rows runs once where config.compute.share_prompt_forward says so. With a judge ensemble, `extra_judges`
    are the other members' params (`Frozen.extra_judges`): each member scores the rows and the scores are
    aggregated (`ensemble_score_fn`)."""
    score = judging.score if score is None else score  # looked up at call time (tests wrap judging.score)
    return ensemble_score_fn(c, judge_members(models, judge_params, extra_judges), lambda params, cfg: functools.partial(
        score, params, cfg, judge_spec, share_prompt=c.compute.share_prompt_forward))


def judge_phase(c: ml_collections.ConfigDict, score_fn: Callable, roll: rollout_lib.Rollout, key,
                inputs: dict | None = None) -> tuple[jax.Array, judging.JudgeMetrics]:
    """Phase 2: the judge's score of every rollout row, (B,), and its metrics. `score_fn` is `judging.score` (or
    `judging.score_host`) with the judge's params, config and spec bound (`token_space_score_fn`); `inputs` its
    other inputs (`judge_inputs`: references, a pairwise reward's baseline responses).

    online_dpo: the pairwise judge compares every two samples of a prompt (`algorithms.sample_pairs`), both
    orders, in one batch; a row's score is its win rate against the other samples of its prompt
    (`algorithms.win_rates`), from which the learn phase picks the chosen and rejected response."""
    prompt, pmask = roll.prompt_tokens_bp, roll.prompt_mask_bp
    resp, rmask = roll.response_tokens_br, roll.response_mask_br
    n = c.rollout.n_samples
    if c.algo.estimator != "online_dpo":
        # rows_per_prompt: the n samples of a prompt are judged under one principle (principles mode).
        return score_fn(prompt, pmask, resp, rmask, key, rows_per_prompt=n, **(inputs or {}))
    first, second = algorithms.sample_pairs(n)
    group_start = np.arange(resp.shape[0] // n)[:, None] * n
    rows_a, rows_b = (group_start + first).reshape(-1), (group_start + second).reshape(-1)
    p_a_better, metrics = score_fn(prompt[rows_a], pmask[rows_a], resp[rows_a], rmask[rows_a], key,
                                   rows_per_prompt=len(first), responses_b_br=resp[rows_b],
                                   response_b_mask_br=rmask[rows_b])
    return algorithms.win_rates(p_a_better, n), metrics


def run_updates(c: ml_collections.ConfigDict, loss_fn: Callable, minibatch_norm: Callable, params: Params,
                opt_state, data: dict, group: int, key, whole_groups: int = 1) -> tuple[Params, Any, jax.Array, dict]:
    """Phase 6: lax.scan over epochs x minibatches of the per-row arrays `data`, each minibatch's gradient
    accumulated over grad_accum micro-batches (`accumulate_gradients`) and applied behind the non-finite guard.

    Every epoch shuffles whole groups of `group` consecutive rows (`group_permutation`); a micro-batch holds whole
    runs of `whole_groups` rows (those the loss needs together: DPO's pairs). `loss_fn(params, micro,
    norm)` is called with `norm = minibatch_norm(minibatch)`, the minibatch's denominators counted once.
    Returns (params, opt_state, skipped updates, metrics of every update, each (epochs, minibatches))."""
    B = next(iter(data.values())).shape[0]
    mb, accum = c.algo.minibatches, c.optim.grad_accum
    optimizer = make_optimizer(c, total_updates(c))

    def minibatch_update(carry, d):
        params, opt_state, skipped = carry
        norm = minibatch_norm(d)
        loss, (metrics, values), grads = accumulate_gradients(lambda p, m: loss_fn(p, m, norm), params, d, accum,
                                                              whole_groups)
        if values is not None:  # not a mean, so computed on the whole minibatch rather than summed
            metrics["value/explained_variance"] = algorithms.explained_variance(values, d["returns"], d["rmask"])
        params, opt_state, ok, grad_norm = guarded_update(optimizer, grads, opt_state, params, loss)
        metrics = {**metrics, "optim/loss": loss, "optim/grad_norm": grad_norm}
        return (params, opt_state, skipped + (~ok).astype(jnp.int32)), metrics

    def epoch(carry, epoch_key):
        perm = group_permutation(epoch_key, B, group)
        shuffled = jax.tree.map(lambda x: x[perm].reshape((mb, B // mb) + x.shape[1:]), data)
        return jax.lax.scan(minibatch_update, carry, shuffled)

    (params, opt_state, skipped), update_metrics = jax.lax.scan(
        epoch, (params, opt_state, jnp.zeros((), jnp.int32)), jax.random.split(key, c.algo.epochs))
    return params, opt_state, skipped, update_metrics


def pre_update_forwards(c: ml_collections.ConfigDict, models: Models, state: TrainState, frozen: Frozen,
                        roll: rollout_lib.Rollout) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Phase 3 (PPO family): (reference log-probs, log-probs before the update, critic values), each (B, R) and
    without gradient. Plan mode compiles it alone to show its memory."""
    temperature = c.rollout.temperature
    prompt, pmask = roll.prompt_tokens_bp, roll.prompt_mask_bp
    resp, rmask = roll.response_tokens_br, roll.response_mask_br.astype(jnp.float32)
    # "Old" log-probs are the sampler's own: log pi(token) at the temperature under these very params (a second
    # forward would agree to ~1e-7; `policy/logp_mismatch` measures that at the first update).
    old_logp = roll.policy_logp_br
    # The n samples of a prompt are consecutive rows: forwards over whole groups run each prompt once.
    share = c.rollout.n_samples if c.compute.share_prompt_forward else 1
    reference = not (c.reward.kl_coef == 0 and not c.reward.adaptive_kl)  # KL weighted by a fixed 0: no forward

    def forwards(prompt, pmask, resp, rmask):  # the rows of one micro-batch (compute.forward_microbatches)
        ref_logp = None
        if reference:
            ref_logp, _, _ = response_logprobs(frozen.reference, models.policy, prompt, pmask, resp, rmask,
                                               temperature, share)
        old_hidden = None
        if c.critic.kind == "value_head":  # the value head reads the policy's hidden states
            _, _, old_hidden = response_logprobs(trained_policy(c, state.params, frozen), models.policy, prompt, pmask,
                                                 resp, rmask, temperature, share)
        return ref_logp, _values(state.params, c, models, frozen, old_hidden, prompt, pmask, resp, rmask, share)

    m = c.compute.forward_microbatches
    ref_logp, old_values = tfm.map_microbatches(forwards, m, prompt, pmask, resp, rmask,
                                                group=tfm.prompt_sharing(share, prompt.shape[0] // m))
    if not reference:
        ref_logp = old_logp  # (and no KL metrics)
    return jax.lax.stop_gradient((ref_logp, old_logp, old_values))


def learn_phase(c: ml_collections.ConfigDict, models: Models, state: TrainState, frozen: Frozen,
                roll: rollout_lib.Rollout, scores_b, judge_metrics: dict, key,
                host_terms: reward_functions.HostTerms | None = None, forwards: tuple | None = None
                ) -> tuple[TrainState, dict]:
    """Phases 3-6: reference log-probs and values, reward shaping, advantages, epochs x minibatches update
    (online_dpo: `dpo_learn_phase`). `host_terms`: the Python reward functions' terms, computed on the host
    (the host path's `HostJudgeStep.functions`), or None. `forwards`: phase 3's result (`pre_update_forwards` of
    this state and rollout) when computed already, so that the step benchmark can time phases 4-6 alone; None
    (training): computed here."""
    if c.algo.estimator == "online_dpo":
        return dpo_learn_phase(c, models, state, frozen, roll, scores_b, judge_metrics, key)
    prompt, pmask = roll.prompt_tokens_bp, roll.prompt_mask_bp
    resp, rmask = roll.response_tokens_br, roll.response_mask_br.astype(jnp.float32)

    # 3 log-probs before the update, reference log-probs, critic values.
    if forwards is None:
        forwards = pre_update_forwards(c, models, state, frozen, roll)
    ref_logp, old_logp, old_values = forwards
    kl_off = c.reward.kl_coef == 0 and not c.reward.adaptive_kl
    n = c.rollout.n_samples
    share = n if c.compute.share_prompt_forward else 1  # the forwards run each prompt once per group

    # 4 shaping: scores and the responses' rule terms -> per-token rewards (KL, penalties, normalisation)
    rule_inputs = reward_rules.RuleInputs(prompt, pmask, resp, rmask, roll.stopped_b)
    rule_terms = reward_rules.compute_terms(c.reward, rule_inputs)
    host_terms = host_terms or reward_functions.HostTerms({}, {})
    token_rewards, reward_state, reward_metrics = rewards.shape_rewards(
        c.reward, state.reward, scores_b, old_logp, ref_logp, rmask, roll.stopped_b, rule_terms, host_terms.values)
    for name, none_b in sorted(host_terms.none.items()):
        reward_metrics[f"reward/function/{name}/none_frac"] = jnp.mean(none_b)
    if kl_off:  # they would read 0 without a reference forward: not reported rather than wrong
        reward_metrics = {k: v for k, v in reward_metrics.items() if not k.startswith("kl/k")}

    # 5 advantages
    adv = algorithms.compute_advantages(c.algo, token_rewards, old_values, rmask, c.rollout.n_samples)

    # 6 update: lax.scan over epochs x minibatches, each minibatch over grad_accum micro-batches
    data = dict(prompt=prompt, pmask=pmask, resp=resp, rmask=rmask, old_logp=old_logp, ref_logp=ref_logp,
                old_values=old_values, advantages=adv.advantages_br, returns=adv.returns_br)
    B = resp.shape[0]
    # Minibatches are drawn as whole groups (`run_updates`), so a micro-batch holds whole groups whenever its
    # row count is a multiple of n, and its forward shares each prompt too.
    micro_rows = B // (c.algo.minibatches * c.optim.grad_accum
                       * micro_batch_devices(B // c.algo.minibatches, c.optim.grad_accum))
    micro_share = share if micro_rows % n == 0 else 1
    loss_fn = make_loss_fn(c, models, state.reward.kl.coef, micro_share, frozen)
    params, opt_state, skipped, update_metrics = run_updates(
        c, loss_fn, lambda d: ops.loss_norm(d["rmask"]), state.params, state.opt_state, data, n, key)
    # The first update's forward runs with the params that sampled: its distance to the sampler's log-probs is
    # the rollout / training mismatch. Every other metric is averaged over the step's updates (NaN-safe).
    mismatch = update_metrics.pop("policy/logp_mismatch")[0, 0]
    update_metrics = jax.tree.map(lambda x: jnp.nanmean(x), update_metrics)
    # A step with a skipped update saw non-finite numbers: its scores and KL must not enter the running score
    # statistics or the KL controller either, or one NaN score would make every later step NaN.
    keep_reward = (skipped == 0) & tree_all_finite(reward_state)
    reward_state = jax.tree.map(lambda new, old: jnp.where(keep_reward, new, old), reward_state, state.reward)

    lengths = rmask.sum(-1)
    metrics = {
        **judge_metrics, **reward_metrics, **update_metrics,
        "judge/score": jnp.mean(scores_b),
        "response/length": jnp.mean(lengths),
        "response/stopped_frac": jnp.mean(roll.stopped_b.astype(jnp.float32)),
        # Rollout sampled with the cache; the training forward recomputes without it: they should agree.
        "policy/logp_mismatch": mismatch,
        "value/explained_variance_before": algorithms.explained_variance(old_values, adv.returns_br, rmask),
        "guard/skipped_updates": skipped,
    }
    if c.critic.kind == "none":
        metrics = {k: v for k, v in metrics.items() if not k.startswith("value/")}
    new_state = state.replace(params=params, opt_state=opt_state, reward=reward_state, step=state.step + 1,
                              skipped_updates=state.skipped_updates + skipped)
    return new_state, metrics


def dpo_learn_phase(c: ml_collections.ConfigDict, models: Models, state: TrainState, frozen: Frozen,
                    roll: rollout_lib.Rollout, win_rates_b, judge_metrics: dict, key) -> tuple[TrainState, dict]:
    """Online DPO's phases 3-6 (Guo et al. 2024): each prompt's chosen and rejected response from the judge's win
    rates (`algorithms.choose_pairs`), their reference log-probs, then epochs x minibatches of the DPO loss
    (`make_dpo_loss_fn`). No shaping, advantages or critic; the reward state is left as it is."""
    n = c.rollout.n_samples
    chosen_g, rejected_g = algorithms.choose_pairs(win_rates_b, n)
    # Each prompt's (chosen, rejected) as two consecutive rows: a pair is a group of 2 that shares its prompt.
    rows = jnp.stack([chosen_g, rejected_g], axis=1).reshape(-1)
    prompt, pmask = roll.prompt_tokens_bp[rows], roll.prompt_mask_bp[rows]
    resp, rmask = roll.response_tokens_br[rows], roll.response_mask_br[rows].astype(jnp.float32)
    share = 2 if c.compute.share_prompt_forward else 1

    # 3 reference log-probs of the pairs, at temperature 1 as the policy's in the loss
    ref_logp, _, _ = response_logprobs(frozen.reference, models.policy, prompt, pmask, resp, rmask, 1.0, share)
    ref_logp_sum = jax.lax.stop_gradient(ops.masked_sum(ref_logp, rmask, axis=-1))

    # 6 update: micro-batches hold whole pairs (config validation), so every forward shares each pair's prompt
    data = dict(prompt=prompt, pmask=pmask, resp=resp, rmask=rmask, ref_logp_sum=ref_logp_sum)
    params, opt_state, skipped, update_metrics = run_updates(
        c, make_dpo_loss_fn(c, models, share, frozen), lambda d: d["rmask"].shape[0] // 2, state.params, state.opt_state,
        data, 2, key, whole_groups=2)
    update_metrics = jax.tree.map(lambda x: jnp.nanmean(x), update_metrics)

    metrics = {
        **judge_metrics, **update_metrics,
        # How decided the judge was: 0 when it cannot tell the pair apart, 1 when it is certain (n = 2: |2p - 1|).
        "dpo/judge_margin": jnp.mean(win_rates_b[chosen_g] - win_rates_b[rejected_g]),
        "response/length": jnp.mean(roll.response_mask_br.sum(-1).astype(jnp.float32)),
        "response/stopped_frac": jnp.mean(roll.stopped_b.astype(jnp.float32)),
        "guard/skipped_updates": skipped,
    }
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                              skipped_updates=state.skipped_updates + skipped)
    return new_state, metrics


def make_step_fn(c: ml_collections.ConfigDict, models: Models, judge_spec: judging.JudgeSpec) -> Callable:
    """The un-jitted fused step: all six phases in one function (see `make_train_step`)."""
    sampling = rollout_lib.SamplingConfig.from_config(c.rollout, models.policy)

    def step(state: TrainState, frozen: Frozen, prompts_bp, prompt_mask_bp, references_bf=None,
             reference_mask_bf=None):
        rng, k_roll, k_judge, k_update = jax.random.split(state.rng, 4)
        roll = rollout_phase(c, models, sampling, trained_policy(c, state.params, frozen), prompts_bp, prompt_mask_bp,
                             k_roll)
        inputs = judge_inputs(c, models, sampling, frozen, judge_spec, prompts_bp, prompt_mask_bp, references_bf,
                              reference_mask_bf, jax.random.fold_in(k_roll, 1))
        scores_b, judge_metrics = judge_phase(c, token_space_score_fn(c, models, judge_spec, frozen.judge,
                                                                      extra_judges=frozen.extra_judges),
                                              roll, k_judge, inputs)
        judge_metrics = judge_metrics.summary(judge_spec)
        new_state, metrics = learn_phase(c, models, state, frozen, roll, scores_b, judge_metrics, k_update)
        return new_state.replace(rng=rng), metrics

    return step


def batch_shardings(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple:
    """Shardings of the step's data arguments: prompts and their mask, then the references and their mask when
    config.data.reference_field is set (the step is called with those two only then)."""
    batch = shd.batch_sharding(mesh, 2)
    return (batch,) * (4 if c.data.reference_field else 2)


def make_train_step(c: ml_collections.ConfigDict, models: Models, judge_spec: judging.JudgeSpec,
                    mesh: jax.sharding.Mesh, state_shardings, frozen_shardings) -> Callable:
    """`train_step(state, frozen, prompts_bp, prompt_mask_bp, references_bf=None, reference_mask_bf=None) ->
    (state, metrics)`, one jax.jit with in/out shardings on `mesh` and the state donated: it compiles once per run.
    The references (right-padded, `data.PromptBatch`) are passed when config.data.reference_field is set."""
    return jax.jit(make_step_fn(c, models, judge_spec),
                   in_shardings=(state_shardings, frozen_shardings, *batch_shardings(c, mesh)),
                   out_shardings=(state_shardings, shd.replicated(mesh)),
                   donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class HostJudgeStep:
    """The step of the host path (`make_host_judge_step`), called like the fused step (plus `columns`). Its
    compiled programs are fields so that plan mode can compile each from shapes."""
    sample: Callable  # jit: (state, frozen, prompts_bp, prompt_mask_bp[, references_bf, reference_mask_bf])
    #                   -> (rollout, judge inputs (`judge_inputs`), keys = (rng, k_judge, k_update))
    judge: Callable   # host: (frozen, rollout, judge inputs, k_judge) -> (scores_b, judge metrics summary)
    functions: Callable  # host: (rollout, columns) -> (reward_functions.HostTerms, seconds)
    learn: Callable   # jit, state donated: (state, frozen, rollout, scores_b, judge_metrics, host terms, keys)
    #                   -> (state, metrics)

    def __call__(self, state: TrainState, frozen: Frozen, prompts_bp, prompt_mask_bp, references_bf=None,
                 reference_mask_bf=None, *, columns: dict[str, list] | None = None):
        """`columns`: this process's prompts' dataset columns (`reward_functions.columns_of`), for the reward
        functions."""
        references = () if references_bf is None else (references_bf, reference_mask_bf)
        roll, inputs, keys = self.sample(state, frozen, prompts_bp, prompt_mask_bp, *references)
        scores_b, judge_metrics = self.judge(frozen, roll, inputs, keys[1])
        host_terms, seconds = self.functions(roll, columns)
        state, metrics = self.learn(state, frozen, roll, scores_b, judge_metrics, host_terms, keys)
        if host_terms.values:
            metrics = {**metrics, "time/reward_functions_s": seconds}
        return state, metrics


def host_path_reasons(c: ml_collections.ConfigDict, judge_spec: judging.JudgeSpec) -> tuple[str, ...]:
    """Why the step leaves the graph (empty: the one fused program): the judge's tokenizer differs from the
    policy's, the judge is remote, Python reward functions."""
    if judge_spec.mode == "remote":
        judge = ("a remote judge",)
    else:
        judge = ("the judge's tokenizer differs from the policy's",) if judge_spec.path == "host" else ()
    return judge + (
        (f"Python reward functions {sorted(c.reward.functions)}",) if len(c.reward.functions) else ())


def make_host_judge_step(c: ml_collections.ConfigDict, models: Models, judge_spec: judging.JudgeSpec,
                         mesh: jax.sharding.Mesh, state_shardings, frozen_shardings, policy_tokenizer,
                         judge_tokenizer) -> HostJudgeStep:
    """The step when a reward leaves the graph (`host_path_reasons`): the rollout and the learn phase as two
    compiled programs with the host work between them: the judge (on its spec's path: the token-space `score`
    jitted alone, or decode -> render -> re-tokenise -> judge forward, `judging.score_host`), then the Python reward functions on the
    decoded text (`reward_functions.compute_terms`, each process on its own rows). A remote judge
    (`judging.remote`) is called on the host, each process sending its own rows. Same signature and the same PRNG
    stream as the fused step, so both paths sample the same responses."""
    sampling = rollout_lib.SamplingConfig.from_config(c.rollout, models.policy)
    replicated = shd.replicated(mesh)
    functions = reward_functions.load(c.reward)

    @functools.partial(jax.jit, in_shardings=(state_shardings, frozen_shardings, *batch_shardings(c, mesh)))
    def sample(state, frozen, prompts_bp, prompt_mask_bp, references_bf=None, reference_mask_bf=None):
        rng, k_roll, k_judge, k_update = jax.random.split(state.rng, 4)
        roll = rollout_phase(c, models, sampling, trained_policy(c, state.params, frozen), prompts_bp, prompt_mask_bp,
                             k_roll)
        inputs = judge_inputs(c, models, sampling, frozen, judge_spec, prompts_bp, prompt_mask_bp, references_bf,
                              reference_mask_bf, jax.random.fold_in(k_roll, 1))
        return roll, inputs, (rng, k_judge, k_update)

    client = (judging.remote.RemoteJudge(c.judge, lambda p, r: judging.spec.render(judge_spec, {
        "prompt": p, "response": r})) if judge_spec.mode == "remote" else None)

    def judge(frozen, roll, inputs, k_judge):
        if client is not None:  # this process's rows, sent to the endpoint
            prompts, completions, _ = reward_functions.local_texts(policy_tokenizer, roll)
            scores, _, stats = client.score(prompts, completions)
            return reward_functions.to_global_rows(scores, roll.stopped_b), stats.metrics()
        if judge_spec.path == "host":
            score_fn = ensemble_score_fn(c, judge_members(models, frozen.judge, frozen.extra_judges), lambda params, cfg: functools.partial(
                judging.score_host, params, cfg, judge_spec, policy_tokenizer, judge_tokenizer))
        else:  # the path exists for the reward functions: the token-space judge, jitted on its own
            score_fn = token_space_score_fn(c, models, judge_spec, frozen.judge, judging.score_jit,
                                            frozen.extra_judges)
        scores_b, judge_metrics = judge_phase(c, score_fn, roll, k_judge, inputs)
        return scores_b, judge_metrics.summary(judge_spec)

    def host_functions(roll, columns):
        return reward_functions.compute_terms(functions, c.reward.function_neutral, policy_tokenizer, roll, columns,
                                              c.rollout.n_samples)

    @functools.partial(jax.jit, in_shardings=(state_shardings, frozen_shardings, None, None, None, None, None),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
    def learn(state, frozen, roll, scores_b, judge_metrics, host_terms, keys):
        rng, _, k_update = keys
        new_state, metrics = learn_phase(c, models, state, frozen, roll, scores_b, judge_metrics, k_update,
                                         host_terms)
        return new_state.replace(rng=rng), metrics

    return HostJudgeStep(sample, judge, host_functions, learn)
