"""A pure-functional decoder-only transformer for the Llama / Mistral / Qwen2 / Qwen3 / Gemma / GPT-NeoX families.

Params are a nested dict of arrays; every function here is pure and jittable with `cfg` static.
Layers are stacked on a leading `layers` axis. `forward` and `forward_shared_prefix` run them with
`lax.scan`, so their compile time does not grow with depth; decoding (`prefill` / `decode`) runs them
unrolled (see `decoding_params`). Each layer's q/k/v and (gated MLPs') gate/up weights are fused into one matmul
each (`fuse_projections`). Shapes use these letters:
  B batch, T new tokens, S key slots (= T without a cache, = cache length with one), D hidden,
  H query heads, K kv heads, G = H // K query heads per kv head, E head dim, F mlp width, V vocab, L layers.

Left padding: `mask_bt` marks real tokens; positions are `cumsum(mask) - 1`, so a row's first real token
has position 0 whatever its padding, and pad keys are masked out of attention.

KV cache: preallocated per-layer buffers, keys (B, K, E, S) and values (B, K, S, E) (the layouts the
attention matmuls read in place, see `attention`), plus the mask of filled slots. `prefill` writes the prompt
at slots [0, P), each `decode` call writes its T tokens at [index, index + T) with dynamic_update_slice on
the loop carry, which XLA performs in place.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from rlaif_jax.models import fused_attention
from rlaif_jax.models.config import ModelConfig
from rlaif_jax.sharding import batch_shards, constrain, constrain_moved

Params = dict[str, Any]


class Output(NamedTuple):
    logits: jax.Array  # (B, T, V) float32; logits at t predict token t + 1
    hidden: jax.Array  # (B, T, D) final hidden state (after the final norm), compute dtype


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L buffers of (B, K, E, S): keys transposed, see `attention`; or one (L, B, K, E, S)
    v: tuple[jax.Array, ...]  # L buffers of (B, K, S, E); or one (L, B, K, S, E)
    key_mask: jax.Array  # (B, S) bool: slot holds a real token
    next_position: jax.Array  # (B,) int32: RoPE position of the row's next token
    index: jax.Array  # () int32: first free slot

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated n times (row b -> rows b * n .. b * n + n - 1): n continuations of one prefix."""
        if n == 1:
            return self
        rep = lambda x: jnp.repeat(x, n, axis=x.ndim - 4 if x.ndim >= 4 else 0)  # noqa: E731  (the batch axis)
        return self.replace(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)), key_mask=rep(self.key_mask),
                            next_position=rep(self.next_position))

    @property
    def stacked(self) -> bool:
        """One (L, B, ...) buffer for keys and one for values rather than one per layer (`init_cache`)."""
        return self.k[0].ndim == 5


