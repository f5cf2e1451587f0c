"""The jitted sampler: prefill a left-padded prompt batch once, then `lax.while_loop`s of one-token decodes
over the preallocated KV cache, exiting as soon as every row has emitted a stop token.

The decode runs in `cache_phases` phases: each phase's cache holds just the slots its last step needs and is
grown (padded with masked slots) between phases, so the early steps do not attend over, and stream through
memory, the empty slots of the later ones.

Shapes: B prompts, N = B * n_samples rows, P prompt length, R = max_new_tokens, V vocab.

    rollout(params, cfg, prompt_tokens_bp, prompt_mask_bp, key, sc) -> Rollout

is pure and has fixed shapes (one compilation per (B, P, R) and config), so it runs inside the compiled
train step. Under `jax.set_mesh(mesh)` the model's logical constraints shard it (batch over data x fsdp,
heads / mlp / vocab over tensor); the cache and the loop's outputs are constrained here the same way.

Sampling follows HF's order: logits / temperature, then top-k, then top-p. `sample_logp` is the log-prob of
the token under that filtered, renormalised distribution (what was actually sampled from); `policy_logp` is
log_softmax(logits / temperature), unfiltered: what the PPO loss recomputes from a forward at the same
temperature.

n samples per prompt: the B prompts are prefilled once, the cache rows are repeated n times
(row = prompt * n + j) and each row samples with its own randomness.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import FLOAT_DTYPES, ModelConfig
from rlaif_jax.sharding import constrain

Params = dict[str, Any]


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `rollout` config section."""
    c = ml_collections.ConfigDict()
    c.max_new_tokens = 64   # R: response length budget; one compilation per (batch, prompt length, R)
    c.temperature = 1.0     # logits are divided by this before sampling (and for policy_logp)
    c.top_k = 0             # keep the k most likely tokens; 0 = off
    c.top_p = 1.0           # nucleus: smallest set of most likely tokens with mass >= top_p; 1.0 = off
    c.greedy = False        # argmax decoding (temperature / top-k / top-p then only affect policy_logp)
    c.n_samples = 1         # responses per prompt (group estimators); they share one prefill
    c.stop_ids = []         # token ids that end a response; empty = the model's eos ids
    c.cache_dtype = ""      # KV cache dtype; "" = the model's compute dtype
    # The decode loop runs in this many phases, each over a KV cache just long enough for its last token (grown
    # between phases), so early tokens attend over fewer empty slots. Each phase compiles its own loop body, so
    # more phases trade compile time for rollout time (README, "Performance"); 1 = one loop, one body.
    c.cache_phases = 4
    # The policy's weights during decoding (transformer.decoding_params), cast once to the compute dtype:
    # "gathered": all-gathered over fsdp before the loop, a whole copy per device (tensor shards aside), no weight
    # traffic per token | "sharded": kept fsdp-sharded, each decode step all-gathers each layer just before use
    # (memory: 1 / fsdp of the copy; traffic: the whole model per token). "sharded" is for policies whose copy
    # does not fit a device next to everything else (with mesh.tensor > 1, tensor parallelism is the faster cut).
    # "auto": "sharded" when the mesh has an fsdp axis (> 1), else "gathered" (resolved by the builder).
    c.decode_weights = "gathered"
    return c


