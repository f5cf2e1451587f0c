"""Masked maths shared by reward shaping (rewards.py) and the estimators and losses (algorithms.py).

A neutral floor under both: neither module's concepts live here, only "a statistic over the valid entries of a
padded array" and "an estimate of KL from sampled log-probs". Shapes: per-token arrays are `(B, R)`, a mask is
1 at valid entries and 0 at padding; padding never reaches a statistic (it is selected away with `where`, so a
NaN or inf there cannot leak in).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------

def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask); padding is selected away with `where`, so a NaN/inf there cannot leak in."""
    return jnp.sum(jnp.where(mask > 0, x.astype(jnp.float32), 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1): mean over valid entries (0 when there are none)."""
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over all valid entries: mean((x - mean)^2) with both means masked."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x.astype(jnp.float32) - mean), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over valid entries (+ mean back if not shift_mean); padding comes out 0.

    Statistics are population (ddof=0) mean/variance over every valid entry of the array, eps inside the square
    root: the `masked_whiten` of the PPO reproduction (summarize_from_feedback_details/ppo.py: masked_var(values,
    mask, False), rsqrt(var + 1e-8)) and its unmasked `whiten` (ppo_left_padding.py, torch.var(unbiased=False)).
    """
    mean = masked_mean(x, mask)
    whitened = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


class LossNorm(NamedTuple):
    """The denominators of the loss aggregations, counted once over a whole minibatch (`loss_norm`).

    With gradient accumulation each micro-batch's loss is its partial sum over these whole-minibatch counts, so
    the micro-batch losses (and gradients) add up to the minibatch's, whatever the split.
    """
    tokens: jax.Array     # () float32, valid tokens
    sequences: jax.Array  # () float32, rows with at least one valid token


def loss_norm(mask_br: jax.Array) -> LossNorm:
    """LossNorm of the minibatch whose response mask is `mask_br` (B, R)."""
    length_b = jnp.sum(mask_br.astype(jnp.float32), axis=-1)
    return LossNorm(tokens=jnp.sum(length_b), sequences=jnp.sum((length_b > 0).astype(jnp.float32)))


def aggregate(x_br: jax.Array, mask_br: jax.Array, mode: str, norm: LossNorm | None = None) -> jax.Array:
    """Masked reduction of a per-token loss x_bt to a scalar, as the literature names it (L_b = sum_t m_bt,
    N = sum_b L_b valid tokens, S = sequences with L_b > 0, R = the response budget, x_br.shape[-1]):

    token_mean               sum_{b,t} m x / N               DAPO's token-level loss (Yu et al. 2025); TRL
                                                              GRPOTrainer loss_type="dapo" (trl/trainer/
                                                              grpo_trainer.py, `_compute_loss`: sum /
                                                              num_items_in_batch, the token count of the whole
                                                              accumulated batch)
    seq_mean_token_mean      (1/S) sum_b (sum_t m x) / L_b   GRPO's objective (Shao et al. 2024: 1/G sum_i
                                                              1/|o_i| sum_t); TRL loss_type="grpo"
    seq_mean_token_sum_norm  (1/S) sum_b (sum_t m x) / R     Dr. GRPO (Liu et al. 2025): the per-sequence
                                                              1/L_b replaced by a constant, the generation
                                                              budget; TRL loss_type="dr_grpo" (sum / (B *
                                                              max_completion_length)); verl's mode of this
                                                              name omits the 1/S

    `norm` holds N and S of the whole minibatch when x_br is one micro-batch of it (see LossNorm); None counts
    them on mask_br itself.
    """
    norm = loss_norm(mask_br) if norm is None else norm
    sequences = jnp.maximum(norm.sequences, 1.0)
    if mode == "token_mean":
        return masked_sum(x_br, mask_br) / jnp.maximum(norm.tokens, 1.0)
    if mode == "seq_mean_token_mean":
        return jnp.sum(masked_mean(x_br, mask_br, axis=-1)) / sequences
    if mode == "seq_mean_token_sum_norm":
        return masked_sum(x_br, mask_br) / (sequences * x_br.shape[-1])
    raise ValueError(f"loss aggregation {mode!r}; choose one of {LOSS_AGGS}")


# ---------------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------------

def kl_estimate(name: str, logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman, 2020).

    k1 = logp - logp_ref                     unbiased, high variance, can be negative
    k2 = 0.5 * (logp - logp_ref)^2           biased, low variance, >= 0
    k3 = (r - 1) - log r,  r = exp(logp_ref - logp)   unbiased, low variance, >= 0

    As a loss, differentiated through logp on tokens sampled from pi (the KL loss term), the expected gradients
    are those of other objectives: k1 -> 0, k2 -> grad KL(pi || pi_ref), k3 -> grad KL(pi_ref || pi) (tests/
    test_conformance.py checks these exactly on a small softmax).
    """
    log_ratio = logp.astype(jnp.float32) - logp_ref.astype(jnp.float32)
    if name == "k1":
        return log_ratio
    if name == "k2":
        return 0.5 * jnp.square(log_ratio)
    if name == "k3":
        # expm1 keeps (r - 1) accurate when the policies are close.
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator {name!r}; choose one of {KL_ESTIMATORS}")


def all_kl_estimates(logp: jax.Array, logp_ref: jax.Array) -> dict[str, jax.Array]:
    """{"k1": ..., "k2": ..., "k3": ...}, each shaped like logp (for metrics)."""
    return {name: kl_estimate(name, logp, logp_ref) for name in KL_ESTIMATORS}