# ---------------------------------------------------------------------------------------------- params
def param_shapes(cfg: ModelConfig) -> Params:
    """Shapes of every parameter, paired with logical axis names: {name: (shape, axes)}."""
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    layers = {
        "attn_norm": ((L, D), ("layers", "embed")),
        "q": ((L, D, H, E), ("layers", "embed", "heads", "head_dim")),
        "k": ((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim")),
        "v": ((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim")),
        "o": ((L, H, E, D), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": ((L, D), ("layers", "embed")),
        **({"gate": ((L, D, F), ("layers", "embed", "mlp"))} if cfg.gated_mlp else {}),
        "up": ((L, D, F), ("layers", "embed", "mlp")),
        "down": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.layer_norm:
        layers["attn_norm_bias"] = ((L, D), ("layers", "embed"))
        layers["mlp_norm_bias"] = ((L, D), ("layers", "embed"))
    if cfg.qkv_bias:
        layers["q_bias"] = ((L, H, E), ("layers", "heads", "head_dim"))
        layers["k_bias"] = ((L, K, E), ("layers", "kv_heads", "head_dim"))
        layers["v_bias"] = ((L, K, E), ("layers", "kv_heads", "head_dim"))
    if cfg.o_bias:
        layers["o_bias"] = ((L, D), ("layers", "embed"))
    if cfg.mlp_bias:
        if cfg.gated_mlp:
            layers["gate_bias"] = ((L, F), ("layers", "mlp"))
        layers["up_bias"] = ((L, F), ("layers", "mlp"))
        layers["down_bias"] = ((L, D), ("layers", "embed"))
    if cfg.qk_norm:
        layers["q_norm"] = ((L, E), ("layers", "head_dim"))
        layers["k_norm"] = ((L, E), ("layers", "head_dim"))
    shapes = {"embed": ((V, D), ("vocab", "embed")), "layers": layers, "final_norm": ((D,), ("embed",))}
    if cfg.layer_norm:
        shapes["final_norm_bias"] = ((D,), ("embed",))
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = ((D, V), ("embed", "vocab"))
    return shapes


def _is_shape_entry(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Same structure as the params, each leaf a tuple of logical axis names."""
    return jax.tree.map(lambda e: e[1], param_shapes(cfg), is_leaf=_is_shape_entry)


def abstract_params(cfg: ModelConfig) -> Params:
    """jax.ShapeDtypeStruct for every parameter (no memory allocated)."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda e: jax.ShapeDtypeStruct(e[0], dtype), param_shapes(cfg), is_leaf=_is_shape_entry)


def _init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    dtype = jnp.dtype(cfg.param_dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape_entry)
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, (shape, _)), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        if "bias" in name:  # before "norm": LayerNorm biases start at zero too
            leaves.append(jnp.zeros(shape, dtype))
        elif "norm" in name:
            # Gemma stores norm weights as offsets from 1.
            leaves.append(jnp.zeros(shape, dtype) if cfg.norm_plus_one else jnp.ones(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def init_params(cfg: ModelConfig, key: jax.Array, mesh: jax.sharding.Mesh | None = None) -> Params:
    """Random params (normal(0.02) matrices, unit norms, zero biases).

    With a mesh, the init is jitted with out_shardings so every array is created already sharded,
    never whole on one device.
    """
    if mesh is None:
        return jax.jit(_init_params, static_argnums=0)(cfg, key)
    from rlaif_jax.sharding import tree_shardings
    shardings = tree_shardings(mesh, param_logical_axes(cfg), abstract_params(cfg))
    return jax.jit(_init_params, static_argnums=0, out_shardings=shardings)(cfg, key)


# ---------------------------------------------------------------------------------------------- value head
def init_value_head(cfg: ModelConfig, key: jax.Array) -> Params:
    """A linear map from the final hidden state to one scalar per token: {kernel (D,), bias ()}."""
    kernel = jax.random.normal(key, (cfg.hidden_size,), jnp.float32) / math.sqrt(cfg.hidden_size)
    return {"kernel": kernel.astype(cfg.param_dtype), "bias": jnp.zeros((), cfg.param_dtype)}


def value_head_logical_axes() -> Params:
    return {"kernel": ("embed",), "bias": ()}


def apply_value_head(head: Params, hidden_btd: jax.Array) -> jax.Array:
    """values_bt = hidden_btd . kernel + bias, in float32."""
    return jnp.einsum("btd,d->bt", hidden_btd.astype(jnp.float32), head["kernel"].astype(jnp.float32)) + head[
        "bias"
    ].astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- pieces
# The checkpoint name of every weight matmul's output (`dense`): the remat policies that keep matmul outputs
# ("dots", "minimal") keep these by name, since a custom_vjp hides its dot_general from dots_saveable.
DENSE_OUTPUT = "dense_output"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense(spec: str, out_dtype, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def _dense_fwd(spec, out_dtype, x, w):
    return _dense(spec, out_dtype, x, w), (x, w)


def _dense_bwd(spec, out_dtype, residuals, g):
    x, w = residuals
    (x_axes, w_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", g, w).astype(x.dtype)
    dw = jnp.einsum(f"{x_axes},{out_axes}->{w_axes}", x, g).astype(w.dtype)
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def weight_matmul(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """einsum(spec, x, w, preferred_element_type=out_dtype) of activations x and a weight w (every axis of w named
    in x or in the output), with the cheaper of two ways to write its weight gradient.

    The weight gradient contracts the token axes of x and of the output's gradient g. JAX's transpose rule writes
    it as dot(g, x), which XLA:CPU runs by first copying g transposed: when g is the wider of the two (q/k/v and
    gate/up: (tokens, 2F) against (tokens, D)) that copy is the largest array of the layer's backward, so there
    the gradient is written as dot(x, g) (`_dense_bwd`), which copies x instead. Where x is as wide or wider
    (o, down) JAX's own rule is the cheaper one and is kept (measured on the benchmark's update; README). The LM
    head ((tokens, D) -> (tokens, V) logits, `unembed`) is the widest case of all."""
    x_axes, w_axes = spec.split("->")[0].split(",")
    x_width = math.prod(n for a, n in zip(w_axes, w.shape) if a in x_axes)
    if x_width < w.size // x_width:
        return _dense(spec, out_dtype, x, w)
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """A layer's weight matmul (`weight_matmul`), its output named DENSE_OUTPUT for the remat policies."""
    return checkpoint_name(weight_matmul(spec, x, w), DENSE_OUTPUT)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """x / rms(x) * w  (Gemma: * (1 + w)), normalised in float32 as HF does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * y.astype(x.dtype)


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """(x - mean(x)) / sqrt(var(x) + eps) * w + b (torch.nn.LayerNorm), normalised in float32."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def block_norm(x: jax.Array, params: Params, name: str, cfg: ModelConfig) -> jax.Array:
    """The norm `name` (attn_norm, mlp_norm, final_norm) of `params`: RMSNorm, or LayerNorm with its bias
    `name + "_bias"` (gpt_neox)."""
    if cfg.layer_norm:
        return layer_norm(x, params[name], params[name + "_bias"], cfg.norm_eps)
    return rms_norm(x, params[name], cfg.norm_eps, cfg.norm_plus_one)


def activation(x: jax.Array, name: str) -> jax.Array:
    """The MLP's nonlinearity by ModelConfig.activation name (gelu: exact erf; gelu_tanh: the tanh approximation)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_tanh")


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies 1 / theta^(2i/E), with Llama-3 or linear scaling when the config asks; E is the
    rotated part of a head (`cfg.rotary_dim`: all of it but in gpt_neox)."""
    E = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv.astype(np.float32)
    if scaling["rope_type"] == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_bthe: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """HF's rotate-half RoPE: x * cos + rotate_half(x) * sin, angles = position * inv_freq. With fewer frequencies
    than E / 2 (partial rotary, gpt_neox) only the first 2 * len(inv_freq) dims rotate (as a head of their own:
    rotate_half pairs dim i with i + len(inv_freq)); the rest pass through."""
    rotated_dims = 2 * inv_freq.shape[-1]
    if rotated_dims < x_bthe.shape[-1]:
        rotated_part = apply_rope(x_bthe[..., :rotated_dims], positions_bt, inv_freq)
        return jnp.concatenate([rotated_part, x_bthe[..., rotated_dims:]], axis=-1)
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # (B, T, E/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x_bthe.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_bthe.dtype)


class AttentionMask(NamedTuple):
    """Which key slots each query may see, in the two forms the attention implementations read.

    `allowed` (B, T, S) bool is the exact mask (causal, sliding window, real keys, same packed sequence): the
    "xla" and "chunked" paths and decoding read it. The fused kernels (models/fused_attention.py) read the
    structured form instead: query t sits at key slot `query_offset` + t (a static int), causal and window come
    from the shapes, and a query sees keys of its own segment, `q_segment` (B, T) / `kv_segment` (B, S) int32:
    a sequence's id (>= 1) at real tokens, 0 at padding. None where no kernel can run (decoding)."""
    allowed: jax.Array
    q_segment: jax.Array | None = None
    kv_segment: jax.Array | None = None
    query_offset: int = 0


def attention(q_bthe, k_bkes, v_bkse, mask: AttentionMask, cfg: ModelConfig, no_cache: bool = False):
    """Grouped-query softmax attention -> (B, K, G, T, E); `mask` says which key slot each query may see.

    Keys are (B, K, E, S) and values (B, K, S, E), the cache's layouts: both einsums are then batched
    (G*T, E) x (E, S) and (G*T, S) x (S, E) matmuls over (B, K) with each right operand in the [contract, out]
    layout that XLA:CPU's matmul reads fastest and in place (keys stored as (B, K, S, E) make the scores
    slower per decode step; README, "Performance"), with no per-step transpose of the cache.

    The forwards without a cache (`no_cache`) compute it as cfg.attention says (config.compute.attention):
    "xla" the (B, H, T, S) scores at once, as below; "chunked" blocks of cfg.attention_chunk keys with a running
    max and sum (`chunked_attention`), memory linear in S; "cudnn" / "splash" / "fused" a fused kernel
    (models/fused_attention.py). Decoding (a few queries over the cache) uses the plain path."""
    B, T, H, E = q_bthe.shape
    K = k_bkes.shape[1]
    q = q_bthe.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4).reshape(B, K, (H // K) * T, E)
    implementation = fused_attention.resolve(cfg.attention, jax.default_backend(), cfg.dtype) if no_cache else "xla"
    if implementation == "chunked":
        out = chunked_attention(q, k_bkes, v_bkse, mask.allowed, cfg.attention_chunk)
        return out.reshape(B, K, H // K, T, E)
    if implementation in fused_attention.KERNELS:
        q_bkgte, k_bkse = q.reshape(B, K, H // K, T, E), k_bkes.transpose(0, 1, 3, 2)
        structure = (mask.q_segment, mask.kv_segment, mask.query_offset, cfg.sliding_window)
        if implementation == "splash":
            return fused_attention.splash_attention(q_bkgte, k_bkse, v_bkse, *structure, cfg.attention_chunk)
        return fused_attention.dot_product_attention(q_bkgte, k_bkse, v_bkse, *structure, implementation)
    probs = jax.nn.softmax(_masked_scores(q, k_bkes, mask.allowed), axis=-1).astype(v_bkse.dtype)
    out = jnp.einsum("bkqs,bkse->bkqe", probs, v_bkse)
    return out.reshape(B, K, H // K, T, E)


def _query_mask(allowed_bts, queries: int):
    """`allowed_bts` for queries grouped G*T per kv head (query g * T + t is token t of head g): (B, 1, G*T, S)."""
    B, T, S = allowed_bts.shape
    return jnp.broadcast_to(allowed_bts[:, None, None], (B, 1, queries // T, T, S)).reshape(B, 1, queries, S)


def _masked_scores(q_bkqe, k_bkes, allowed_bts):
    """Scaled scores (B, K, G*T, S) in float32 of queries grouped (B, K, G*T, E) against keys (B, K, E, S), with
    disallowed slots at the float32 minimum (so a row with no allowed key averages all S slots, as HF's does)."""
    scores = jnp.einsum("bkqe,bkes->bkqs", q_bkqe, k_bkes, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q_bkqe.shape[-1])
    return jnp.where(_query_mask(allowed_bts, q_bkqe.shape[2]), scores, jnp.finfo(jnp.float32).min)


def _key_blocks(k_bkes, v_bkse, allowed_bts, chunk: int):
    """Keys, values and mask split into blocks of `chunk` slots along S, block axis first (the scan's xs), S padded
    to a whole number of blocks. Padding slots get a score of -inf (`_block_scores`): unlike a disallowed slot they
    weigh nothing even in a row with no allowed key, so the result is the unpadded attention's."""
    B, K, E, S = k_bkes.shape
    n = -(-S // chunk)
    pad = n * chunk - S
    k = jnp.pad(k_bkes, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(B, K, E, n, chunk).transpose(3, 0, 1, 2, 4)
    v = jnp.pad(v_bkse, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, K, n, chunk, E).transpose(2, 0, 1, 3, 4)
    allowed = jnp.pad(allowed_bts, ((0, 0), (0, 0), (0, pad))).reshape(B, -1, n, chunk).transpose(2, 0, 1, 3)
    real = (jnp.arange(n * chunk) < S).reshape(n, chunk)
    return k, v, allowed, real


def _block_scores(q_bkqe, k_bkec, allowed_btc, real_c):
    """One key block's scores (B, K, G*T, C): `_masked_scores`, and -inf at the padding slots."""
    return jnp.where(real_c, _masked_scores(q_bkqe, k_bkec, allowed_btc), -jnp.inf)


def _chunked_attention_fwd(q_bkqe, k_bkes, v_bkse, allowed_bts, chunk):
    """Online softmax over key blocks (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022): per query a
    running max m, sum l of exp(s - m) and output acc, rescaled by exp(m_old - m_new) as each block arrives.
    Returns the output (B, K, G*T, E) in v's dtype and each row's max m and sum l (B, K, G*T): kept apart, not as
    the log-sum-exp m + log l, which rounds to m in a row with no allowed key (m = the float32 minimum)."""
    B, K, Q, E = q_bkqe.shape
    k_blocks, v_blocks, allowed_blocks, real = _key_blocks(k_bkes, v_bkse, allowed_bts, chunk)

    def block(carry, xs):
        m, l, acc = carry
        k, v, allowed, real_c = xs
        s = _block_scores(q_bkqe, k, allowed, real_c)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum("bkqc,bkce->bkqe", p.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)
        return (m_new, l * rescale + p.sum(axis=-1), acc), None

    init = (jnp.full((B, K, Q), -jnp.inf, jnp.float32), jnp.zeros((B, K, Q), jnp.float32),
            jnp.zeros((B, K, Q, E), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(block, init, (k_blocks, v_blocks, allowed_blocks, real))
    return (acc / l[..., None]).astype(v_bkse.dtype), (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_attention(q_bkqe, k_bkes, v_bkse, allowed_bts, chunk: int):
    """`attention`'s softmax(q k^T / sqrt(E)) v with queries grouped (B, K, G*T, E), computed over key blocks of
    `chunk` slots: memory linear in S, forward and backward. The backward (a custom VJP, as FlashAttention's)
    keeps only the output and each row's softmax max and sum and recomputes every block's probabilities from them, where
    autodiff of the forward's scan would store every block's (B, K, G*T, chunk) probabilities."""
    return _chunked_attention_fwd(q_bkqe, k_bkes, v_bkse, allowed_bts, chunk)[0]


def _chunked_attention_vjp_fwd(q_bkqe, k_bkes, v_bkse, allowed_bts, chunk):
    out, (m, l) = _chunked_attention_fwd(q_bkqe, k_bkes, v_bkse, allowed_bts, chunk)
    return out, (q_bkqe, k_bkes, v_bkse, allowed_bts, out, m, l)


def _chunked_attention_vjp_bwd(chunk, residuals, dout_bkqe):
    """With P = exp(S - m) / l per block: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), masked as the
    forward's `where` masks it, dQ = sum over blocks of dS K / sqrt(E), dK = dS^T Q / sqrt(E)."""
    q, k_bkes, v_bkse, allowed_bts, out, m, l = residuals
    B, K, E, S = k_bkes.shape
    scale = 1.0 / math.sqrt(E)
    dout = dout_bkqe.astype(jnp.float32)
    delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)  # rowsum(dO * O) = rowsum(P * dP)
    k_blocks, v_blocks, allowed_blocks, real = _key_blocks(k_bkes, v_bkse, allowed_bts, chunk)
    Q = q.shape[2]

    def block(dq, xs):
        k, v, allowed, real_c = xs
        s = _block_scores(q, k, allowed, real_c)
        p = jnp.exp(s - m[..., None]) / l[..., None]  # (B, K, Q, C)
        dv = jnp.einsum("bkqc,bkqe->bkce", p, dout)
        dp = jnp.einsum("bkqe,bkce->bkqc", dout, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None])
        ds = jnp.where(_query_mask(allowed, Q), ds, 0.0) * scale
        dq = dq + jnp.einsum("bkqc,bkec->bkqe", ds, k.astype(jnp.float32))
        dk = jnp.einsum("bkqc,bkqe->bkec", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk_blocks, dv_blocks) = jax.lax.scan(block, jnp.zeros(q.shape, jnp.float32),
                                              (k_blocks, v_blocks, allowed_blocks, real))
    n = dk_blocks.shape[0]
    dk = dk_blocks.transpose(1, 2, 3, 0, 4).reshape(B, K, E, n * chunk)[..., :S]
    dv = dv_blocks.transpose(1, 2, 0, 3, 4).reshape(B, K, n * chunk, E)[:, :, :S]
    return dq.astype(q.dtype), dk.astype(k_bkes.dtype), dv.astype(v_bkse.dtype), None


chunked_attention.defvjp(_chunked_attention_vjp_fwd, _chunked_attention_vjp_bwd)


def _take_positions(x, read_br):
    """x (B, T, ...) at positions `read_br` (B, R) of each row -> (B, R, ...)."""
    return jnp.take_along_axis(x, read_br.reshape(read_br.shape + (1,) * (x.ndim - 2)), axis=1)


def _layer(cfg: ModelConfig, inv_freq, x_btd, lp, positions_bt, mask: AttentionMask, cache_kv=None, index=None,
           context_kv=None, read_br=None):
    """One pre-norm block -> (x_btd, kv): x + attn(norm(x)), then + mlp(norm(that)); or, with a parallel residual
    (gpt_neox), x + attn(norm1(x)) + mlp(norm2(x)). Keys are laid out (B, K, E, S), values (B, K, S, E) (see
    `attention`).

    With `cache_kv`, this layer's cache buffers: the T new keys and values are written at slot `index`, the
    queries attend over the whole buffers, and kv is the updated buffers (decoding). Otherwise the queries attend
    over `context_kv` (if given: keys and values of earlier tokens, e.g. a shared prompt's) followed by the
    T tokens themselves, and kv is the T tokens' own keys and values.

    `read_br` (B, R) positions, for a last layer of which only those positions are read (a judge's answer, a
    prompt's last token): keys and values are computed at every position, as the read queries attend over them,
    but the queries, attention, o projection and MLP only at the R read positions, and x is (B, R, D)."""
    dt = jnp.dtype(cfg.dtype)
    B, T = x_btd.shape[:2]
    G = cfg.num_heads // cfg.num_kv_heads
    h = block_norm(x_btd, lp, "attn_norm", cfg)

    def project(h_btd, heads: slice):  # (B, T, K, c, E): the fused projection's columns `heads` (fuse_projections)
        out = dense("btd,dkce->btkce", h_btd, lp["qkv"][:, :, heads].astype(dt))
        return out + lp["qkv_bias"][:, heads].astype(dt) if cfg.qkv_bias else out

    q_positions_bt = positions_bt
    if read_br is None:
        # One matmul, one split (not three slices): its gradient is one concatenate, where slices' would be pads
        # and adds.
        q, k, v = jnp.split(project(h, slice(None)), [G, G + 1], axis=3)
    else:
        x_btd, q_positions_bt = _take_positions(x_btd, read_br), _take_positions(positions_bt, read_br)
        q = project(_take_positions(h, read_br), slice(None, G))
        k, v = jnp.split(project(h, slice(G, None)), [1], axis=3)
        # A few queries per row: the plain attention, as in decoding (the fused kernels take contiguous queries).
        mask = AttentionMask(_take_positions(mask.allowed, read_br))
    Tq = q.shape[1]  # T, or R
    q, k, v = q.reshape(B, Tq, cfg.num_heads, cfg.head_dim), k[:, :, :, 0], v[:, :, :, 0]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.norm_eps, False)
        k = rms_norm(k, lp["k_norm"], cfg.norm_eps, False)
    q = constrain(apply_rope(q, q_positions_bt, inv_freq), ("batch", "length", "heads", "head_dim"))
    k = constrain(apply_rope(k, positions_bt, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # (B, K, E, T), (B, K, T, E)
    if cache_kv is not None:
        # This layer's own buffers: the T new slots are written in place and the attention dots read the
        # buffers directly (no per-step slice or transpose of the cache).
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, index))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0))
        keys, values, new_kv = ck, cv, (ck, cv)
    elif context_kv is not None:
        keys = jnp.concatenate([context_kv[0].astype(dt), k], axis=3)
        values = jnp.concatenate([context_kv[1].astype(dt), v], axis=2)
        new_kv = (k, v)
    else:
        keys, values, new_kv = k, v, (k, v)
    attn = attention(q, keys.astype(dt), values.astype(dt), mask, cfg, no_cache=cache_kv is None and read_br is None)
    # The output projection as one 2-D matmul on (B*T, H*E) rows: given the head axes as separate dims XLA:CPU
    # picks a layout that transposes the o weight on every decode step.
    attn = attn.transpose(0, 3, 1, 2, 4).reshape(B * Tq, cfg.num_heads * cfg.head_dim)
    out = dense("nk,kd->nd", attn, lp["o"].astype(dt).reshape(cfg.num_heads * cfg.head_dim, -1)).reshape(B, Tq, -1)
    if cfg.o_bias:
        out = out + lp["o_bias"].astype(dt)
    if cfg.parallel_residual:
        x_btd = x_btd + out + _mlp(cfg, lp, block_norm(x_btd, lp, "mlp_norm", cfg))
        return constrain(x_btd, ("batch", "length", "embed")), new_kv
    x_btd = constrain(x_btd + out, ("batch", "length", "embed"))
    out = _mlp(cfg, lp, block_norm(x_btd, lp, "mlp_norm", cfg))
    return constrain(x_btd + out, ("batch", "length", "embed")), new_kv


def _mlp(cfg: ModelConfig, lp, h_btd):
    """down(act(gate(h)) * up(h)), or down(act(up(h))) without a gate (gpt_neox); biases where the config has them."""
    dt = jnp.dtype(cfg.dtype)
    if cfg.gated_mlp:
        gate_up = dense("btd,dcf->btcf", h_btd, lp["gate_up"].astype(dt))  # (B, T, 2, F)
        if cfg.mlp_bias:
            gate_up = gate_up + lp["gate_up_bias"].astype(dt)
        gate, up = (x[:, :, 0] for x in jnp.split(gate_up, 2, axis=2))
        hidden = activation(gate, cfg.activation) * up
    else:
        up = dense("btd,df->btf", h_btd, lp["up"].astype(dt))
        if cfg.mlp_bias:
            up = up + lp["up_bias"].astype(dt)
        hidden = activation(up, cfg.activation)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    out = dense("btf,fd->btd", hidden, lp["down"].astype(dt))
    if cfg.mlp_bias:
        out = out + lp["down_bias"].astype(dt)
    return out


# What the backward pass keeps of each layer's forward under ModelConfig.remat (names as MaxText's remat_policy);
# the rest it recomputes from the layer's input, which the scan keeps anyway.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # nothing: least memory, one more forward per backward
    # every matmul's output, attention's (B, H, T, S) scores too
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)),
    # the weight matmuls', not attention's
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)),
    "everything": jax.checkpoint_policies.everything_saveable,  # all of it (no memory saved; a reference point)
}


def remat_layer(body, cfg: ModelConfig):
    """The scan body of the layer stack under cfg.remat's `jax.checkpoint` policy ("none": unchanged).
    prevent_cse=False: inside a scan the recomputation cannot be merged with the forward, which is what
    prevent_cse guards against (jax.checkpoint's docs)."""
    if cfg.remat == "none":
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)


def _scan_layers(cfg: ModelConfig, params: Params, layer: Callable, carry, last_layer: Callable | None = None):
    """`carry = layer(carry, lp)` for each layer's params under `lax.scan` (remat as cfg.remat says).

    With `last_layer`, the final layer runs `last_layer(carry, lp)` instead and its result is returned: a last
    layer that computes only the positions that are read (`_layer`'s read_br). The scan's body then picks its
    branch with `lax.cond` on the layer index: slicing the stacked weights into the first L - 1 and the last
    would copy (L - 1) / L of them (checked: XLA does not alias a slice)."""
    layers = fuse_projections(params["layers"], cfg)
    if last_layer is None:
        body = lambda carry, lp: (layer(carry, lp), None)  # noqa: E731
        return jax.lax.scan(remat_layer(body, cfg), carry, layers, unroll=cfg.scan_unroll)[0]
    one_layer = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape[1:], w.dtype), layers)
    read_shapes = jax.eval_shape(last_layer, carry, one_layer)

    def body(carry_read, lp_index):
        (carry, read), (lp, index) = carry_read, lp_index
        return jax.lax.cond(index == cfg.num_layers - 1, lambda: (carry, last_layer(carry, lp)),
                            lambda: (layer(carry, lp), read)), None

    read = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), read_shapes)
    return jax.lax.scan(remat_layer(body, cfg), (carry, read), (layers, jnp.arange(cfg.num_layers)),
                        unroll=cfg.scan_unroll)[0][1]


def _allowed(cfg: ModelConfig, query_slot_bt, key_slot_s, key_mask_bs):
    """Causal (key slot <= query slot), real keys only, and within the sliding window if any."""
    allowed = (key_slot_s[None, None, :] <= query_slot_bt[:, :, None]) & key_mask_bs[:, None, :]
    if cfg.sliding_window is not None:
        allowed &= query_slot_bt[:, :, None] - key_slot_s[None, None, :] < cfg.sliding_window
    return allowed


def _embed(params: Params, cfg: ModelConfig, tokens_bt) -> jax.Array:
    dt = jnp.dtype(cfg.dtype)
    x = params["embed"].astype(dt)[tokens_bt]
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
    return constrain(x, ("batch", "length", "embed"))


def _output(params: Params, cfg: ModelConfig, x_btd) -> Output:
    hidden = block_norm(x_btd, params, "final_norm", cfg)
    return Output(constrain(unembed(params, cfg, hidden), ("batch", "length", "vocab")), hidden)


def _stack(params: Params, cfg: ModelConfig, tokens_bt, positions_bt, mask: AttentionMask, cache: KVCache | None,
           attend_to_cache: bool = True, read_br=None):
    """Embed, layers, final norm and head. Without a cache the layers run under `lax.scan`, and with `read_br`
    (B, R) positions the last layer computes only those (`_layer`), so the Output is (B, R). With one they run
    unrolled over per-layer params and buffers (see `decoding_params`): the tokens' keys and values are written
    at `cache.index`, and attend over the whole buffers if `attend_to_cache`, else only over themselves (a
    prefill into an empty cache). A stacked cache (`KVCache.stacked`) runs them under `lax.scan` instead, over
    stacked params. Returns (Output, (k buffers, v buffers) or None)."""
    x = _embed(params, cfg, tokens_bt)
    inv_freq = rope_inv_freq(cfg)

    if cache is None:
        def layer(x, lp, read_br=None):
            return _layer(cfg, inv_freq, x, lp, positions_bt, mask, read_br=read_br)[0]

        last_layer = None if read_br is None else functools.partial(layer, read_br=read_br)
        return _output(params, cfg, _scan_layers(cfg, params, layer, x, last_layer)), None

    def layer(x, lp, ck, cv):
        if attend_to_cache:
            return _layer(cfg, inv_freq, x, lp, positions_bt, mask, (ck, cv), cache.index)
        x, (k, v) = _layer(cfg, inv_freq, x, lp, positions_bt, mask)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, cache.index))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, cache.index, 0))
        return x, (ck, cv)

    if cache.stacked:
        # rollout.decode_weights="sharded": one lax.scan over stacked, still sharded weights and the stacked cache,
        # so each layer's weights are gathered inside the scan's body, one layer at a time. Unrolled layers would
        # let XLA gather every layer's weights at once (or hoist the gathers out of the decode loop); an
        # optimisation barrier cannot prevent it on CPU, where barriers are expanded before scheduling.
        def body(x, xs):
            x, kv = layer(x, *xs)
            return x, kv

        x, (k, v) = jax.lax.scan(body, x, (fuse_projections(params["layers"], cfg), cache.k[0], cache.v[0]))
        hidden = block_norm(x, params, "final_norm", cfg)
        return Output(unembed_vocab_sharded(params, cfg, hidden), hidden), ((k,), (v,))
    ks, vs = [], []
    for lp, ck, cv in zip(decoding_params(params, cfg)["layers"], cache.k, cache.v):
        x, (ck, cv) = layer(x, lp, ck, cv)
        ks.append(ck)
        vs.append(cv)
    return _output(params, cfg, x), (tuple(ks), tuple(vs))


def fuse_projections(layer_params: Params, cfg: ModelConfig) -> Params:
    """Layer params (stacked or one layer's) with q, k, v fused into `qkv` (..., D, K, G + 2, E) and, in a gated
    MLP, gate, up into `gate_up` (..., D, 2, F); biases alike. Unchanged if already fused.

    One matmul instead of three (two) per layer: at decode's few rows per step XLA:CPU's matmuls are bound by
    per-call overhead, not FLOPs. The q heads are grouped under their kv head (query head h = k * G + g reads
    kv head k), so sharding the kv-head axis keeps each device's q, k and v heads together.
    """
    if "qkv" in layer_params:
        return layer_params
    K, G = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    lp = dict(layer_params)
    q, k, v = lp.pop("q"), lp.pop("k"), lp.pop("v")
    q = q.reshape(*q.shape[:-2], K, G, q.shape[-1])
    lp["qkv"] = jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)
    if cfg.qkv_bias:
        qb, kb, vb = lp.pop("q_bias"), lp.pop("k_bias"), lp.pop("v_bias")
        qb = qb.reshape(*qb.shape[:-2], K, G, qb.shape[-1])
        lp["qkv_bias"] = jnp.concatenate([qb, kb[..., None, :], vb[..., None, :]], axis=-2)
    if cfg.gated_mlp:
        lp["gate_up"] = jnp.stack([lp.pop("gate"), lp.pop("up")], axis=-2)
        if cfg.mlp_bias:
            lp["gate_up_bias"] = jnp.stack([lp.pop("gate_bias"), lp.pop("up_bias")], axis=-2)
    return lp


# The weights each use casts to the compute dtype (`.astype(dt)` in _layer, _mlp, _embed, unembed): decoding casts
# them once, before its loop. Norm weights are left alone (rms_norm with plus_one and layer_norm read them in f32).
_MATMUL_WEIGHTS = ("qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias", "up", "up_bias", "down", "down_bias")
# Logical axes of the fused per-layer weights (fuse_projections; the others keep param_shapes' axes).
_FUSED_AXES = {"qkv": ("embed", "kv_heads", None, "head_dim"), "qkv_bias": ("kv_heads", None, "head_dim"),
               "gate_up": ("embed", None, "mlp"), "gate_up_bias": (None, "mlp")}
DECODE_WEIGHTS = ("gathered", "sharded")


def decoding_layer_axes(cfg: ModelConfig) -> dict[str, tuple]:
    """Logical axes of one layer's decoding params (fused as `fuse_projections` fuses them)."""
    return {**{name: a[1:] for name, a in param_logical_axes(cfg)["layers"].items()}, **_FUSED_AXES}


def decoding_params(params: Params, cfg: ModelConfig, weights: str = "") -> Params:
    """The params with their layers fused (`fuse_projections`) and split into a list of per-layer dicts;
    unchanged if already converted.

    Decoding runs the layers unrolled: each reads its own weights and KV buffers in place. Under a scan the
    layer's slice of the stacked weights and of a stacked cache would be copied out on every decode step.
    The rollout converts once, before its loop.

    `weights` (rollout.decode_weights; "" = leave the layout to XLA): the matmul weights are also cast to the
    compute dtype here, once, and laid out for the loop: "gathered" all-gathers their fsdp-sharded `embed` axis,
    so each device holds one whole compute-dtype copy (tensor shards aside) and decode steps move no weights;
    "sharded" keeps the params' own sharding (1 / fsdp of the copy per device) and the layers stacked: with a
    stacked cache (`init_cache(..., stacked=True)`) decoding runs them under `lax.scan`, which gathers one layer's
    weights at a time."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)) or "qkv" in layers:
        return params  # already converted
    dt = jnp.dtype(cfg.dtype)
    axes, layer_axes = param_logical_axes(cfg), decoding_layer_axes(cfg)

    def lay_out(w, logical):
        logical = tuple(None if a == "embed" and weights == "gathered" else a for a in logical)
        return constrain(w.astype(dt), logical)

    if weights == "sharded":
        fused = fuse_projections(layers, cfg)
        out = {**params, "layers": {name: lay_out(w, ("layers",) + layer_axes[name]) if name in _MATMUL_WEIGHTS
                                    else w for name, w in fused.items()}}
    else:
        # Split, then fuse each layer: XLA then writes each fused weight in one pass over the stacked ones.
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        out = {**params, "layers": [fuse_projections(jax.tree.map(lambda w: w[i], layers), cfg)
                                    for i in range(num_layers)]}
        if not weights:
            return out
        out["layers"] = [{name: lay_out(w, layer_axes[name]) if name in _MATMUL_WEIGHTS else w
                          for name, w in lp.items()} for lp in out["layers"]]
    for name in ("embed", "lm_head"):
        if name in out:
            out[name] = lay_out(out[name], axes[name])
    if weights == "sharded" and "lm_head" in out:
        # The head's embed axis sharded, its logits would need the whole head gathered (once per decode loop,
        # hoisted): shard it over the vocabulary instead, so each device projects onto its slice of the
        # vocabulary and only the (rows, V) logits move.
        out["lm_head"] = constrain_moved(out["lm_head"], ("embed", "vocab"), from_dim=0, to_dim=1)
    return out


def unembed(params: Params, cfg: ModelConfig, hidden_xd: jax.Array) -> jax.Array:
    """Final hidden states (..., D) -> vocabulary logits (..., V) in float32, through the LM head or, when
    the embeddings are tied, the transposed embedding table."""
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    tokens = "abcefg"[:hidden_xd.ndim - 1]  # the leading axes by name (the weight gradient's spec sums over them)
    return weight_matmul(f"{tokens}d,dv->{tokens}v", hidden_xd, head.astype(hidden_xd.dtype), jnp.float32)


def unembed_vocab_sharded(params: Params, cfg: ModelConfig, hidden_xd: jax.Array) -> jax.Array:
    """`unembed` with the logits cut along the vocabulary by the mesh axes that shard the rows (decoding with
    "sharded" weights, whose head is cut that way, see `decoding_params`): each device projects onto its slice
    of the vocabulary, and only the logits are exchanged when rows are needed whole."""
    logits = unembed(params, cfg, hidden_xd)
    axes = ("batch",) + ("length",) * (logits.ndim - 2) + ("vocab",)
    return constrain_moved(logits, axes, from_dim=0, to_dim=logits.ndim - 1)


def map_microbatches(fn: Callable, microbatches: int, *rows: jax.Array, group: int = 1) -> Any:
    """fn(*rows) computed `microbatches` micro-batches at a time under `lax.map`, the results reassembled in row
    order: what a forward holds at once (activations, attention scores, MLP intermediates) shrinks by that factor,
    for one loop over the chunks. fn must treat rows independently (a frozen forward does) and return arrays
    whose leading axis is the rows.

    Micro-batch k holds the groups of `group` consecutive rows (the n samples of a prompt, kept together for the
    shared-prompt forward) numbered k, k + m, k + 2m, ...: a strided split, so that a batch sharded over devices
    in contiguous blocks splits into micro-batches that each keep that layout, with no data movement, when the
    rows per device are a multiple of m * group. Where the groups do not divide into `microbatches`, the largest
    number below it that divides them is used (same results; config.validate checks the training batch)."""
    N = rows[0].shape[0]
    if N % group:
        raise ValueError(f"{N} rows are not whole groups of {group} rows")
    m = max(d for d in range(1, microbatches + 1) if (N // group) % d == 0)
    if m == 1:
        return fn(*rows)

    def split(x):  # (N, ...) -> (m, N / m, ...)
        x = x.reshape(N // (m * group), m, group, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(m, N // m, *x.shape[3:])

    def merge(y):  # (m, N / m, ...) -> (N, ...)
        y = y.reshape(m, N // (m * group), group, *y.shape[2:])
        return jnp.swapaxes(y, 0, 1).reshape(N, *y.shape[3:])

    return jax.tree.map(merge, jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in rows)))


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """RoPE positions for a left-padded batch: the first real token of each row is position 0."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1, 0)


# ---------------------------------------------------------------------------------------------- entry points
def packed_positions(segment_ids_bt: jax.Array) -> jax.Array:
    """RoPE positions of packed rows: each sequence (a run of equal segment ids) starts at position 0."""
    T = segment_ids_bt.shape[1]
    slots = jnp.broadcast_to(jnp.arange(T), segment_ids_bt.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], bool),
                              segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)


