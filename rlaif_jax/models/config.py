"""ModelConfig: the architecture of one decoder-only transformer, read from / written to an HF config.json.

Families differ in a handful of switches, all named here:
  llama    RMSNorm w, SwiGLU, RoPE (optionally Llama-3 frequency scaling), GQA, untied or tied head
  mistral  = llama (its sliding window is recorded; it only matters beyond the window length)
  qwen2    + bias on the q, k, v projections
  qwen3    + RMSNorm on q and k per head (before RoPE)
  gemma    (1 + w) RMSNorm, GeGLU (tanh gelu), embeddings scaled by sqrt(hidden), tied head
  gpt_neox LayerNorm with bias, plain (not gated) gelu MLP, RoPE on the first `rotary_dim` dims of each head
           only, biases on every projection, parallel residual (x + attn(ln1(x)) + mlp(ln2(x))) or sequential,
           no GQA; untied head by default (Pythia)
"""
from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox")
# HF hidden_act -> our activation name; each is checked against transformers' ACT2FN in tests/test_models.py.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
ACTIVATION_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
# Compute settings (config.compute): remat policies as MaxText names them (transformer.REMAT_POLICIES) and the
# attention implementations of the no-cache forward (transformer.attention).
REMAT_CHOICES = ("none", "full", "dots", "minimal", "everything")
ATTENTION_CHOICES = ("xla", "chunked", "cudnn", "splash", "fused")  # models/fused_attention.py
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the compute / storage dtypes a config may name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # RoPE scaling as a sorted tuple of (key, value) pairs so the config stays hashable (a jit static arg);
    # None or a rope_type of "default" means plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    # RoPE on the first int(head_dim * partial_rotary_factor) dims of each head (gpt_neox; HF's own formula).
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-6  # of the RMSNorms, or of the LayerNorms when layer_norm
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2; llama/mistral/gpt_neox configs with attention_bias=True also set o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3
    norm_plus_one: bool = False  # gemma: x * (1 + w)
    scale_embeddings: bool = False  # gemma: embeddings * sqrt(hidden)
    layer_norm: bool = False  # gpt_neox: LayerNorm (mean-centred, with bias) in place of RMSNorm
    gated_mlp: bool = True  # down(act(gate) * up); gpt_neox: down(act(up)), no gate
    parallel_residual: bool = False  # gpt_neox use_parallel_residual: attention and MLP both read the block input
    activation: str = "silu"  # a value of HF_ACTIVATIONS
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Layers unrolled per iteration of the forward's lax.scan (jax.lax.scan's `unroll`; not an HF field). 1 keeps
    # compile time flat in depth; unrolling all layers speeds XLA:CPU's backward on small models.
    scan_unroll: int = 1
    # How the no-cache forward is computed (config.compute; none is an HF field, each changes memory and speed,
    # the results only by float rounding): see transformer.REMAT_POLICIES and transformer.attention.
    remat: str = "none"  # rematerialisation of each layer of the forward's lax.scan in the backward pass
    attention: str = "xla"  # "xla": (B, H, T, S) scores at once | "chunked": key blocks, online softmax | kernels
    attention_chunk: int = 512  # keys per block of "chunked" attention (and queries and keys of "splash"'s)
    logprob_chunk: int = 0  # response positions per block of train_step.response_logprobs' LM head; 0 = all
    forward_microbatches: int = 1  # rows of a frozen forward in this many micro-batches (transformer.map_microbatches)

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.activation not in ACTIVATION_TO_HF:
            raise ValueError(f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATION_TO_HF)}")
        if self.remat not in REMAT_CHOICES or self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"remat={self.remat!r}, attention={self.attention!r}; choose remat from {REMAT_CHOICES} "
                             f"and attention from {ATTENTION_CHOICES}")
        if self.remat != "none" and self.num_layers // max(self.scan_unroll, 1) < 2:
            # Measured (tests/test_models.py): XLA inlines a loop that runs once and then merges the recomputed
            # layers with the forward's, so the backward keeps everything (or more) and remat saves nothing.
            fix = (f"use scan_unroll <= {self.num_layers // 2} or remat='none'" if self.num_layers >= 2 else
                   "use remat='none' for a 1-layer model")
            raise ValueError(f"remat={self.remat!r} needs the layer scan to loop at least twice: num_layers="
                             f"{self.num_layers} with scan_unroll={self.scan_unroll} loops once, and XLA then merges "
                             f"the recomputation with the forward (no memory saved); {fix}")
        if self.forward_microbatches < 1:
            raise ValueError(f"forward_microbatches={self.forward_microbatches} must be >= 1 (1 = all rows at once)")
        if self.attention_chunk < 1 or self.logprob_chunk < 0:
            raise ValueError(f"attention_chunk={self.attention_chunk} must be >= 1 and logprob_chunk="
                             f"{self.logprob_chunk} >= 0 (0 = no chunking)")
        if self.rotary_dim % 2:
            raise ValueError(f"RoPE on an odd number of dims ({self.rotary_dim} = int(head_dim {self.head_dim} * "
                             f"partial_rotary_factor {self.partial_rotary_factor})) is not supported")
        # The switches each family's HF code has (what to_hf and the name mapping can write).
        if self.family == "gpt_neox":
            if (not self.layer_norm or self.gated_mlp or not self.mlp_bias or self.num_kv_heads != self.num_heads
                    or self.num_heads * self.head_dim != self.hidden_size):
                raise ValueError("gpt_neox has layer_norm, gated_mlp=False, mlp_bias and no GQA (num_kv_heads = "
                                 "num_heads, num_heads * head_dim = hidden_size)")
        elif self.layer_norm or not self.gated_mlp or self.parallel_residual or self.partial_rotary_factor != 1.0:
            raise ValueError(f"layer_norm, gated_mlp=False, parallel_residual and partial_rotary_factor are gpt_neox "
                             f"settings; {self.family} has none of them")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    # ------------------------------------------------------------------ HF config.json <-> ModelConfig
    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str = "float32", param_dtype: str = "float32") -> "ModelConfig":
        """From an HF config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        family = hf.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            arch = hf.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={family!r} (architectures={arch}); "
                f"rlaif_jax supports model_type in {list(SUPPORTED_FAMILIES)}"
            )
        neox = family == "gpt_neox"
        rope = dict(hf.get("rope_parameters") or {})
        # transformers 4.x GPT-NeoX configs (Pythia's) name RoPE's base and fraction rotary_emb_base / rotary_pct.
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        partial_rotary_factor = rope.pop("partial_rotary_factor", hf.get("rotary_pct", 0.25)) if neox else 1.0
        legacy = hf.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3, linear)")
        rope_scaling = None if rope_type == "default" else tuple(sorted(rope.items()))
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = bool(hf.get("attention_bias", neox))  # GPTNeoXConfig's default is True
        hf_act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if family == "gemma" and hf_act == "gelu":
            hf_act = "gelu_pytorch_tanh"  # as GemmaConfig does: Gemma's legacy "gelu" means the tanh approximation
        if hf_act not in HF_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {hf_act!r} (supported: {', '.join(HF_ACTIVATIONS)})")
        sliding = hf.get("sliding_window")
        if family == "qwen2" or family == "qwen3":
            sliding = sliding if hf.get("use_sliding_window") else None
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_heads if neox else hf.get("num_key_value_heads") or num_heads,  # GPT-NeoX: no GQA
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            partial_rotary_factor=float(partial_rotary_factor),
            norm_eps=hf.get("layer_norm_eps", 1e-5) if neox else hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma")),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family in ("llama", "mistral", "gpt_neox") and attention_bias,
            mlp_bias=neox or bool(hf.get("mlp_bias", False)),  # GPT-NeoX's MLP Linears always have biases
            qk_norm=family == "qwen3",
            norm_plus_one=family == "gemma",
            scale_embeddings=family == "gemma",
            layer_norm=neox,
            gated_mlp=not neox,
            parallel_residual=neox and bool(hf.get("use_parallel_residual", True)),
            activation=HF_ACTIVATIONS[hf_act],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict that transformers' AutoConfig / AutoModelForCausalLM load."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}[self.family]
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(dict(self.rope_scaling))
        eos = list(self.eos_token_ids)
        out = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": ACTIVATION_TO_HF[self.activation],
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }
        if self.family == "gpt_neox":
            rope_parameters["partial_rotary_factor"] = self.partial_rotary_factor
            out.update(layer_norm_eps=self.norm_eps, use_parallel_residual=self.parallel_residual,
                       attention_bias=self.qkv_bias,
                       # transformers 4.x (Pythia's era) reads RoPE's settings only from these two.
                       rotary_pct=self.partial_rotary_factor, rotary_emb_base=self.rope_theta)
            return out
        out.update(num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.norm_eps)
        if self.family in ("llama", "mistral"):
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.family == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        if self.family == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.family == "gemma":
            out["hidden_activation"] = "gelu_pytorch_tanh"
        return out