def validate_config(c: ml_collections.ConfigDict | SamplingConfig) -> None:
    """Raises ValueError with what to change when the `rollout` section is inconsistent; `config.validate` runs it
    before anything loads. A `SamplingConfig` (same field names) is checked by the same function."""
    if not (_is_int(c.max_new_tokens) and c.max_new_tokens >= 1):
        raise ValueError(f"rollout.max_new_tokens={c.max_new_tokens!r} must be an int >= 1")
    if not (c.temperature > 0 and math.isfinite(c.temperature)):
        raise ValueError(f"rollout.temperature={c.temperature} must be finite and > 0 (for argmax set "
                         "rollout.greedy=True)")
    if not (_is_int(c.top_k) and c.top_k >= 0):
        raise ValueError(f"rollout.top_k={c.top_k!r} must be an int >= 0 (0 turns it off)")
    if not 0 < c.top_p <= 1:
        raise ValueError(f"rollout.top_p={c.top_p} must be in (0, 1] (1.0 turns it off)")
    if not (_is_int(c.n_samples) and c.n_samples >= 1):
        raise ValueError(f"rollout.n_samples={c.n_samples!r} must be an int >= 1")
    if not (_is_int(c.cache_phases) and c.cache_phases >= 1):
        raise ValueError(f"rollout.cache_phases={c.cache_phases!r} must be an int >= 1")
    if not all(_is_int(i) and i >= 0 for i in c.stop_ids):
        raise ValueError(f"rollout.stop_ids={list(c.stop_ids)!r} must be token ids (ints >= 0) of the policy's "
                         "tokenizer, not strings; [] uses the policy's eos ids")
    allowed = tfm.DECODE_WEIGHTS + (() if isinstance(c, SamplingConfig) else ("auto",))  # resolved by from_config
    if c.decode_weights not in allowed:
        raise ValueError(f"rollout.decode_weights={c.decode_weights!r}; use one of {allowed}")
    if (c.cache_dtype or "") not in ("",) + FLOAT_DTYPES:
        raise ValueError(f"rollout.cache_dtype={c.cache_dtype!r}; use one of {FLOAT_DTYPES} or '' (the model's dtype)")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) sampling settings. `stop_ids` here is final: () means a row never stops early."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    n_samples: int = 1
    stop_ids: tuple[int, ...] = ()
    cache_dtype: str | None = None
    cache_phases: int = 4
    decode_weights: str = "gathered"

    def __post_init__(self):
        validate_config(self)

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict, model_cfg: ModelConfig) -> "SamplingConfig":
        """From the `rollout` config section; empty `stop_ids` resolve to the model's eos ids, decode_weights
        "auto" by the fsdp axis of the mesh set by `jax.set_mesh` (the builder's)."""
        stop_ids = tuple(int(i) for i in c.stop_ids) or tuple(model_cfg.eos_token_ids)
        decode_weights = c.decode_weights
        if decode_weights == "auto":
            mesh = jax.sharding.get_abstract_mesh()
            fsdp = 1 if mesh.empty else dict(mesh.shape).get("fsdp", 1)
            decode_weights = "sharded" if fsdp > 1 else "gathered"
        return cls(max_new_tokens=int(c.max_new_tokens), temperature=float(c.temperature), top_k=int(c.top_k),
                   top_p=float(c.top_p), greedy=bool(c.greedy), n_samples=int(c.n_samples), stop_ids=stop_ids,
                   cache_dtype=c.cache_dtype or None, cache_phases=int(c.cache_phases),
                   decode_weights=str(decode_weights))


@flax.struct.dataclass
class Rollout:
    """Responses of N = B * n_samples rows; row = prompt * n_samples + j."""
    prompt_tokens_bp: jax.Array  # (N, P) int32, left-padded prompts repeated per sample
    prompt_mask_bp: jax.Array  # (N, P) int32
    response_tokens_br: jax.Array  # (N, R) int32; pad id after the stop token
    sample_logp_br: jax.Array  # (N, R) f32 log-prob under the distribution sampled from (greedy: 0); 0 on pad
    policy_logp_br: jax.Array  # (N, R) f32 log_softmax(logits / temperature)[token]; 0 on pad
    response_mask_br: jax.Array  # (N, R) int32: 1 up to and including the first stop token
    lengths_b: jax.Array  # (N,) int32 = response_mask_br.sum(1)
    stopped_b: jax.Array  # (N,) bool: the row emitted a stop token within R tokens