def forward(params: Params, cfg: ModelConfig, tokens_bt: jax.Array, mask_bt: jax.Array,
            segment_ids_bt: jax.Array | None = None, read_br: jax.Array | None = None) -> Output:
    """Full-sequence forward of a left-padded batch (no cache).

    `read_br` (B, R) int: only these positions of each row are read, and the Output holds only them (B, R); the
    last layer then runs its queries, attention, o projection and MLP at them alone (`_layer`).

    `segment_ids_bt`: packed rows instead (SFT's `train.packing`): several sequences side by side in a row, each a
    run of one id > 0 (0 = padding, and `mask_bt` = ids > 0). A token attends only to earlier tokens of its own
    sequence and its position counts from that sequence's start, so each sequence is computed as if alone."""
    mask = mask_bt.astype(bool)
    T = tokens_bt.shape[1]
    slots = jnp.arange(T)
    allowed = _allowed(cfg, jnp.broadcast_to(slots, tokens_bt.shape), slots, mask)
    if segment_ids_bt is None:
        positions, segments = positions_from_mask(mask_bt), mask.astype(jnp.int32)
    else:
        allowed &= segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        positions, segments = packed_positions(segment_ids_bt), segment_ids_bt.astype(jnp.int32)
    out, _ = _stack(params, cfg, tokens_bt, positions, AttentionMask(allowed, segments, segments), None,
                    read_br=read_br)
    return out


