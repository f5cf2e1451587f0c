"""HF checkpoints <-> our params: config.json + safetensors (single file or index-sharded), tokenizer.

Import reads each tensor straight into its sharded layout: `jax.make_array_from_callback` asks, per device,
for the slice that device holds, and the callback reads that layer's tensor from a memory-mapped
safetensors file. Nothing is ever assembled whole on one device or on the host beyond one layer's tensor.
Only safetensors are read (never pickle) and no remote code runs.

The name mapping, with the transposes in plain sight (HF Linear stores (out, in); we store (in, out)):
  model.embed_tokens.weight                    (V, D)        -> embed              (V, D)
  model.layers.i.input_layernorm.weight        (D,)          -> layers.attn_norm   [i] (D,)
  model.layers.i.self_attn.q_proj.weight       (H*E, D)      -> layers.q           [i] (D, H, E)
  model.layers.i.self_attn.k_proj.weight       (K*E, D)      -> layers.k           [i] (D, K, E)
  model.layers.i.self_attn.v_proj.weight       (K*E, D)      -> layers.v           [i] (D, K, E)
  model.layers.i.self_attn.o_proj.weight       (D, H*E)      -> layers.o           [i] (H, E, D)
  model.layers.i.self_attn.{q,k,v}_proj.bias   (H*E,)        -> layers.{q,k,v}_bias[i] (H, E)
  model.layers.i.self_attn.o_proj.bias         (D,)          -> layers.o_bias      [i] (D,)
  model.layers.i.self_attn.{q,k}_norm.weight   (E,)          -> layers.{q,k}_norm  [i] (E,)
  model.layers.i.post_attention_layernorm.weight (D,)        -> layers.mlp_norm    [i] (D,)
  model.layers.i.mlp.{gate,up}_proj.weight     (F, D)        -> layers.{gate,up}   [i] (D, F)
  model.layers.i.mlp.down_proj.weight          (D, F)        -> layers.down        [i] (F, D)
  model.norm.weight                            (D,)          -> final_norm         (D,)
  lm_head.weight                               (V, D)        -> lm_head            (D, V)   (absent when tied)

GPT-NeoX (model_type gpt_neox: Pythia), whose LayerNorms and Linears all have biases (`<n>.bias` -> `<ours>_bias`):
  gpt_neox.embed_in.weight                     (V, D)        -> embed              (V, D)
  gpt_neox.layers.i.input_layernorm.weight     (D,)          -> layers.attn_norm   [i] (D,)
  gpt_neox.layers.i.attention.query_key_value.weight (H*3*E, D) -> layers.{q,k,v}  [i] (D, H, E): rows (head, q|k|v, e)
  gpt_neox.layers.i.attention.dense.weight     (D, H*E)      -> layers.o           [i] (H, E, D)
  gpt_neox.layers.i.post_attention_layernorm.weight (D,)     -> layers.mlp_norm    [i] (D,)
  gpt_neox.layers.i.mlp.dense_h_to_4h.weight   (F, D)        -> layers.up          [i] (D, F)   (no gate)
  gpt_neox.layers.i.mlp.dense_4h_to_h.weight   (D, F)        -> layers.down        [i] (F, D)
  gpt_neox.final_layer_norm.weight             (D,)          -> final_norm         (D,)
  embed_out.weight                             (V, D)        -> lm_head            (D, V)   (absent when tied)
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import struct
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig
from rlaif_jax import errors
from rlaif_jax import sharding as shd

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# Buffers some checkpoints carry that are derived, not learned (GPT-NeoX's older ones: the causal mask).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


class CheckpointError(errors.UserError):
    """A checkpoint folder that cannot be loaded: the message names the file, tensor or field at fault."""

    kind = "model"


# Files of which a folder's tokenizer is read (any one of them): fast tokenizer, sentencepiece, BPE, WordPiece.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


# ---------------------------------------------------------------------------------------------- safetensors
def _read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data); a truncated or corrupt file (a header
    that does not parse, tensors that reach past the end of the file) is a CheckpointError naming it."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((int(m["data_offsets"][1]) for m in header.values()), default=0)
        bad = [k for k, m in header.items() if m.get("dtype") not in _ST_DTYPES]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated: "
                              "copy or download it again") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file holds "
                              f"{size}; copy or download it again")
    if bad:
        raise CheckpointError(f"{path}: tensors {bad[:3]} have a dtype this reader does not know")
    return header, 8 + n


# A reward model of the summarize-from-feedback reproductions (Huang et al. 2024, `ScalarModel` in their
# reward.py / ppo_left_padding.py): config.json holds the backbone's config under "base_config" and a "bias", the
# weights are the base model's (`AutoModel`, no LM head) under "lm_backbone." plus "scalar_head.weight" (1, D) and
# "scalar_head.bias" (1,); reward = scalar_head(final hidden state) - bias.
SCALAR_BACKBONE_PREFIX = "lm_backbone."
SCALAR_HEAD = "scalar_head."


def scalar_model_config(folder: str) -> dict[str, Any] | None:
    """The config.json of a `ScalarModel` reward-model folder, or None for any other folder."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return config if isinstance(config.get("base_config"), dict) and "bias" in config else None


