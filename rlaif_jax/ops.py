"""Masked maths shared by reward shaping (rewards.py) and the estimators and losses (algorithms.py).

A neutral floor under both: neither module's concepts live here, only "a statistic over the valid entries of a
padded array" and "an estimate of KL from sampled log-probs". Shapes: per-token arrays are `(B, R)`, a mask is
1 at valid entries and 0 at padding; padding never reaches a statistic (it is selected away with `where`, so a
NaN or inf there cannot leak in).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean")


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

    Statistics are population (ddof=0) mean/variance over every valid entry of the array.
    """
    mean = masked_mean(x, mask)
    whitened = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


def aggregate(x_br: jax.Array, mask_br: jax.Array, mode: str) -> jax.Array:
    """Masked reduction of a per-token loss to a scalar.

    token_mean: sum_{b,t} m x / sum_{b,t} m            (every valid token in the batch weighs the same)
    seq_mean:   mean_{b: L_b>0} [ sum_t m x / L_b ]     (every sequence weighs the same; L_b = sum_t m_bt)
    """
    if mode == "token_mean":
        return masked_mean(x_br, mask_br)
    if mode == "seq_mean":
        per_seq_b = masked_mean(x_br, mask_br, axis=-1)
        has_tokens_b = (jnp.sum(mask_br, axis=-1) > 0).astype(jnp.float32)
        return masked_mean(per_seq_b, has_tokens_b)
    raise ValueError(f"loss aggregation {mode!r}; choose one of {LOSS_AGGS}")


# ---------------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------------

def kl_estimate(name: str, logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman, 2020).

    k1 = logp - logp_ref                     unbiased, high variance, can be negative
    k2 = 0.5 * (logp - logp_ref)^2           biased, low variance, >= 0
    k3 = (r - 1) - log r,  r = exp(logp_ref - logp)   unbiased, low variance, >= 0
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