def last_hidden(params: Params, cfg: ModelConfig, tokens_bt: jax.Array, mask_bt: jax.Array,
                differentiable: bool = False) -> jax.Array:
    """The final hidden state (B, D) at the last position of left-padded rows (where a judge reads its answer
    and a reward model its value).

    Only this position is used: the (B, T, V) logits `forward` also computes are dead code that XLA removes
    (checked: ~25x fewer flops at V = 32k), so the vocabulary projection happens once per row; and the last
    layer computes its queries, o projection and MLP at this position alone (`forward`'s read_br; a judge of the
    benchmark's 4 layers runs 1.19x faster, measured in README, "Performance").

    `differentiable`: a gradient will be taken through it (reward-model training). The last layer then runs in
    full: under a gradient, the `lax.cond` that picks it (`_scan_layers`) makes JAX keep both of its branches'
    residuals, so the read-only layer's savings cost memory (measured: temporaries +20%, time -6%). The rows run
    in cfg.forward_microbatches micro-batches (`map_microbatches`) of `last_hidden_rows`."""
    return map_microbatches(functools.partial(last_hidden_rows, params, cfg, differentiable=differentiable),
                            cfg.forward_microbatches, tokens_bt, mask_bt)


def last_hidden_rows(params: Params, cfg: ModelConfig, tokens_bt: jax.Array, mask_bt: jax.Array,
                     differentiable: bool = False) -> jax.Array:
    """`last_hidden` of all the rows at once (one micro-batch)."""
    tokens_bt = constrain(tokens_bt, ("batch", "length"))
    mask_bt = constrain(mask_bt, ("batch", "length"))
    B, T = tokens_bt.shape
    read_br = None if differentiable else jnp.full((B, 1), T - 1)
    return forward(params, cfg, tokens_bt, mask_bt, read_br=read_br).hidden[:, -1]