class SafetensorsReader:
    """Memory-mapped read access to the tensors of one checkpoint folder (single file or index-sharded).

    `renames` maps a name prefix in the files to the one the importer asks for (a ScalarModel's backbone)."""

    def __init__(self, folder: str, renames: Mapping[str, str] | None = None):
        index_path = os.path.join(folder, "model.safetensors.index.json")
        single_path = os.path.join(folder, "model.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single_path):
            files = ["model.safetensors"]
            weight_map = None
        else:
            raise CheckpointError(
                f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json "
                "(only safetensors are read, never pickle .bin files)"
            )
        self._entries: dict[str, tuple[str, dict[str, Any], int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise CheckpointError(f"missing weight file {name} (listed in {index_path}) in {folder}")
            header, offset = _read_safetensors_header(path)
            for key, meta in header.items():
                self._entries[key] = (path, meta, offset)
        for old_prefix, new_prefix in (renames or {}).items():
            self._entries = {new_prefix + k[len(old_prefix):] if k.startswith(old_prefix) else k: v
                             for k, v in self._entries.items()}
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._entries))
            if absent:
                raise CheckpointError(f"tensors listed in the index but absent from their files: {absent[:5]}")

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise CheckpointError(f"missing tensor {name!r} in the checkpoint")
        path, meta, offset = self._entries[name]
        start, end = meta["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[meta["dtype"]])
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=offset + start, shape=(end - start,))
        return mm.view(dtype).reshape(meta["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Minimal safetensors writer (the format: u64 header size, JSON header, raw little-endian bytes);
    written to a temporary name and renamed so a crash never leaves a half file under the real name."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- name mapping
# Each entry: our param -> (HF name, HF tensor -> ours, ours -> HF tensor). The last reads the dict that holds
# the param (one layer's params, or the top level) because one HF tensor may hold several of ours: GPT-NeoX's
# query_key_value is q, k and v, each read from its slice and written back together.
Mapping = dict[str, tuple[str, Callable, Callable]]


def _hf_layer_map(cfg: ModelConfig) -> Mapping:
    """The mapping of one layer's params (HF names with {i} for the layer)."""
    D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def of(key, to_hf=lambda w: w):  # ours -> HF of a tensor that is one param of ours
        return lambda lp: to_hf(lp[key])

    def proj_in(key, n):  # (n*E, D) <-> (D, n, E)
        return lambda w: w.T.reshape(D, n, E), of(key, lambda w: w.reshape(D, n * E).T)

    def bias(key, n):  # (n*E,) <-> (n, E)
        return lambda w: w.reshape(n, E), of(key, lambda w: w.reshape(n * E))

    def same(key):
        return lambda w: w, of(key)

    def transposed(key):
        return lambda w: w.T, of(key, lambda w: w.T)

    o = (lambda w: w.T.reshape(H, E, D), of("o", lambda w: w.reshape(H * E, D).T))
    if cfg.family == "gpt_neox":
        p = "gpt_neox.layers.{i}."
        qkv = p + "attention.query_key_value."

        # HF views the fused output as (..., H, 3 * E) and chunks the last axis: rows ordered (head, q|k|v, e).
        def qkv_part(c):  # (H*3*E, D) -> (D, H, E), (H*3*E,) -> (H, E)
            return (lambda w: w.reshape(H, 3, E, D)[:, c].transpose(2, 0, 1),
                    lambda w: w.reshape(H, 3, E)[:, c])

        def join_qkv(lp):
            return np.stack([lp["q"], lp["k"], lp["v"]], axis=2).reshape(D, H * 3 * E).T

        def join_qkv_bias(lp):
            return np.stack([lp["q_bias"], lp["k_bias"], lp["v_bias"]], axis=1).reshape(H * 3 * E)

        m = {
            "attn_norm": (p + "input_layernorm.weight", *same("attn_norm")),
            "attn_norm_bias": (p + "input_layernorm.bias", *same("attn_norm_bias")),
            **{key: (qkv + "weight", qkv_part(c)[0], join_qkv) for c, key in enumerate("qkv")},
            **{key + "_bias": (qkv + "bias", qkv_part(c)[1], join_qkv_bias) for c, key in enumerate("qkv")},
            "o": (p + "attention.dense.weight", *o),
            "o_bias": (p + "attention.dense.bias", *same("o_bias")),
            "mlp_norm": (p + "post_attention_layernorm.weight", *same("mlp_norm")),
            "mlp_norm_bias": (p + "post_attention_layernorm.bias", *same("mlp_norm_bias")),
            "up": (p + "mlp.dense_h_to_4h.weight", *transposed("up")),
            "up_bias": (p + "mlp.dense_h_to_4h.bias", *same("up_bias")),
            "down": (p + "mlp.dense_4h_to_h.weight", *transposed("down")),
            "down_bias": (p + "mlp.dense_4h_to_h.bias", *same("down_bias")),
        }
    else:
        p = "model.layers.{i}."
        m = {
            "attn_norm": (p + "input_layernorm.weight", *same("attn_norm")),
            "q": (p + "self_attn.q_proj.weight", *proj_in("q", H)),
            "k": (p + "self_attn.k_proj.weight", *proj_in("k", K)),
            "v": (p + "self_attn.v_proj.weight", *proj_in("v", K)),
            "o": (p + "self_attn.o_proj.weight", *o),
            "mlp_norm": (p + "post_attention_layernorm.weight", *same("mlp_norm")),
            "gate": (p + "mlp.gate_proj.weight", *transposed("gate")),
            "up": (p + "mlp.up_proj.weight", *transposed("up")),
            "down": (p + "mlp.down_proj.weight", *transposed("down")),
            "q_bias": (p + "self_attn.q_proj.bias", *bias("q_bias", H)),
            "k_bias": (p + "self_attn.k_proj.bias", *bias("k_bias", K)),
            "v_bias": (p + "self_attn.v_proj.bias", *bias("v_bias", K)),
            "o_bias": (p + "self_attn.o_proj.bias", *same("o_bias")),
            "gate_bias": (p + "mlp.gate_proj.bias", *same("gate_bias")),
            "up_bias": (p + "mlp.up_proj.bias", *same("up_bias")),
            "down_bias": (p + "mlp.down_proj.bias", *same("down_bias")),
            "q_norm": (p + "self_attn.q_norm.weight", *same("q_norm")),
            "k_norm": (p + "self_attn.k_norm.weight", *same("k_norm")),
        }
    return {k: v for k, v in m.items() if k in tfm.param_shapes(cfg)["layers"]}


def _hf_top_map(cfg: ModelConfig) -> Mapping:
    """The mapping of the params outside the layers (lm_head included when tied: its tensor is then ignored)."""
    def same(key):
        return lambda w: w, lambda params: params[key]

    if cfg.family == "gpt_neox":
        return {
            "embed": ("gpt_neox.embed_in.weight", *same("embed")),
            "final_norm": ("gpt_neox.final_layer_norm.weight", *same("final_norm")),
            "final_norm_bias": ("gpt_neox.final_layer_norm.bias", *same("final_norm_bias")),
            # transformers 5 renames it lm_head when loading and back to embed_out when saving.
            "lm_head": ("embed_out.weight", lambda w: w.T, lambda params: params["lm_head"].T),
        }
    return {
        "embed": ("model.embed_tokens.weight", *same("embed")),
        "final_norm": ("model.norm.weight", *same("final_norm")),
        "lm_head": ("lm_head.weight", lambda w: w.T, lambda params: params["lm_head"].T),
    }


# ---------------------------------------------------------------------------------------------- import
def resolve_path(path_or_id: str, weights: bool = True) -> str:
    """A local folder as is; otherwise an HF hub id downloaded (safetensors, configs, tokenizer files only;
    without the safetensors when `weights` is False, as plan mode needs only shapes)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise CheckpointError(f"{path_or_id} is a file; pass the checkpoint folder that holds config.json")
    try:
        from huggingface_hub import snapshot_download
        patterns = ["*.json", "tokenizer*", "*.model", "*.txt"] + (["*.safetensors"] if weights else [])
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated...
        raise CheckpointError(f"{path_or_id!r} is not a local folder and could not be fetched from the hub: {e}") from e


def load_config(folder: str, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"missing config.json in {folder}")
    try:
        with open(path) as f:
            hf_config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); it is corrupt or truncated") from None
    if scalar_model_config(folder) is not None:
        # A ScalarModel reward model: its backbone has no LM head, and a reward model never unembeds, so the
        # backbone is read as tied (the embedding stands in for the head it does not have).
        hf_config = {**hf_config["base_config"], "tie_word_embeddings": True}
    return ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)


def _weight_renames(folder: str, cfg: ModelConfig) -> dict[str, str]:
    """Prefix renames that make a ScalarModel folder's backbone tensors read as the family's causal-LM names."""
    if scalar_model_config(folder) is None:
        return {}
    return {SCALAR_BACKBONE_PREFIX: "gpt_neox." if cfg.family == "gpt_neox" else "model."}


def check_folder(path_or_id: str, setting: str, weights: bool = True) -> None:
    """Everything about a model folder knowable before loading it, read from headers only: it exists (or is a
    hub id, not checked here), its config.json parses, its safetensors headers fit their files, it holds
    tokenizer files. `setting` names the config field in the message."""
    if not os.path.isdir(path_or_id):
        if os.path.exists(path_or_id) or os.path.isabs(path_or_id) or path_or_id.startswith(("./", "../", "~")):
            raise CheckpointError(f"{setting}={path_or_id!r} is not a folder; set it to an HF checkpoint folder "
                                  "(holding config.json) or a hub id")
        return  # a hub id: fetched (and checked) when loaded
    try:
        load_config(path_or_id)
        if weights:
            SafetensorsReader(path_or_id)
        if not any(os.path.exists(os.path.join(path_or_id, n)) for n in TOKENIZER_FILES):
            raise CheckpointError(f"no tokenizer files in {path_or_id}: expected one of {list(TOKENIZER_FILES)}")
    except CheckpointError as e:
        raise CheckpointError(f"{setting}: {e}") from None


def load_model(path_or_id: str, mesh: jax.sharding.Mesh | None = None, dtype: str = "float32",
               param_dtype: str = "float32", rules=None) -> tuple[ModelConfig, tfm.Params]:
    """Reads an HF checkpoint into our params, each tensor cast to `param_dtype` and placed in its sharded
    layout on `mesh` (a single-device mesh when None)."""
    folder = resolve_path(path_or_id)
    cfg = load_config(folder, dtype, param_dtype)
    reader = SafetensorsReader(folder, _weight_renames(folder, cfg))
    if mesh is None:
        mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    target_dtype = np.dtype(jax.numpy.dtype(param_dtype))
    expected = tfm.param_shapes(cfg)
    axes = tfm.param_logical_axes(cfg)
    shardings = shd.tree_shardings(mesh, axes, tfm.abstract_params(cfg), rules)
    layer_map, top_map = _hf_layer_map(cfg), _hf_top_map(cfg)

    @functools.lru_cache(maxsize=4)
    def hf_tensor(name: str, transform_key: str) -> np.ndarray:
        # One layer's tensor, transformed and cast; cached because every device holding a copy asks for it.
        return np.asarray(transforms[transform_key](reader.get(name))).astype(target_dtype)

    transforms: dict[str, Callable] = {}
    used: set[str] = set()

    def check_shape(name, ours):
        want = _hf_shape(ours, cfg)
        if reader.shape(name) != want:
            raise CheckpointError(f"shape mismatch for {name}: checkpoint has {reader.shape(name)}, "
                                  f"config.json implies {want}")

    def load_top(key):
        hf_name, fwd, _ = top_map[key]
        if key == "lm_head" and hf_name not in reader.names():
            raise CheckpointError(f"missing tensor {hf_name!r} (config.json says tie_word_embeddings=false)")
        transforms[key] = fwd
        if hf_name not in reader.names():
            raise CheckpointError(f"missing tensor {hf_name!r} in the checkpoint")
        shape = expected[key][0]
        check_shape(hf_name, key)
        used.add(hf_name)
        return jax.make_array_from_callback(shape, shardings[key], lambda idx: hf_tensor(hf_name, key)[idx])

    def load_layer(key):
        pattern, fwd, _ = layer_map[key]
        transforms["layers." + key] = fwd
        shape = expected["layers"][key][0]
        for i in range(cfg.num_layers):
            name = pattern.format(i=i)
            if name not in reader.names():
                raise CheckpointError(f"missing tensor {name!r} in the checkpoint")
            check_shape(name, "layers." + key)
            used.add(name)

        def callback(idx):
            layers = range(cfg.num_layers)[idx[0]]
            return np.stack([hf_tensor(pattern.format(i=i), "layers." + key)[idx[1:]] for i in layers])

        return jax.make_array_from_callback(shape, shardings["layers"][key], callback)

    params = {k: load_top(k) for k in expected if k != "layers"}
    params["layers"] = {k: load_layer(k) for k in expected["layers"]}
    unused = sorted(n for n in reader.names() - used if not n.endswith(_IGNORED_SUFFIXES)
                    and not n.startswith(SCALAR_HEAD)  # a ScalarModel's head: reward_model.load_value_head
                    and not (n == top_map["lm_head"][0] and cfg.tie_word_embeddings))
    if unused:
        log.warning("ignored %d checkpoint tensors not used by %s: %s", len(unused), cfg.family, unused[:8])
    return cfg, params


@functools.lru_cache(maxsize=None)
def _hf_shape(ours: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The HF shape of the tensor that holds our param `ours` ("embed", "layers.q", ...), for error messages: the
    ours -> HF transform applied to zero-stride uint8 stand-ins of our params (only a fused tensor is allocated)."""
    shapes = tfm.param_shapes(cfg)
    if ours.startswith("layers."):
        level = {k: shape[1:] for k, (shape, _) in shapes["layers"].items()}  # one layer: no leading layers axis
        mapping = _hf_layer_map(cfg)
    else:
        level = {k: entry[0] for k, entry in shapes.items() if k != "layers"}
        mapping = _hf_top_map(cfg)
    stand_ins = {k: np.lib.stride_tricks.as_strided(np.zeros((), np.uint8), shape, [0] * len(shape))
                 for k, shape in level.items()}
    return mapping[ours.removeprefix("layers.")][2](stand_ins).shape


def load_tokenizer(path_or_id: str):
    """The checkpoint's tokenizer through transformers' AutoTokenizer (no remote code)."""
    from transformers import AutoTokenizer
    folder = resolve_path(path_or_id)
    if not any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer files in {folder}: expected one of {list(TOKENIZER_FILES)} (copy the "
                              "tokenizer of the model there, e.g. tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"could not load a tokenizer from {folder}: {e}") from e


# ---------------------------------------------------------------------------------------------- export
def to_host(x: jax.Array) -> np.ndarray:
    """One parameter, whole, on the host (gathered from every process when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def to_hf_tensors(params: tfm.Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> {HF name: numpy array}, gathered to the host one HF tensor's params at a time."""
    top = {k: to_host(v) for k, v in params.items() if k != "layers"}
    out = {hf_name: np.ascontiguousarray(inv(top)) for key, (hf_name, _, inv) in _hf_top_map(cfg).items() if key in top}
    # Grouped by HF tensor: the params of ours that one HF tensor holds (GPT-NeoX's q, k, v) are gathered together.
    groups: dict[str, tuple[Callable, list[str]]] = {}
    for key, (pattern, _, inv) in _hf_layer_map(cfg).items():
        groups.setdefault(pattern, (inv, []))[1].append(key)
    for pattern, (inv, keys) in groups.items():
        stacked = {k: to_host(params["layers"][k]) for k in keys}
        for i in range(cfg.num_layers):
            out[pattern.format(i=i)] = np.ascontiguousarray(inv({k: w[i] for k, w in stacked.items()}))
    return out


def save_model(params: tfm.Params, cfg: ModelConfig, out_dir: str, tokenizer=None,
               max_shard_bytes: int = 4 * 2**30, extra_tensors: dict[str, np.ndarray] | None = None) -> None:
    """Writes config.json, safetensors (index-sharded above `max_shard_bytes`) and the tokenizer's files,
    a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads. Only process 0 writes."""
    tensors = to_hf_tensors(params, cfg)
    if extra_tensors:
        tensors.update(extra_tensors)
    if jax.process_index() != 0:
        return
    # Atomic: written to a temporary sibling, renamed into place once complete, so a kill never leaves a half
    # folder (an empty config.json) under the real name.
    final_dir, out_dir = out_dir.rstrip(os.sep), out_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for n, shard in enumerate(shards):
            fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), shard)
            weight_map.update({name: fname for name in shard})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                       "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    replace_folder(out_dir, final_dir)


def replace_folder(staged: str, final: str) -> None:
    """Renames the complete folder `staged` to `final`, replacing an earlier `final` (moved aside first: a folder
    rename is atomic, so `final` is at every moment either the old folder or the new one)."""
    if os.path.isdir(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)
