"""LoRA (Hu et al. 2021, arXiv:2106.09685) for the trained models (policy, separate critic): low-rank adapters on
chosen projections of every layer, the base weights frozen.

    W' = W + (alpha / r) * A @ B      A: (in, r), B: (r, out); B starts at zero, so W' = W at the start

With `policy.lora_rank = r > 0` the train state holds only the adapters (and the optimizer state only theirs);
the base policy is the frozen reference (`Frozen.reference`), one copy serving both. `merge` builds the policy's
full params from the two wherever the policy runs (rollout, learn forwards, evaluation, export), so the rest of
the code sees an ordinary param tree; the gradient reaches A and B through the merge. The export writes the merged
weights, an ordinary HF checkpoint.

A separate critic (`critic.kind = "separate"`) with `critic.lora_rank = r > 0` is the same on its own backbone:
the train state holds its adapters and value head; its frozen base is the reference too when it starts from the
policy (`critic.init = "policy"`), or the reward model's backbone (`Frozen.critic_base`) when it starts from one
(`train_step.critic_backbone` merges them).

A weight's "in" axes are the ones a token's activations contract with, its "out" axes the rest:
q / k / v (D | heads, head_dim), o (heads, head_dim | D), gate / up (D | F), down (F | D).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

Params = dict[str, Any]

# Projection -> number of leading "in" axes after the layer axis (see the module docstring).
IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def validate_config(p: ml_collections.ConfigDict, section: str = "config.policy") -> None:
    """The LoRA fields of a trained model's section (`section`: its name in messages, config.policy or
    config.critic)."""
    if not (isinstance(p.lora_rank, int) and p.lora_rank >= 0):
        raise ValueError(f"{section}.lora_rank={p.lora_rank!r} must be an int >= 0 (0 = train every weight)")
    if p.lora_rank and not p.lora_targets:
        raise ValueError(f"{section}.lora_targets is empty: name the projections to adapt, e.g. "
                         f"{list(DEFAULT_TARGETS)}")
    unknown = sorted(set(p.lora_targets) - set(IN_AXES))
    if unknown:
        raise ValueError(f"{section}.lora_targets has {unknown}; choose from {list(IN_AXES)}")
    if not p.lora_alpha > 0:
        raise ValueError(f"{section}.lora_alpha={p.lora_alpha} must be > 0")


def _targets(cfg: ModelConfig, targets) -> list[str]:
    """The targets this model has (gpt_neox has no gate)."""
    have = tfm.param_shapes(cfg)["layers"]
    return [t for t in targets if t in have]


def _split(cfg: ModelConfig, name: str):
    """(layers, in shape, out shape, in axes, out axes) of a layer weight."""
    shape, axes = tfm.param_shapes(cfg)["layers"][name]
    k = 1 + IN_AXES[name]
    return shape[0], shape[1:k], shape[k:], axes[1:k], axes[k:]


def init(cfg: ModelConfig, rank: int, targets, key: jax.Array) -> Params:
    """Adapters {"layers": {name + "_a": (L, *in, r), name + "_b": (L, r, *out)}}: A ~ N(0, 1 / in) (the
    fan-in scale of the reference implementation's Kaiming init, up to its constant), B = 0."""
    adapters = {}
    for i, name in enumerate(_targets(cfg, targets)):
        L, in_shape, out_shape, _, _ = _split(cfg, name)
        fan_in = 1
        for d in in_shape:
            fan_in *= d
        a = jax.random.normal(jax.random.fold_in(key, i), (L, *in_shape, rank), jnp.dtype(cfg.param_dtype))
        adapters[name + "_a"] = a / jnp.sqrt(fan_in).astype(a.dtype)
        adapters[name + "_b"] = jnp.zeros((L, rank, *out_shape), jnp.dtype(cfg.param_dtype))
    return {"layers": adapters}


def logical_axes(cfg: ModelConfig, targets) -> Params:
    """The adapters' logical axes: A shares its weight's in axes, B its out axes (so they shard alike)."""
    axes = {}
    for name in _targets(cfg, targets):
        _, _, _, in_axes, out_axes = _split(cfg, name)
        axes[name + "_a"] = ("layers", *in_axes, None)
        axes[name + "_b"] = ("layers", None, *out_axes)
    return {"layers": axes}


def merge(base: Params, adapters: Params, scale: float) -> Params:
    """The base params with W + scale * A @ B for each adapted weight (same dtype as W); the rest shared as is."""
    layers = dict(base["layers"])
    for key, a in adapters["layers"].items():
        if not key.endswith("_a"):
            continue
        name = key[:-2]
        b = adapters["layers"][name + "_b"]
        w = layers[name]
        # (L, *in, r) x (L, r, *out) -> (L, *in, *out), contracting the rank.
        delta = jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((0,), (0,))))
        layers[name] = w + (scale * delta).astype(w.dtype)
    return {**base, "layers": layers}


def scale(p: ml_collections.ConfigDict) -> float:
    """alpha / r of a trained model's section (config.policy or config.critic), the reference implementation's
    scaling."""
    return float(p.lora_alpha) / p.lora_rank