def last_hidden_shared_prefix(params: Params, cfg: ModelConfig, prefix_tokens_bp: jax.Array,
                              prefix_mask_bp: jax.Array, tokens_nt: jax.Array, mask_nt: jax.Array) -> jax.Array:
    """`last_hidden_rows` of the N = B * n rows [prefix b, continuation i] (row i = b * n + j continues prefix b)
    with each prefix run once (`forward_shared_prefix`): prefixes left-padded, continuations RIGHT-padded, so a
    row's real tokens are contiguous slots as in its left-padded whole row (sliding windows count slots). Returns
    the final hidden state (N, D) at each row's last real token: its continuation's last, or its prefix's last
    where the continuation is empty. Its last layer computes only those positions (`forward_shared_prefix`'s
    read_nr): for frozen forwards, see `last_hidden`'s `differentiable`."""
    n = tokens_nt.shape[0] // prefix_tokens_bp.shape[0]
    length = mask_nt.astype(jnp.int32).sum(-1)
    prefix_out, out = forward_shared_prefix(
        params, cfg, constrain(prefix_tokens_bp, ("batch", "length")), constrain(prefix_mask_bp, ("batch", "length")),
        constrain(tokens_nt, ("batch", "length")), constrain(mask_nt, ("batch", "length")),
        read_nr=jnp.maximum(length - 1, 0)[:, None])
    return jnp.where((length > 0)[:, None], out.hidden[:, 0], jnp.repeat(prefix_out.hidden[:, 0], n, axis=0))


