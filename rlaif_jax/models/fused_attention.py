"""The fused attention kernels of the no-cache forwards (config.compute.attention; `transformer.attention` picks):

    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's flash attention, GPU only, bf16 / fp16
    splash  the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention), TPU; on any
            other backend it runs in Pallas' interpret mode (how the CPU tests check it: correct, slow)
    fused   the backend's kernel: cudnn on GPU (for a float32 model, which cuDNN has no kernel for, chunked),
            splash on TPU, and transformer.chunked_attention elsewhere (the CPU fallback, memory linear in S like
            the kernels')

Neither kernel takes an arbitrary (B, T, S) mask without materialising it, so they read the mask in its
structured form (`transformer.AttentionMask`): causal with the queries at key slots offset.. offset + T - 1, the
sliding window if any, and per-slot segment ids, a query seeing only keys of its own segment. Segments are what
left padding, right-padded continuations and packed rows have in common: real tokens carry their sequence's id
(>= 1), padding 0. For a real query that is exactly the dense mask; a padding query sees the padding before it
(itself at least) where the dense mask gives it no key, so no row of a kernel's softmax is empty. Padding
positions' outputs are never read, so logits and gradients at real positions equal the plain path's
(tests/test_models.py).

Shapes as in transformer.py: q (B, K, G, T, E) grouped by kv head, k and v (B, K, S, E).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.sharding import logical_to_spec, partitioned_mesh

KERNELS = ("cudnn", "splash")
BACKEND_KERNEL = {"gpu": "cudnn", "tpu": "splash"}  # "fused" on these backends; "chunked" on the others
KERNEL_BACKEND = {kernel: backend for backend, kernel in BACKEND_KERNEL.items()}
SPLASH_LANES = 128  # the splash kernel's blocks are whole multiples of the TPU's 128 lanes


HALF_DTYPES = ("bfloat16", "float16")  # cuDNN's flash attention has kernels for these only


def resolve(attention: str, backend: str, dtype: str) -> str:
    """compute.attention as a model computing in `dtype` runs it on `backend` ("gpu", "tpu", "cpu"): "fused"
    becomes the backend's kernel where it has one for the dtype, else "chunked"."""
    if attention != "fused":
        return attention
    kernel = BACKEND_KERNEL.get(backend, "chunked")
    return "chunked" if kernel == "cudnn" and dtype not in HALF_DTYPES else kernel


def check_backend(attention: str, backend: str, dtype: str) -> None:
    """Refuses, in one line, a kernel this backend cannot run (or, cuDNN, a dtype it has no kernel for)."""
    kernel = resolve(attention, backend, dtype)
    if kernel in KERNELS and KERNEL_BACKEND[kernel] != backend:
        raise ValueError(f"config.compute.attention={attention!r} is the {KERNEL_BACKEND[kernel].upper()} kernel; "
                         f"this backend is {backend}: use 'fused' (the backend's kernel) or 'chunked'")
    if kernel == "cudnn" and dtype not in HALF_DTYPES:
        raise ValueError(f"config.compute.attention={attention!r} runs cuDNN's flash attention, which has bfloat16 "
                         f"and float16 kernels only; the model computes in {dtype}: set policy.dtype='bfloat16'")


def segment_mask(q_segment_bt, kv_segment_bs, query_offset: int, window: int | None):
    """The kernels' mask, dense (B, T, S): causal at `query_offset`, within the window, same segment."""
    T, S = q_segment_bt.shape[1], kv_segment_bs.shape[1]
    q_slot, k_slot = query_offset + np.arange(T)[:, None], np.arange(S)[None, :]
    static = k_slot <= q_slot
    if window is not None:
        static &= q_slot - k_slot < window
    return static[None] & (q_segment_bt[:, :, None] == kv_segment_bs[:, None, :])