# ---------------------------------------------------------------------------------------------- sampling
def filter_logits(logits_bv: jax.Array, sc: SamplingConfig) -> jax.Array:
    """Tempered, top-k and top-p filtered logits; removed tokens are -inf. HF's order and semantics:

      x = logits / temperature
      top-k: keep x_i >= (k-th largest x). Ties with the k-th value are all kept (as HF's TopKLogitsWarper).
      top-p: sort the kept x descending, p = softmax; keep token i iff sum_{j<i} p_j < top_p, i.e. the smallest
             prefix whose mass reaches top_p (the top token always kept) == HF's TopPLogitsWarper. The cut is a
             threshold on x, so a token tied with the last kept one is kept too.
    """
    x_bv = logits_bv.astype(jnp.float32) / sc.temperature
    V = x_bv.shape[-1]
    sorted_desc_bk = None
    if 0 < sc.top_k < V:
        sorted_desc_bk = jax.lax.top_k(x_bv, sc.top_k)[0]  # (B, k) descending
        x_bv = jnp.where(x_bv >= sorted_desc_bk[:, -1:], x_bv, -jnp.inf)
    if sc.top_p < 1.0:
        if sorted_desc_bk is None:
            sorted_desc_bk = jnp.flip(jnp.sort(x_bv, axis=-1), axis=-1)
        # After top-k only its k values carry mass, so the softmax over them is the renormalised distribution.
        probs_bk = jax.nn.softmax(sorted_desc_bk, axis=-1)
        mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
        keep_bk = mass_before_bk < sc.top_p
        threshold_b = jnp.min(jnp.where(keep_bk, sorted_desc_bk, jnp.inf), axis=-1)
        x_bv = jnp.where(x_bv >= threshold_b[:, None], x_bv, -jnp.inf)
    return x_bv


def _take(x_bv: jax.Array, token_b: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_bv, token_b[:, None], axis=-1)[:, 0]