def prompt_sharing(rows_per_prompt: int, rows: int) -> int:
    """`rows_per_prompt` where a forward over `rows` rows (groups of that many consecutive rows per prompt) can run
    each prompt once (`forward_shared_prefix`), else 1. It can when the rows / rows_per_prompt prompts still split
    evenly over the devices that split the batch; otherwise the prompts' forward would be replicated on several
    devices, so that the per-device memory grows with the mesh (issue 17: an 8B policy's learn phase planned larger
    on 64 devices than on 16, its 32 prompts per micro-batch replicated over 64 devices)."""
    n = rows_per_prompt
    return n if n > 1 and (rows // n) % batch_shards() == 0 else 1


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None, stacked: bool = False
               ) -> KVCache:
    """An empty cache of `max_len` slots per row: a buffer per layer, or with `stacked` one (L, ...) buffer each
    for keys and values (decoding then scans over the layers, see `_stack`)."""
    B, K, S, E, L = batch, cfg.num_kv_heads, max_len, cfg.head_dim, cfg.num_layers
    dtype = jnp.dtype(dtype or cfg.dtype)
    if stacked:
        k, v = (jnp.zeros((L, B, K, E, S), dtype),), (jnp.zeros((L, B, K, S, E), dtype),)
    else:
        k, v = tuple(jnp.zeros((B, K, E, S), dtype) for _ in range(L)), tuple(jnp.zeros((B, K, S, E), dtype) for _ in range(L))
    return KVCache(
        k=k, v=v, key_mask=jnp.zeros((batch, max_len), bool),
        next_position=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32),
    )


