"""The reward model of canonical ("distilled") RLAIF: a backbone plus a scalar value head, trained on AI labels.

    r_n = value_head(final hidden state at the last position of row n)

Rows are the judge template rendered with (prompt, response) and LEFT-padded, exactly as the judge's rows
(`judging.encode_pairs` for training, `judging` in reward_model mode for scoring). Training fits the
Bradley-Terry model P(a > b) = sigmoid(r_a - r_b) to the pairwise judge's soft preferences (`train`);
`normalize_to_references` then optionally shifts it so a dataset's reference responses score 0 on average.

Files: a reward-model folder is the backbone as an HF checkpoint (`hf.save_model`) plus VALUE_HEAD_FILE and
REWARD_MODEL_META_FILE. The `ScalarModel` folders the summarize-from-feedback reproductions release (Huang et al.
2024: backbone under "lm_backbone.", "scalar_head", config.json with "base_config" and "bias") load as they are
(`hf.scalar_model_config`): their rows are unchecked, so the judge template must rebuild theirs (query and response
concatenated: template "{prompt}{response}", include_stop_token=True). Own folders hold
REWARD_MODEL_META_FILE (`read_settings`: every judge setting that changes what the reward model reads, as it was
trained; a judge that loads the folder with another value of any of them is refused, `check_read_settings`).

This module sits below `judging` (whose reward_model mode scores with it) and never imports it: the template's
`judging.JudgeSpec` is passed in where one is needed. Shapes: N rows, T row length, D hidden.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlaif_jax.data import read_jsonl
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"  # next to the backbone's model.safetensors in a reward-model folder
REWARD_MODEL_META_FILE = "reward_model.json"  # `read_settings` of the judge spec the reward model was trained with


# ================================================================================================ model
class RewardModelParams(NamedTuple):
    """A backbone plus a scalar value head (the judge's params in reward_model mode)."""
    model: Any
    value_head: Any


def reward_values(rm_params: RewardModelParams, cfg: ModelConfig, tokens_nt: jax.Array, mask_nt: jax.Array
                  ) -> jax.Array:
    """Reward model: r_n = value_head(final hidden state at the last position) (differentiable; training uses it)."""
    hidden = tfm.last_hidden(rm_params.model, cfg, tokens_nt, mask_nt)
    return tfm.apply_value_head(rm_params.value_head, hidden[:, None, :])[:, 0]


# ================================================================================================ data
class PairBatch(NamedTuple):
    """Preference pairs as reward-model rows."""
    tokens_a: np.ndarray  # (N, T) template rows of (prompt, response_a), left-padded
    mask_a: np.ndarray
    tokens_b: np.ndarray
    mask_b: np.ndarray
    p_a_better: np.ndarray  # (N,) float32


def read_preferences(path: str) -> list[dict[str, Any]]:
    """Reads and validates a preference JSONL, one pair per line:
        {"prompt": str, "response_a": str, "response_b": str, "p_a_better": float in [0, 1]}
    p_a_better (the pairwise judge's P(a better), a soft label) may be missing (`judging.label_preferences`)."""
    records = read_jsonl(path, {"prompt", "response_a", "response_b"}, "preference pairs")
    for i, r in records:
        p = r.get("p_a_better")
        if p is not None and not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{path}:{i}: p_a_better={p} is not a probability")
    return [r for _, r in records]


# ================================================================================================ loss
def soft_bradley_terry_loss(r_a: jax.Array, r_b: jax.Array, p_a_better: jax.Array) -> jax.Array:
    """mean_n -( p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a) ): cross-entropy between the judge's
    soft preference p and the Bradley-Terry model P(a > b) = sigmoid(r_a - r_b)."""
    d = r_a - r_b
    return -jnp.mean(p_a_better * jax.nn.log_sigmoid(d) + (1.0 - p_a_better) * jax.nn.log_sigmoid(-d))


def pair_rewards(rm_params: RewardModelParams, cfg: ModelConfig, batch: PairBatch) -> tuple[jax.Array, jax.Array]:
    """r_a, r_b from one forward over the 2N rows."""
    n = batch.tokens_a.shape[0]
    tokens = jnp.concatenate([batch.tokens_a, batch.tokens_b])
    mask = jnp.concatenate([batch.mask_a, batch.mask_b])
    r = reward_values(rm_params, cfg, tokens, mask)
    return r[:n], r[n:]


def ranking_accuracy(r_a: np.ndarray, r_b: np.ndarray, p_a_better: np.ndarray) -> float:
    """Fraction of pairs (label ties p = 1/2 left out) where the reward model prefers the judge's choice."""
    r_a, r_b, p = map(np.asarray, (r_a, r_b, p_a_better))
    decided = p != 0.5
    if not decided.any():
        return float("nan")
    return float(np.mean((r_a > r_b)[decided] == (p > 0.5)[decided]))


# ================================================================================================ training
class TrainResult(NamedTuple):
    params: RewardModelParams
    losses: list[float]  # per step
    eval_accuracy: float | None


def train(cfg: ModelConfig, backbone, data: PairBatch, *, steps: int = 200, batch_size: int = 16,
          learning_rate: float = 1e-4, weight_decay: float = 0.0, seed: int = 0, eval_data: PairBatch | None = None,
          log_every: int = 10) -> TrainResult:
    """Fine-tunes `backbone` + a fresh value head on the soft preferences with AdamW; returns the reward model
    (and its ranking accuracy on `eval_data`)."""
    key = jax.random.key(seed)
    key, head_key = jax.random.split(key)
    params = RewardModelParams(backbone, tfm.init_value_head(cfg, head_key))
    n = data.tokens_a.shape[0]
    if n < batch_size:
        raise ValueError(f"{n} preference pairs but batch_size={batch_size}; lower --batch_size")
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return soft_bradley_terry_loss(*pair_rewards(p, cfg, batch), batch.p_a_better)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.RandomState(seed)
    order, pos, losses = rng.permutation(n), 0, []
    for i in range(steps):
        if pos + batch_size > n:  # a new epoch: reshuffle, full batches only (one compiled shape)
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, opt_state, loss = step(params, opt_state, PairBatch(*(x[idx] for x in data)))
        losses.append(float(loss))
        if log_every and (i % log_every == 0 or i == steps - 1):
            log.info("step %d  loss %.4f", i, losses[-1])
    accuracy = None
    if eval_data is not None:
        accuracy = evaluate(params, cfg, eval_data, batch_size)
        log.info("held-out ranking accuracy %.3f on %d pairs", accuracy, eval_data.tokens_a.shape[0])
    return TrainResult(params, losses, accuracy)


def evaluate(params: RewardModelParams, cfg: ModelConfig, data: PairBatch, batch_size: int) -> float:
    """Ranking accuracy on `data`, in batches of `batch_size` pairs."""
    rewards = jax.jit(pair_rewards, static_argnums=1)
    r_a, r_b = [], []
    for start in range(0, data.tokens_a.shape[0], batch_size):
        ra, rb = rewards(params, cfg, PairBatch(*(x[start:start + batch_size] for x in data)))
        r_a.append(np.asarray(ra))
        r_b.append(np.asarray(rb))
    return ranking_accuracy(np.concatenate(r_a), np.concatenate(r_b), data.p_a_better)


# ================================================================================================ normalisation
_reward_values_jit = jax.jit(reward_values, static_argnums=1)


def row_rewards(params: RewardModelParams, cfg: ModelConfig, tokens_nt: np.ndarray, mask_nt: np.ndarray,
           batch_size: int) -> np.ndarray:
    """(N,) float32 rewards of the rows, in batches of `batch_size` (the last one padded with copies of a row, so
    every batch has one compiled shape)."""
    n = tokens_nt.shape[0]
    if n == 0:
        raise ValueError("no rows to score")
    out = []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        out.append(np.asarray(_reward_values_jit(params, cfg, jnp.asarray(tokens_nt[idx]), jnp.asarray(mask_nt[idx]))))
    return np.concatenate(out)[:n].astype(np.float32)


def normalize_to_references(params: RewardModelParams, cfg: ModelConfig, tokens_nt: np.ndarray,
                            mask_nt: np.ndarray, batch_size: int) -> tuple[RewardModelParams, float]:
    """Shifts the reward model so that the rows (prompt + a dataset's reference response) score 0 on average:
    mean = (1/N) sum_n r_n, then the value head's bias -= mean, so every reward moves by exactly -mean.

    The reproduction does this after training (summarize_from_feedback_details/reward.py: the mean predicted
    reward of the train split's query + reference_response becomes `config.bias`, which ScalarModel.forward
    subtracts); here it is folded into the head's bias, so the saved folder needs nothing new to read it.
    Returns (shifted params, mean)."""
    mean = float(np.mean(row_rewards(params, cfg, tokens_nt, mask_nt, batch_size).astype(np.float64)))
    head = dict(params.value_head)
    head["bias"] = (jnp.asarray(head["bias"], jnp.float32) - mean).astype(jnp.asarray(head["bias"]).dtype)
    return RewardModelParams(params.model, head), mean


# ================================================================================================ files
def read_settings(spec) -> dict[str, Any]:
    """Every setting of `spec` (a judging.JudgeSpec) that changes the rows a reward model reads, as
    REWARD_MODEL_META_FILE records them: the rendered template (its literal pieces and slots), the row length,
    the truncation rule and whether a response's stop token is part of the row."""
    return {"literal_texts": list(spec.literal_texts), "slots": list(spec.slots), "max_len": spec.max_len,
            "truncation": spec.truncation, "include_stop_token": spec.include_stop_token}


def _template_text(settings: dict[str, Any]) -> str:
    """The template that `read_settings`' literal pieces and slots render, written as config.judge.template."""
    pieces = [settings["literal_texts"][0]]
    for slot, literal in zip(settings["slots"], settings["literal_texts"][1:]):
        pieces += ["{" + slot + "}", literal]
    return "".join(pieces)


def check_read_settings(folder: str, spec) -> None:
    """Refuses to score with a judge spec whose `read_settings` differ from those the reward model in `folder`
    was trained with (REWARD_MODEL_META_FILE; a folder without one is not checked): one line naming the
    config.judge setting, its saved value, this run's value and what to set."""
    meta_path = os.path.join(folder, REWARD_MODEL_META_FILE)
    if not os.path.exists(meta_path):
        return
    with open(meta_path) as f:
        saved = json.load(f)
    now = read_settings(spec)
    for key, value in now.items():
        if saved.get(key) == value:
            continue
        if key in ("literal_texts", "slots"):
            field, trained, current = "template", _template_text(saved), _template_text(now)
            fix = ("set config.judge.template (with chat_template / answer_prefix / num_scores) so that it renders "
                   "the trained text")
        else:
            field, trained, current = key, saved.get(key), value
            fix = f"set --config.judge.{field}={trained}"
        raise ValueError(f"the reward model in {folder} was trained with config.judge.{field}={trained!r} "
                         f"({meta_path}), this run has {current!r}: it would read other rows than it was trained "
                         f"on; {fix}, or train a reward model with this setting")


def save_reward_model(out_dir: str, cfg: ModelConfig, params, value_head, tokenizer, spec) -> None:
    """Backbone via hf.save_model, the value head next to it (VALUE_HEAD_FILE), and the settings of `spec` (its
    judging.JudgeSpec) that change what it reads (REWARD_MODEL_META_FILE, `read_settings`), so reward_model mode
    can check it reads rows made the same way."""
    hf.save_model(params, cfg, out_dir, tokenizer=tokenizer)
    if jax.process_index() != 0:
        return
    hf.write_safetensors(os.path.join(out_dir, VALUE_HEAD_FILE), {
        f"value_head.{k}": np.asarray(jax.device_get(v), np.float32) for k, v in value_head.items()})
    with open(os.path.join(out_dir, REWARD_MODEL_META_FILE), "w") as f:
        json.dump(read_settings(spec), f, indent=2)


def load_value_head(folder: str, cfg: ModelConfig) -> dict[str, jax.Array]:
    """The value head {kernel (D,), bias ()} of a reward-model folder (also a critic's initialisation)."""
    from safetensors.numpy import load_file
    scalar = hf.scalar_model_config(folder)
    if scalar is not None:  # a ScalarModel of the summarize-from-feedback reproductions: the head is in its weights
        reader = hf.SafetensorsReader(folder)
        weight, bias = (reader.get(hf.SCALAR_HEAD + n) for n in ("weight", "bias"))
        if weight.shape != (1, cfg.hidden_size) or bias.shape != (1,):
            raise ValueError(f"{folder}: expected scalar_head.weight (1, {cfg.hidden_size}) and scalar_head.bias "
                             f"(1,), got {weight.shape} and {bias.shape}")
        # Its forward subtracts config.bias (the reference responses' mean reward, reward.py) after the head.
        return {"kernel": jnp.asarray(weight[0], cfg.param_dtype),
                "bias": jnp.asarray(bias[0] - scalar["bias"], cfg.param_dtype)}
    path = os.path.join(folder, VALUE_HEAD_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reward_model mode: no {VALUE_HEAD_FILE} in {folder}; train one with "
                                f"scripts/train_reward_model.py or set config.judge.mode to an LLM-judge mode")
    tensors = load_file(path)
    head = {k.split(".", 1)[1]: jnp.asarray(v, cfg.param_dtype) for k, v in tensors.items()}
    if set(head) != {"kernel", "bias"} or head["kernel"].shape != (cfg.hidden_size,):
        raise ValueError(f"{path}: expected value_head.kernel ({cfg.hidden_size},) and value_head.bias (), "
                         f"got { {k: v.shape for k, v in head.items()} }")
    return head


def load_reward_model(folder: str, cfg: ModelConfig, backbone, spec, mesh: jax.sharding.Mesh | None = None
                      ) -> RewardModelParams:
    """The loaded `backbone` with the folder's value head (replicated on `mesh`), after checking that `spec` (the
    judging.JudgeSpec it will score with) makes rows the way the ones it was trained on were made."""
    check_read_settings(folder, spec)
    head = load_value_head(folder, cfg)
    if mesh is not None:  # tiny: replicated on the judge's mesh, next to the sharded backbone
        head = jax.device_put(head, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return RewardModelParams(backbone, head)