def dot_product_attention(q_bkgte, k_bkse, v_bkse, q_segment_bt, kv_segment_bs, query_offset: int,
                          window: int | None, implementation: str):
    """jax.nn.dot_product_attention (`implementation` "cudnn"; "xla" is its reference, what CPU tests run) with
    the mask of `segment_mask`. cuDNN adds the mask as a (B, 1, T, S) bias: per layer that is B*T*S of the compute
    dtype, not the (B, H, T, S) float32 scores of the plain path. Returns (B, K, G, T, E)."""
    B, K, G, T, E = q_bkgte.shape
    # jax.nn's layouts: query (B, T, N, E) with query head n on kv head n // G, key and value (B, S, K, E).
    q = q_bkgte.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, E)
    k, v = k_bkse.transpose(0, 2, 1, 3), v_bkse.transpose(0, 2, 1, 3)
    mask = segment_mask(q_segment_bt, kv_segment_bs, query_offset, window)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(q_bkgte, k_bkse, v_bkse, q_segment_bt, kv_segment_bs, query_offset: int, window: int | None,
                     block: int):
    """The splash kernel over blocks of `block` queries and keys (rounded up to whole 128-lane tiles, and down to
    the sequence when it is shorter): T and S are padded to whole blocks, the padding in segments no real slot
    has. One multi-query kernel per kv head (its G query heads), vmapped over kv heads and rows; under a mesh it
    runs per device in a shard_map over the rows' and kv heads' shards (a Pallas call is opaque to XLA's sharding
    propagation, which would otherwise gather its operands). Returns (B, K, G, T, E)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, K, G, T, E = q_bkgte.shape
    S = k_bkse.shape[2]
    block_q, block_kv = (_round_up(min(block, n), SPLASH_LANES) for n in (T, S))
    Tp, Sp = _round_up(T, block_q), _round_up(S, block_kv)
    # The kernel does not scale the scores: the query is scaled instead, as the reference implementations do.
    q = jnp.pad(q_bkgte * jnp.asarray(1 / math.sqrt(E), q_bkgte.dtype), ((0, 0),) * 3 + ((0, Tp - T), (0, 0)))
    k = jnp.pad(k_bkse, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    v = jnp.pad(v_bkse, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    # Padded key slots in segment -1, which no query has: they weigh nothing. Padded query rows are sliced off.
    q_segment = jnp.pad(q_segment_bt.astype(jnp.int32), ((0, 0), (0, Tp - T)))
    kv_segment = jnp.pad(kv_segment_bs.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-1)
    # Query t sits at key slot query_offset + t, padded or not.
    if window is None:
        head_mask = masks.CausalMask((Tp, Sp), offset=query_offset)
    else:
        head_mask = masks.LocalMask((Tp, Sp), window_size=(window - 1, 0), offset=query_offset)
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                              block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                              block_kv_dq=block_kv)
    interpret = jax.default_backend() != "tpu"

    def per_device(q, k, v, q_segment, kv_segment):
        kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([head_mask] * G), block_sizes=sizes,
                                                      interpret=interpret)

        def row(q_kgte, k_kse, v_kse, q_seg, kv_seg):
            segments = splash.SegmentIds(q=q_seg, kv=kv_seg)
            return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(q_kgte, k_kse, v_kse)

        return jax.vmap(row)(q, k, v, q_segment, kv_segment)

    mesh = partitioned_mesh()
    if mesh is None:
        out = per_device(q, k, v, q_segment, kv_segment)
    else:
        shape = dict(mesh.shape)
        heads = logical_to_spec(("batch", "kv_heads", None, None, None), q.shape, shape)
        kv = logical_to_spec(("batch", "kv_heads", None, None), k.shape, shape)
        rows = jax.sharding.PartitionSpec(heads[0], None)  # segment ids split over the rows as q's are
        out = jax.shard_map(per_device, mesh=mesh, in_specs=(heads, kv, kv, rows, rows), out_specs=heads,
                            check_vma=False)(q, k, v, q_segment, kv_segment)
    return out[:, :, :, :T]