def decode(params: Params, cfg: ModelConfig, tokens_bt: jax.Array, cache: KVCache,
           mask_bt: jax.Array | None = None) -> tuple[Output, KVCache]:
    """Appends T tokens to the cache (slots [index, index + T)) and returns their logits.

    `mask_bt` marks which of the new tokens are real (prefill of a left-padded prompt); generated tokens
    are all real, the default.
    """
    B, T = tokens_bt.shape
    mask = jnp.ones((B, T), bool) if mask_bt is None else mask_bt.astype(bool)
    positions = cache.next_position[:, None] + jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, cache.index))
    S = cache.key_mask.shape[1]
    query_slots = jnp.broadcast_to(cache.index + jnp.arange(T), (B, T))
    allowed = _allowed(cfg, query_slots, jnp.arange(S), key_mask)
    out, (k, v) = _stack(params, cfg, tokens_bt, positions, AttentionMask(allowed), cache)
    new_cache = KVCache(k=k, v=v, key_mask=key_mask,
                        next_position=cache.next_position + mask.sum(axis=1, dtype=jnp.int32),
                        index=cache.index + T)
    return out, new_cache


def forward_shared_prefix(params: Params, cfg: ModelConfig, prefix_tokens_bp: jax.Array, prefix_mask_bp: jax.Array,
                          tokens_nt: jax.Array, mask_nt: jax.Array, read_nr: jax.Array | None = None
                          ) -> tuple[Output, Output]:
    """The forward of N = B * n rows [prefix b, continuation i] (row i = b * n + j continues prefix b) that runs
    each prefix once. Equal to `forward` on the concatenated rows (attention is causal, so a prefix's states do
    not depend on its continuations) at B / N of the prefix's cost, forward and backward: gradients from the n
    continuations sum into the shared prefix. Returns (prefix Output (B, P), continuation Output (N, T)).

    One `lax.scan` over the layers carries both streams: in each layer the B prefixes run first, and the N
    continuations attend over their prefix's keys and values (rows repeated n times) followed by their own.
    Under the scan, compile time does not grow with depth.

    `read_nr` (N, R) int: only these continuation positions are read, and the prefixes' last positions; the
    Outputs then hold only them, (B, 1) and (N, R), and the last layer computes only them (`_layer`), besides the
    prefixes' keys and values.
    """
    (B, P), (N, T) = prefix_tokens_bp.shape, tokens_nt.shape
    if N % B:
        raise ValueError(f"{N} continuation rows are not a whole number of copies of {B} prefixes")
    n = N // B
    prefix_mask, mask = prefix_mask_bp.astype(bool), mask_nt.astype(bool)
    prefix_slots, slots = jnp.arange(P), jnp.arange(P + T)
    prefix_segments = prefix_mask.astype(jnp.int32)
    prefix_allowed = AttentionMask(_allowed(cfg, jnp.broadcast_to(prefix_slots, (B, P)), prefix_slots, prefix_mask),
                                   prefix_segments, prefix_segments)
    # Continuation row i: key slots [0, P) hold its prefix, [P, P + T) itself (queries at slots P + t).
    key_mask = jnp.concatenate([jnp.repeat(prefix_mask, n, axis=0), mask], axis=1)
    allowed = AttentionMask(_allowed(cfg, jnp.broadcast_to(P + jnp.arange(T), (N, T)), slots, key_mask),
                            mask.astype(jnp.int32), key_mask.astype(jnp.int32), query_offset=P)
    prefix_positions = positions_from_mask(prefix_mask_bp)
    positions = (jnp.repeat(prefix_mask.sum(axis=1, dtype=jnp.int32), n)[:, None]
                 + jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0))
    inv_freq = rope_inv_freq(cfg)

    def layer(carry, lp, prefix_read_b1=None, read_nr=None):
        prefix_x, x = carry
        prefix_x, (k, v) = _layer(cfg, inv_freq, prefix_x, lp, prefix_positions, prefix_allowed,
                                  read_br=prefix_read_b1)
        context = (jnp.repeat(k, n, axis=0), jnp.repeat(v, n, axis=0))
        x, _ = _layer(cfg, inv_freq, x, lp, positions, allowed, context_kv=context, read_br=read_nr)
        return prefix_x, x

    last_layer = None if read_nr is None else functools.partial(layer, prefix_read_b1=jnp.full((B, 1), P - 1),
                                                                read_nr=read_nr)
    carry = (_embed(params, cfg, prefix_tokens_bp), _embed(params, cfg, tokens_nt))
    prefix_x, x = _scan_layers(cfg, params, layer, carry, last_layer)
    return _output(params, cfg, prefix_x), _output(params, cfg, x)


def prefill(params: Params, cfg: ModelConfig, tokens_bt: jax.Array, mask_bt: jax.Array, max_len: int,
            cache_dtype: str | None = None, stacked_cache: bool = False) -> tuple[Output, KVCache]:
    """Runs a left-padded prompt batch into a fresh cache of `max_len` slots.

    Equal to `decode` of the prompt into an empty cache, but the prompt attends only to its own T keys rather
    than to all `max_len` slots of the buffers (most of them still empty). `stacked_cache`: see `init_cache`."""
    B, T = tokens_bt.shape
    cache = init_cache(cfg, B, max_len, cache_dtype, stacked_cache)
    mask = mask_bt.astype(bool)
    slots = jnp.arange(T)
    segments = mask.astype(jnp.int32)
    allowed = AttentionMask(_allowed(cfg, jnp.broadcast_to(slots, (B, T)), slots, mask), segments, segments)
    out, (k, v) = _stack(params, cfg, tokens_bt, positions_from_mask(mask_bt), allowed, cache, attend_to_cache=False)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, 0))
    return out, KVCache(k=k, v=v, key_mask=key_mask, next_position=mask.sum(axis=1, dtype=jnp.int32),
                        index=jnp.asarray(T, jnp.int32))
