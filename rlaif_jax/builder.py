"""The one builder of a run's models, train state and compiled step, shared by training and plan mode.

    build(c, mesh, rules)                 training: weights read straight into their shards, the train state
                                          created by a jitted init (born sharded), the step ready to call
    build(c, mesh, rules, weights=False)  plan mode: from config.json and tokenizer files alone; params and state
                                          are ShapeDtypeStructs (with shardings) to `.lower` the step with

What plan mode compiles is by construction what training compiles: every decision is taken here, once, for both:
  - the model configs, with `config.compute`'s model settings (`config.model_compute_settings`) on the trained
    models (policy, reference, critic) and its attention settings on the judge (and a judge ensemble's other
    members, config.judge.ensemble_paths: `Models.extra_judges`, `Frozen.extra_judges`)
  - the sampler's settings (`rollout.SamplingConfig`): its stop ids are the ones the judge cuts responses at
  - the judge path (`JudgeSpec.path`, from `judging.make_spec`): "token_space" or "host" (re-tokenisation, only
    with `config.train.allow_tokenizer_mismatch`); `judging.load_judge` logs it, plan mode prints it
  - the step's path (`train_step.host_path_reasons`): one fused program (`train_step.make_train_step`), or, when
    a reward leaves the graph (a host judge path, Python reward functions), two programs with the host work
    between them (`train_step.make_host_judge_step`); logged once here
  - the shardings of the params, the train state and the frozen models (every judge's as `hf.load_model` gives them;
    a LoRA critic's reward-model base, `Frozen.critic_base`, like a trained model's)

Call inside `jax.set_mesh(mesh)` and `sharding.use_rules(rules)`.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import errors
from rlaif_jax import judging, reward_model, reward_rules
from rlaif_jax import rollout as rollout_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax.config import model_compute_settings
from rlaif_jax.models import fused_attention, hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


class RunParts(NamedTuple):
    """What `build` returns. With weights=False, `state` and `frozen` hold ShapeDtypeStructs."""
    models: ts.Models
    sampling: rollout_lib.SamplingConfig  # the rollout's settings, stop ids resolved
    judge_spec: judging.JudgeSpec
    policy_tokenizer: Any
    judge_tokenizer: Any
    state: ts.TrainState
    state_shardings: Any
    frozen: ts.Frozen
    step_fn: Callable  # make_train_step's jit, or make_host_judge_step's HostJudgeStep (judge_spec.path)


def _abstract_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules) -> Any:
    """A model's params as ShapeDtypeStructs with the shardings `hf.load_model` would give them."""
    shapes = tfm.abstract_params(cfg)
    return ckpt_lib.with_shardings(shapes, shd.tree_shardings(mesh, tfm.param_logical_axes(cfg), shapes, rules))


def _abstract_value_head(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A value head {kernel (D,), bias ()} as ShapeDtypeStructs, replicated like a loaded one."""
    dtype = jnp.dtype(cfg.param_dtype)
    return {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size,), dtype, sharding=shd.replicated(mesh)),
            "bias": jax.ShapeDtypeStruct((), dtype, sharding=shd.replicated(mesh))}


def _judge_from_shapes(config: ml_collections.ConfigDict, path: str, policy_tok, stop_token_ids,
                       mesh: jax.sharding.Mesh, rules) -> judging.Judge:
    """`judging.load_judge`'s result for the judge folder `path` from config.json and tokenizer files alone (params
    as ShapeDtypeStructs): the same spec, built by the same `judging.make_spec` from the same arguments, and the
    same check of a reward model's settings."""
    folder = hf.resolve_path(path, weights=False)
    cfg = hf.load_config(folder, config.dtype, config.param_dtype)
    tok = hf.load_tokenizer(folder)
    spec = judging.make_spec(config, tok, policy_tok, stop_token_ids, cfg.eos_token_ids)
    params = _abstract_params(cfg, mesh, rules)
    if spec.mode == "reward_model":
        reward_model.check_read_settings(folder, spec)
        params = reward_model.RewardModelParams(params, _abstract_value_head(cfg, mesh))
    return judging.Judge(cfg, params, spec, tok)


