"""The reward model of canonical ("distilled") RLAIF: a backbone plus a scalar value head, trained on AI labels.

    r_n = value_head(final hidden state at the last position of row n)

Rows are the judge template rendered with (prompt, response) and LEFT-padded, exactly as the judge's rows
(`judging.encode_pairs` for training, `judging` in reward_model mode for scoring). Training fits the
Bradley-Terry model P(a > b) = sigmoid(r_a - r_b) to the pairwise judge's soft preferences
(`soft_bradley_terry_loss`; the training stage is rlaif_jax/reward_model_stage.py, `python -m
rlaif_jax.reward_model_stage`); `normalize_to_references` then optionally shifts it so a dataset's reference
responses score 0 on average.

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
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax import sharding as shd
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

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
    return head_values(rm_params, tfm.last_hidden(rm_params.model, cfg, tokens_nt, mask_nt, differentiable=True))


def head_values(rm_params: RewardModelParams, hidden_nd: jax.Array) -> jax.Array:
    """r_n of the backbone's final hidden states (N, D) at the rows' last positions (the judge's forward computes
    them in reward_model mode, `judging.scoring`)."""
    return tfm.apply_value_head(rm_params.value_head, hidden_nd[:, None, :])[:, 0]


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
    p_a_better (the pairwise judge's P(a better), a soft label) may be missing (`labelling.label_preferences`)."""
    records = data_lib.read_jsonl(path, {"prompt", "response_a", "response_b"}, "preference pairs")
    for i, r in records:
        p = r.get("p_a_better")
        if p is not None and not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{path}:{i}: p_a_better={p} is not a probability")
    return [r for _, r in records]


class PairLoader(data_lib.RowLoader):
    """`data.RowLoader` batches of preference pairs (this process's rows of each global batch, a restorable
    position); a batch is (PairBatch, valid_b)."""

    what = "preference pairs"

    def __init__(self, pairs: PairBatch, global_batch_size: int, **loader_settings):
        super().__init__(pairs.tokens_a.shape[0], global_batch_size, **loader_settings)
        self.pairs = pairs

    def _batch(self, rows: np.ndarray, valid: np.ndarray) -> tuple[PairBatch, np.ndarray]:
        return PairBatch(*(x[rows] for x in self.pairs)), valid


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


def ranking_accuracy(r_a: jax.Array, r_b: jax.Array, p_a_better: jax.Array) -> jax.Array:
    """Fraction of pairs (label ties p = 1/2 left out) where the reward model prefers the judge's choice; NaN when
    every pair is a tie. Jittable (the training step's metric) and on host arrays alike."""
    decided = p_a_better != 0.5
    agree = (r_a > r_b) == (p_a_better > 0.5)
    return jnp.sum(agree & decided) / jnp.sum(decided)


# ================================================================================================ normalisation
_reward_values_jit = jax.jit(reward_values, static_argnums=1)


def row_rewards(params: RewardModelParams, cfg: ModelConfig, tokens_nt: np.ndarray, mask_nt: np.ndarray,
                batch_size: int, sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
    """(N,) float32 rewards of the rows, in batches of `batch_size` (the last one padded with copies of a row, so
    every batch has one compiled shape). With `sharding` (a batch sharding of the mesh `params` live on), each
    batch is one global array over the mesh: every process passes its part of every batch (`data.to_global`) and
    every process gets all N rewards back."""
    n = tokens_nt.shape[0]
    if n == 0:
        raise ValueError("no rows to score")
    processes, process = jax.process_count(), jax.process_index()
    if sharding is not None and batch_size % processes:
        raise ValueError(f"a batch of {batch_size} rows cannot be split over {processes} processes")
    out = []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        if sharding is None:
            out.append(np.asarray(_reward_values_jit(params, cfg, jnp.asarray(tokens_nt[idx]),
                                                     jnp.asarray(mask_nt[idx]))))
            continue
        local = np.array_split(idx, processes)[process]  # this process's rows of the batch, in process order
        tokens, mask = data_lib.to_global((tokens_nt[local], mask_nt[local]), sharding)
        out.append(shd.gather_to_host(_reward_values_jit(params, cfg, tokens, mask)))
    return np.concatenate(out)[:n].astype(np.float32)


def evaluate_pairs(params: RewardModelParams, cfg: ModelConfig, pairs: PairBatch, batch_size: int,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[float, float]:
    """(soft Bradley-Terry loss, ranking accuracy) of the reward model on all of `pairs`, its rows scored in
    batches of `batch_size` (`row_rewards`, on the mesh of `sharding` when given)."""
    r_a = row_rewards(params, cfg, pairs.tokens_a, pairs.mask_a, batch_size, sharding)
    r_b = row_rewards(params, cfg, pairs.tokens_b, pairs.mask_b, batch_size, sharding)
    return (float(soft_bradley_terry_loss(r_a, r_b, pairs.p_a_better)),
            float(ranking_accuracy(r_a, r_b, pairs.p_a_better)))


def normalize_to_references(params: RewardModelParams, reference_rewards_n: np.ndarray
                            ) -> tuple[RewardModelParams, float]:
    """Shifts the reward model so that the rows (prompt + a dataset's reference response) whose rewards are
    `reference_rewards_n` (`row_rewards`) score 0 on average: mean = (1/N) sum_n r_n, then the value head's
    bias -= mean, so every reward moves by exactly -mean.

    The reproduction does this after training (summarize_from_feedback_details/reward.py: the mean predicted
    reward of the train split's query + reference_response becomes `config.bias`, which ScalarModel.forward
    subtracts); here it is folded into the head's bias, so the saved folder needs nothing new to read it.
    Returns (shifted params, mean)."""
    mean = float(np.mean(np.asarray(reference_rewards_n, np.float64)))
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
    can check it reads rows made the same way. Atomic: the folder is assembled under a temporary name and renamed
    into place once complete, so a kill never leaves a backbone without its head under `out_dir`."""
    final_dir = out_dir.rstrip(os.sep)
    staged = final_dir + ".partial"
    hf.save_model(params, cfg, staged, tokenizer=tokenizer)
    head = {f"value_head.{k}": hf.to_host(v).astype(np.float32) for k, v in value_head.items()}  # every process
    if jax.process_index() != 0:
        return
    hf.write_safetensors(os.path.join(staged, VALUE_HEAD_FILE), head)
    with open(os.path.join(staged, REWARD_MODEL_META_FILE), "w") as f:
        json.dump(read_settings(spec), f, indent=2)
    hf.replace_folder(staged, final_dir)


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
                                "`python -m rlaif_jax.reward_model_stage` or set config.judge.mode to an LLM-judge "
                                "mode")
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