def sample_token(uniform_b: jax.Array, logits_bv: jax.Array, sc: SamplingConfig
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from one uniform u ~ U[0, 1) per row -> (token_b, sample_logp_b, policy_logp_b).

    token ~ p = softmax(filter_logits(logits)) by inversion: with u per row and c = cumsum(p),
    token = #{i : c_i <= u * c_V} (the first i with c_i > u * c_V), so token i is drawn with probability p_i and
    a filtered token (p_i = 0, a flat step of c) never is. One uniform per row instead of V Gumbels: the
    sampling step costs O(V) arithmetic and O(1) random bits per row.
    greedy: token = argmax logits, sample_logp = log 1 = 0.
    policy_logp = log_softmax(logits / temperature)[token].
    """
    x_bv = logits_bv.astype(jnp.float32) / sc.temperature
    if sc.greedy:
        token_b = jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
        return token_b, jnp.zeros(token_b.shape, jnp.float32), _take(jax.nn.log_softmax(x_bv, axis=-1), token_b)
    filtered = 0 < sc.top_k < x_bv.shape[-1] or sc.top_p < 1.0
    sample_x_bv = filter_logits(logits_bv, sc) if filtered else x_bv
    # c = cumsum(exp(x - max x)): unnormalised, its last entry is the normaliser, so one exp pass serves the
    # draw and both log-probs (log p_i = x_i - max x - log c_V).
    max_b = jnp.max(sample_x_bv, axis=-1)
    cdf_bv = jnp.cumsum(jnp.exp(sample_x_bv - max_b[:, None]), axis=-1)
    u_b = uniform_b.astype(jnp.float32) * cdf_bv[:, -1]
    token_b = jnp.sum(cdf_bv <= u_b[:, None], axis=-1, dtype=jnp.int32)
    # u * c_V can round up to c_V (probability ~2^-24): then clamp to the last token with mass.
    last_b = cdf_bv.shape[-1] - 1 - jnp.argmax(jnp.flip(sample_x_bv > -jnp.inf, axis=-1), axis=-1)
    token_b = jnp.minimum(token_b, last_b.astype(jnp.int32))
    sample_logp_b = _take(sample_x_bv, token_b) - max_b - jnp.log(cdf_bv[:, -1])
    if not filtered:
        return token_b, sample_logp_b, sample_logp_b
    return token_b, sample_logp_b, _take(x_bv, token_b) - jax.nn.logsumexp(x_bv, axis=-1)


# ---------------------------------------------------------------------------------------------- the loop
class _LoopState(NamedTuple):
    step: jax.Array  # () int32: the response position the next emitted token goes to
    cache: tfm.KVCache
    last_token_b: jax.Array  # (N,) the token to feed next
    done_b: jax.Array  # (N,) bool: the row has emitted a stop token
    tokens_br: jax.Array
    sample_logp_br: jax.Array
    policy_logp_br: jax.Array
    mask_br: jax.Array


def _constrain_cache(cache: tfm.KVCache) -> tfm.KVCache:
    k_axes, v_axes = ("batch", "kv_heads", "head_dim", "cache_length"), ("batch", "kv_heads", "cache_length", "head_dim")
    if cache.stacked:
        k_axes, v_axes = ("layers",) + k_axes, ("layers",) + v_axes
    return cache.replace(k=tuple(constrain(k, k_axes) for k in cache.k),
                         v=tuple(constrain(v, v_axes) for v in cache.v),
                         key_mask=constrain(cache.key_mask, ("batch", "cache_length")),
                         next_position=constrain(cache.next_position, ("batch",)))


def cache_phase_lengths(P: int, R: int, phases: int) -> list[tuple[int, int]]:
    """(last step + 1, cache slots) of each decode phase. Step t feeds token t - 1 into slot P + t - 1 (the
    last sampled token is never fed back), so a phase ending before step `end` needs P + end - 1 slots,
    rounded up to a multiple of 16 so that each row of the (B, K, E, S) key buffer starts on a cache line
    (the unused slots stay masked out)."""
    ends = sorted({R * (j + 1) // phases for j in range(phases)} - {0})
    return [(end, -(-(P + end - 1) // 16) * 16) for end in ends]


def _grow_cache(cache: tfm.KVCache, slots: int) -> tfm.KVCache:
    """The cache with empty (masked) slots appended up to `slots`."""
    pad = slots - cache.key_mask.shape[1]
    lead = ((0, 0),) * (cache.k[0].ndim - 2)  # (layers,) batch, kv heads
    return cache.replace(k=tuple(jnp.pad(k, lead + ((0, 0), (0, pad))) for k in cache.k),
                         v=tuple(jnp.pad(v, lead + ((0, pad), (0, 0))) for v in cache.v),
                         key_mask=jnp.pad(cache.key_mask, ((0, 0), (0, pad))))


def _repeat_rows(x: jax.Array, n: int) -> jax.Array:
    return x if n == 1 else jnp.repeat(x, n, axis=0)


def rollout(params: Params, cfg: ModelConfig, prompt_tokens_bp: jax.Array, prompt_mask_bp: jax.Array,
            key: jax.Array, sc: SamplingConfig) -> Rollout:
    """Samples up to R = sc.max_new_tokens tokens for each of the B left-padded prompts, n_samples times.

    `cfg` and `sc` are static under jit. Token t of row i is drawn with uniform u[t, i] of one (R, N) draw
    from `key`, made before the loop (one random-bits call rather than one per step). A row that has stopped keeps emitting the pad id (the
    model's pad id, else 0) with mask 0, and the loop exits once every row has stopped.
    """
    B, P = prompt_tokens_bp.shape
    R, n = sc.max_new_tokens, sc.n_samples
    N = B * n
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    stop_ids = jnp.asarray(sc.stop_ids, jnp.int32)
    prompt_tokens_bp = prompt_tokens_bp.astype(jnp.int32)
    prompt_mask_bp = prompt_mask_bp.astype(jnp.int32)

    # --- prefill the B prompts once (the last real token is at P - 1: left padding) into the first phase's cache.
    params = tfm.decoding_params(params, cfg, sc.decode_weights)
    phases = cache_phase_lengths(P, R, sc.cache_phases)
    stacked = sc.decode_weights == "sharded"
    unembed = tfm.unembed_vocab_sharded if stacked else tfm.unembed
    batch_first = (lambda x: jnp.moveaxis(x, 0, 1)) if stacked else (lambda x: x)  # a stacked cache is (L, B, ...)

    def prefill(tokens_bp, mask_bp):  # in cfg.forward_microbatches micro-batches of prompts
        out, cache = tfm.prefill(params, cfg, tokens_bp, mask_bp, phases[0][1], sc.cache_dtype, stacked_cache=stacked)
        # Only the last position's logits are needed: unembedding just it lets XLA drop the (B, P, V) head.
        return (unembed(params, cfg, out.hidden[:, -1]), tuple(map(batch_first, cache.k)),
                tuple(map(batch_first, cache.v)), cache.key_mask, cache.next_position)

    logits_bv, k, v, key_mask, next_position = tfm.map_microbatches(prefill, cfg.forward_microbatches,
                                                                    prompt_tokens_bp, prompt_mask_bp)
    cache = tfm.KVCache(k=tuple(map(batch_first, k)), v=tuple(map(batch_first, v)), key_mask=key_mask,
                        next_position=next_position, index=jnp.asarray(P, jnp.int32))
    uniforms_rn = jax.random.uniform(key, (R, N), jnp.float32)
    # --- n samples: repeat cache rows (consecutive rows per prompt), not the prefill.
    cache = _constrain_cache(cache.repeat_rows(n))
    logits_bv = constrain(_repeat_rows(logits_bv, n), ("batch", "vocab"))

    def emit(state: _LoopState, logits_bv: jax.Array) -> _LoopState:
        token_b, sample_logp_b, policy_logp_b = sample_token(uniforms_rn[state.step], logits_bv, sc)
        live_b = ~state.done_b
        token_b = jnp.where(live_b, token_b, pad_id)
        done_b = state.done_b | (live_b & jnp.any(token_b[:, None] == stop_ids[None, :], axis=-1))

        def put(buf_br, col_b):
            buf_br = jax.lax.dynamic_update_slice(buf_br, col_b[:, None].astype(buf_br.dtype), (0, state.step))
            return constrain(buf_br, ("batch", "length"))

        zero = jnp.zeros_like(sample_logp_b)
        return _LoopState(
            step=state.step + 1, cache=state.cache, last_token_b=constrain(token_b, ("batch",)), done_b=done_b,
            tokens_br=put(state.tokens_br, token_b),
            sample_logp_br=put(state.sample_logp_br, jnp.where(live_b, sample_logp_b, zero)),
            policy_logp_br=put(state.policy_logp_br, jnp.where(live_b, policy_logp_b, zero)),
            mask_br=put(state.mask_br, live_b.astype(jnp.int32)),
        )

    def body(state: _LoopState) -> _LoopState:
        out, cache = tfm.decode(params, cfg, state.last_token_b[:, None], state.cache)
        state = state._replace(cache=_constrain_cache(cache))
        return emit(state, out.logits[:, 0])

    state = _LoopState(
        step=jnp.zeros((), jnp.int32), cache=cache, last_token_b=jnp.full((N,), pad_id, jnp.int32),
        done_b=jnp.zeros((N,), bool), tokens_br=jnp.full((N, R), pad_id, jnp.int32),
        sample_logp_br=jnp.zeros((N, R), jnp.float32), policy_logp_br=jnp.zeros((N, R), jnp.float32),
        mask_br=jnp.zeros((N, R), jnp.int32),
    )
    state = emit(state, logits_bv)
    # One loop per phase; each exits at its last step or as soon as every row has stopped (then the later
    # phases' loops exit at once).
    for i, (end, slots) in enumerate(phases):
        if i:
            state = state._replace(cache=_constrain_cache(_grow_cache(state.cache, slots)))
        state = jax.lax.while_loop(lambda st, end=end: (st.step < end) & ~jnp.all(st.done_b), body, state)

    return Rollout(
        prompt_tokens_bp=_repeat_rows(prompt_tokens_bp, n), prompt_mask_bp=_repeat_rows(prompt_mask_bp, n),
        response_tokens_br=state.tokens_br, sample_logp_br=state.sample_logp_br,
        policy_logp_br=state.policy_logp_br, response_mask_br=state.mask_br,
        lengths_b=state.mask_br.sum(axis=1, dtype=jnp.int32), stopped_b=state.done_b,
    )