def _ensemble_from_shapes(config: ml_collections.ConfigDict, policy_tok, stop_token_ids, mesh: jax.sharding.Mesh,
                          rules) -> tuple[judging.Judge, ...]:
    """`judging.load_ensemble`'s result from shapes (`_judge_from_shapes` of each member, checked alike)."""
    judging.validate_config(config)
    first = _judge_from_shapes(config, config.path, policy_tok, stop_token_ids, mesh, rules)
    return (first,) + tuple(
        judging.loading.check_member(first, _judge_from_shapes(config, path, policy_tok, stop_token_ids, mesh, rules),
                                     i, path) for i, path in enumerate(config.ensemble_paths))


def check_attention(c: ml_collections.ConfigDict, plan: bool = False) -> None:
    """Raises ValueError, one line, when config.compute.attention names a kernel that this machine cannot run
    (`fused_attention.check_backend`, for the policy's and the judge's dtypes). Plan mode compiles here for
    another machine, so it checks a kernel against its own backend: only cuDNN's dtypes can fail. The program
    calls it with the config's validation, before anything loads (train.launch)."""
    attention = c.compute.attention
    backend = jax.default_backend()
    if plan:
        backend = fused_attention.KERNEL_BACKEND.get(attention, backend)
    for dtype in (c.policy.dtype, c.judge.dtype):
        fused_attention.check_backend(attention, backend, dtype)


def _attention(c: ml_collections.ConfigDict, weights: bool) -> str:
    """config.compute.attention as this build runs it (`check_attention` has refused what cannot run): plan mode
    plans a kernel ("cudnn", "splash", "fused") with "chunked", whose memory is linear in T as the kernels' is,
    and says so."""
    attention = c.compute.attention
    if weights or attention not in fused_attention.KERNELS + ("fused",):
        return attention
    log.info("plan: attention=%r is planned with 'chunked' (the kernel runs on its accelerator only; both keep "
             "memory linear in T)", attention)
    return "chunked"


