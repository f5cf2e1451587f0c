"""Tiny models and a tokenizer for train-step and training-program tests, written to disk as HF folders.

The judge is constructed by hand so that its behaviour is known exactly: it scores a response by how often
the word TARGET appears in its input. Embeddings put TARGET on hidden unit 0 and every other word on unit 1;
the attention has zero queries and keys, so every position attends uniformly to the real tokens, and head 0
copies units 0 and 1; the MLP is zero. The final hidden state's unit 0 therefore grows with the fraction of
TARGET tokens, and the LM head turns it into the logit of the score "5" (the other score tokens sit at 0, the
rest of the vocabulary far below). Pointwise score = rescaled E[k] rises monotonically with TARGET's count.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from rlaif_jax import data as data_lib
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

SPECIALS = ["<pad>", "<bos>", "<eos>"]
TEMPLATE_WORDS = ["Q", "R", "S", ":", "1", "2", "3", "4", "5"]
CONTENT = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
WORDS = SPECIALS + TEMPLATE_WORDS + CONTENT
TARGET = "a"
TEMPLATE = "Q : {prompt} R : {response} S :"
PAD, BOS, EOS = 0, 1, 2


def left_padded_batch(lengths, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token rows (ids >= 3, clear of pad / bos / eos), row i holding lengths[i] real tokens at its end:
    (tokens (N, length) int32 with 0 at padding, mask (N, length) int32)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, size=(len(lengths), length))
    return data_lib.left_pad([row[length - n:] for row, n in zip(tokens, lengths)], length)


def save_random_hf_model(config, folder: str, noise: float):
    """A transformers model of `config` (seeded), every weight perturbed by `noise` * N(0, 1) so norms and biases
    are off their trivial init, saved with save_pretrained; returned in eval mode (eager attention)."""
    import torch
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens, mask) -> np.ndarray:
    """HF logits of a left-padded batch, with the padding-aware positions our model uses (float64)."""
    import torch
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.double().numpy()


def make_tokenizer(words=WORDS) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words` (the first three: pad, bos, eos)."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


def model_config(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=BOS, eos_token_ids=(EOS,), pad_token_id=PAD,
                tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def write_policy(folder: str, seed: int = 0) -> str:
    """A random tiny Llama policy; its initial logits favour no word in particular."""
    import jax
    cfg = model_config()
    params = tfm.init_params(cfg, jax.random.key(seed))
    # Larger random embeddings than the default init, so sampling is diverse but not uniform.
    params["embed"] = params["embed"] * 5.0
    hf.save_model(params, cfg, folder, tokenizer=make_tokenizer())
    return folder


def write_counting_judge(folder: str, strength: float = 4.0) -> str:
    """The hand-built judge described in the module docstring."""
    cfg = model_config(num_layers=1)
    V, D, H, K, E, F = cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, \
        cfg.intermediate_size
    target = WORDS.index(TARGET)
    embed = np.zeros((V, D), np.float32)
    embed[:, 1] = 1.0
    embed[target] = 0.0
    embed[target, 0] = 1.0
    v = np.zeros((1, D, K, E), np.float32)
    v[0, 0, 0, 0] = v[0, 1, 0, 1] = 1.0
    o = np.zeros((1, H, E, D), np.float32)
    o[0, 0, 0, 0] = o[0, 0, 1, 1] = 1.0
    lm_head = np.zeros((D, V), np.float32)
    lm_head[0, WORDS.index("5")] = strength
    lm_head[1, :] = -4.0  # unit 1 is always large and positive: pushes every word far below the scores
    for s in "12345":
        lm_head[1, WORDS.index(s)] = 0.0
    zeros = lambda *s: np.zeros((1,) + s, np.float32)  # noqa: E731
    params = {
        "embed": embed,
        "layers": {"attn_norm": np.ones((1, D), np.float32), "q": zeros(D, H, E), "k": zeros(D, K, E), "v": v, "o": o,
                   "mlp_norm": np.ones((1, D), np.float32), "gate": zeros(D, F), "up": zeros(D, F),
                   "down": zeros(F, D)},
        "final_norm": np.ones((D,), np.float32),
        "lm_head": lm_head,
    }
    hf.save_model(jax_tree(params), cfg, folder, tokenizer=make_tokenizer())
    return folder


def write_opinionated_judge(folder: str, seed: int = 7, head_scale: float = 20.0) -> str:
    """A random tiny Llama with its attention, MLP and LM head scaled up (x6, x6, x head_scale): at the default init
    the last position's answer hardly depends on the texts, scaled its P("1") / P("2") moves with them and their
    order (the independent evaluator's and the labeller's tests)."""
    import jax
    cfg = model_config()
    params = tfm.init_params(cfg, jax.random.key(seed))
    params["embed"], params["lm_head"] = params["embed"] * 5.0, params["lm_head"] * head_scale
    params["layers"] = {k: v * 6.0 if k in ("q", "k", "v", "o", "gate", "up", "down") else v
                        for k, v in params["layers"].items()}
    hf.save_model(params, cfg, folder, tokenizer=make_tokenizer())
    return folder


def write_judge_with_other_tokenizer(folder: str) -> str:
    """The counting judge with one extra, never used word in its tokenizer's vocabulary: a tokenizer that differs
    from the policy's (so the run takes the host judge path) yet encodes every text of this world to the same ids."""
    return add_unused_word(write_counting_judge(folder))


def add_unused_word(folder: str) -> str:
    """Adds one never used word to a saved model's tokenizer vocabulary (see write_judge_with_other_tokenizer)."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    vocab["zz"] = len(vocab)
    with open(path, "w") as f:
        json.dump(tok, f)
    return folder


def jax_tree(tree):
    import jax
    return jax.tree.map(jnp.asarray, tree)


def write_prompts(path: str, n: int = 64, seed: int = 0) -> str:
    """A JSONL prompt file of short random content-word prompts."""
    import json
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.choice(CONTENT[1:], size=rng.integers(2, 5))
            f.write(json.dumps({"prompt": " ".join(words)}) + "\n")
    return path


def make_world(root: str) -> dict[str, str]:
    """Policy, judge and prompt files under `root` (created once per test session)."""
    os.makedirs(root, exist_ok=True)
    return {"policy": write_policy(os.path.join(root, "policy")),
            "judge": write_counting_judge(os.path.join(root, "judge")),
            "prompts": write_prompts(os.path.join(root, "prompts.jsonl"))}


# Llama 3.1's sizes (the published config.json files), for plan mode: hidden, MLP, layers, attention heads.
LLAMA_3_1_SIZES = {"8B": (4096, 14336, 32, 32), "70B": (8192, 28672, 80, 64)}


def write_llama_3_1_shapes(folder: str, size: str) -> str:
    """A shape-only Llama 3.1 checkpoint (config.json as published: vocab 128256, 8 KV heads, llama3 RoPE scaling;
    no weights) with a word-level tokenizer that writes "1".."10" as single tokens and has a chat template: all
    that plan mode reads, for the 8B / 70B recipe plans of issue 17."""
    hidden, mlp, layers, heads = LLAMA_3_1_SIZES[size]
    os.makedirs(folder, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=hidden,
                  intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                  head_dim=128, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192),
                  max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  torch_dtype="bfloat16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tok = make_tokenizer(SPECIALS + TEMPLATE_WORDS + ["6", "7", "8", "9", "10"] + CONTENT)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(folder)
    return folder