def build(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, weights: bool = True) -> RunParts:
    """Models, train state and compiled step of the run of config `c` on `mesh` (see the module docstring)."""
    attention = _attention(c, weights)

    def trained_model(folder: str, setting: str) -> tuple[ModelConfig, Any]:
        """Config and params of a model the step trains (policy, separate critic; `setting` names its folder's
        config field): the compute settings apply, checked against the model (ModelConfig's one-line refusals)
        before any weight loads."""
        cfg = hf.load_config(folder, c.policy.dtype, c.policy.param_dtype)
        try:
            trained_cfg = cfg.replace(**{**model_compute_settings(c.compute), "attention": attention})
        except ValueError as e:
            raise errors.ConfigError(f"config.compute on the model of {setting}: {e}") from None
        if weights:
            _, params = hf.load_model(folder, mesh, c.policy.dtype, c.policy.param_dtype, rules)
        else:
            params = _abstract_params(cfg, mesh, rules)
        return trained_cfg, params

    # ---- policy, the sampler's settings, the judge and its path
    policy_folder = hf.resolve_path(c.policy.path, weights)
    policy_tok = hf.load_tokenizer(policy_folder)
    policy_cfg, policy_params = trained_model(policy_folder, "config.policy.path")
    reward_rules.check_token_ids(c.reward, policy_cfg.vocab_size)
    sampling = rollout_lib.SamplingConfig.from_config(c.rollout, policy_cfg)
    if c.judge.mode == "remote":  # no local model: the host path calls the endpoint
        judges = (judging.Judge(policy_cfg, {}, judging.remote_spec(c.judge, sampling.stop_ids or None), policy_tok),)
        log.info("judge: mode=remote, api=%s (an HTTP endpoint instead of a local model)", c.judge.remote_api)
    elif weights:  # load_ensemble logs each judge's path
        judges = judging.load_ensemble(c.judge, policy_tok, sampling.stop_ids or None, mesh, rules)
    else:
        judges = _ensemble_from_shapes(c.judge, policy_tok, sampling.stop_ids or None, mesh, rules)
    if len(judges) > 1:
        log.info("judge ensemble: %d judges, reward = %s of their scores%s", len(judges), c.judge.ensemble_aggregate,
                 f" (std coef {c.judge.ensemble_std_coef})" if c.judge.ensemble_aggregate == "mean_minus_std" else "")
    # The judges only run forwards: of the compute settings, their attention's and the micro-batches apply.
    judges = tuple(j._replace(cfg=j.cfg.replace(attention=attention, attention_chunk=c.compute.attention_chunk,
                                                forward_microbatches=c.compute.forward_microbatches))
                   for j in judges)
    judge = judges[0]  # judge.path's: its spec and tokenizer are every member's
    if judge.spec.path == "host" and judge.spec.mode != "remote" and not c.train.allow_tokenizer_mismatch:
        raise ValueError(
            f"the judge's tokenizer ({c.judge.path}) differs from the policy's ({c.policy.path}), so judge prompts "
            "cannot be assembled in token space; set --config.train.allow_tokenizer_mismatch=True to use the "
            "host re-tokenisation path (two compiled programs per step), or use a judge with the policy's tokenizer")

    # ---- a separate critic initialised from a reward model. With critic LoRA its backbone is frozen
    # (`Frozen.critic_base`, read once, not copied) and the train state holds its adapters and the head.
    critic_cfg = critic_params = critic_base = None
    if c.critic.kind == "separate" and c.critic.init == "reward_model":
        critic_folder = hf.resolve_path(c.critic.path, weights)
        critic_cfg, backbone = trained_model(critic_folder, "config.critic.path")
        head = reward_model.load_value_head(critic_folder, critic_cfg) if weights else _abstract_value_head(critic_cfg, mesh)
        if c.critic.lora_rank:
            critic_params, critic_base = {"head": head}, backbone
        else:
            critic_params = {"backbone": backbone, "head": head}

    # ---- the train state (born sharded) and the frozen models
    models = ts.Models(policy=policy_cfg, judge=judge.cfg, critic=critic_cfg,
                       extra_judges=tuple(j.cfg for j in judges[1:]))
    # The reference is a device-side copy (same shardings): the policy's buffers are donated to the step and
    # updated in place, and the checkpoint is read only once. With LoRA the policy's weights are not trained: they
    # are the reference, one copy, and the train state holds the adapters (lora.py).
    copy = weights and not c.policy.lora_rank
    reference = jax.tree.map(jnp.copy, policy_params) if copy else policy_params
    frozen = ts.Frozen(reference=reference, judge=judge.params, extra_judges=tuple(j.params for j in judges[1:]),
                       critic_base=critic_base)
    init = functools.partial(ts.init_state, c, models)
    key = jax.random.key(c.seed)
    state_shapes = jax.eval_shape(init, policy_params, key, critic_params)
    state_shardings = ts.state_shardings(c, models, mesh, state_shapes)
    # Jitted with out_shardings, so every array is created in its shards, never whole on one device.
    state = (jax.jit(init, out_shardings=state_shardings)(policy_params, key, critic_params) if weights
             else ckpt_lib.with_shardings(state_shapes, state_shardings))

    # ---- the compiled step of the judge's path
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    reasons = ts.host_path_reasons(c, judge.spec)
    if not reasons:
        step_fn = ts.make_train_step(c, models, judge.spec, mesh, state_shardings, frozen_shardings)
    else:
        step_fn = ts.make_host_judge_step(c, models, judge.spec, mesh, state_shardings, frozen_shardings,
                                          policy_tok, judge.tokenizer)
    log.info("train step: %s", "one fused program" if not reasons else
             "host path (rollout program -> host reward -> learn program) for " + "; ".join(reasons))
    return RunParts(models, sampling, judge.spec, policy_tok, judge.tokenizer, state, state_shardings, frozen,
                    step_fn)
