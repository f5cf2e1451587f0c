"""Train a reward model on the judge's pairwise preferences (canonical, "distilled" RLAIF).

Input: a JSONL file of AI-labelled preferences over policy samples, one pair per line:
    {"prompt": str, "response_a": str, "response_b": str, "p_a_better": float in [0, 1]}
`p_a_better` is the pairwise judge's debiased P(a better) (a soft label). Lines without it are labelled here by
the pairwise LLM judge given with --label_judge.path (`judging.score_texts`), so the same judge can drive direct
RLAIF (config.judge.mode=pairwise/pointwise) and this reward model (config.judge.mode=reward_model) on one run.

The reward model is an HF checkpoint (--model) plus a scalar value head on the final hidden state at the last
position of the judge-template row (`judging.reward_values`). Loss: Bradley-Terry with soft targets. Output: a
folder that `judging.load_judge` reads in reward_model mode (backbone safetensors + judging.VALUE_HEAD_FILE +
judging.REWARD_MODEL_META_FILE recording the template).

    python scripts/train_reward_model.py --model PATH --data prefs.jsonl --eval_data held.jsonl --out OUT \\
        [--rm.template='Prompt : {prompt}\\nResponse : {response}' --rm.max_len=512] \\
        [--label_judge.path=JUDGE]   # only when some lines lack p_a_better
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlaif_jax import judging
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm

log = logging.getLogger("train_reward_model")


# ---------------------------------------------------------------------------------------------- data
def read_preferences(path: str) -> list[dict[str, Any]]:
    """Reads and validates the preference JSONL; p_a_better may be missing (labelled later)."""
    from rlaif_jax.data import read_jsonl
    records = read_jsonl(path, {"prompt", "response_a", "response_b"}, "preference pairs")
    for i, r in records:
        p = r.get("p_a_better")
        if p is not None and not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{path}:{i}: p_a_better={p} is not a probability")
    return [r for _, r in records]


def label_preferences(records: list[dict[str, Any]], judge: judging.Judge, batch_size: int, seed: int
                      ) -> list[dict[str, Any]]:
    """Fills missing p_a_better with the pairwise judge's P(a better) (both orders averaged)."""
    if judge.spec.mode != "pairwise":
        raise ValueError(f"labelling needs a pairwise judge, got mode {judge.spec.mode!r}")
    todo = [i for i, r in enumerate(records) if r.get("p_a_better") is None]
    rng = jax.random.key(seed)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        rng, key = jax.random.split(rng)
        p, _ = judging.score_texts(judge.params, judge.cfg, judge.spec, judge.tokenizer,
                                   [records[i]["prompt"] for i in idx], [records[i]["response_a"] for i in idx], key,
                                   responses_b=[records[i]["response_b"] for i in idx])
        for i, pi in zip(idx, np.asarray(p)):
            records[i] = dict(records[i], p_a_better=float(pi))
    return records


class PairBatch(NamedTuple):
    tokens_a: np.ndarray  # (N, T) judge-template rows of (prompt, response_a), left-padded
    mask_a: np.ndarray
    tokens_b: np.ndarray
    mask_b: np.ndarray
    p_a_better: np.ndarray  # (N,) float32


def encode_pairs(spec: judging.JudgeSpec, tok, records: Sequence[dict[str, Any]]) -> PairBatch:
    """Both responses of every pair rendered with the reward model's template (the host rendering of judging)."""
    prompts = [r["prompt"] for r in records]
    tokens_a, mask_a, _ = judging.encode_texts(spec, tok, {"prompt": prompts,
                                                           "response": [r["response_a"] for r in records]})
    tokens_b, mask_b, _ = judging.encode_texts(spec, tok, {"prompt": prompts,
                                                           "response": [r["response_b"] for r in records]})
    return PairBatch(tokens_a, mask_a, tokens_b, mask_b, np.asarray([r["p_a_better"] for r in records], np.float32))


# ---------------------------------------------------------------------------------------------- loss
def soft_bradley_terry_loss(r_a: jax.Array, r_b: jax.Array, p_a_better: jax.Array) -> jax.Array:
    """mean_n -( p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a) ): cross-entropy between the judge's
    soft preference p and the Bradley-Terry model P(a > b) = sigmoid(r_a - r_b)."""
    d = r_a - r_b
    return -jnp.mean(p_a_better * jax.nn.log_sigmoid(d) + (1.0 - p_a_better) * jax.nn.log_sigmoid(-d))


def pair_rewards(rm_params: judging.RewardModelParams, cfg, batch: PairBatch) -> tuple[jax.Array, jax.Array]:
    """r_a, r_b from one forward over the 2N rows."""
    n = batch.tokens_a.shape[0]
    tokens = jnp.concatenate([batch.tokens_a, batch.tokens_b])
    mask = jnp.concatenate([batch.mask_a, batch.mask_b])
    r = judging.reward_values(rm_params, cfg, tokens, mask)
    return r[:n], r[n:]


def ranking_accuracy(r_a: np.ndarray, r_b: np.ndarray, p_a_better: np.ndarray) -> float:
    """Fraction of pairs (label ties p = 1/2 left out) where the reward model prefers the judge's choice."""
    r_a, r_b, p = map(np.asarray, (r_a, r_b, p_a_better))
    decided = p != 0.5
    if not decided.any():
        return float("nan")
    return float(np.mean((r_a > r_b)[decided] == (p > 0.5)[decided]))


# ---------------------------------------------------------------------------------------------- training
class TrainResult(NamedTuple):
    cfg: Any
    params: judging.RewardModelParams
    losses: list[float]  # per step
    eval_accuracy: float | None


def train(model_path: str, records: list[dict[str, Any]], rm_config, steps: int = 200, batch_size: int = 16,
          learning_rate: float = 1e-4, weight_decay: float = 0.0, seed: int = 0,
          eval_records: list[dict[str, Any]] | None = None, log_every: int = 10) -> TrainResult:
    """Fine-tunes backbone + value head on the soft preferences with AdamW; returns the trained reward model."""
    cfg, backbone = hf.load_model(model_path, dtype=rm_config.dtype, param_dtype=rm_config.param_dtype)
    tok = hf.load_tokenizer(model_path)
    spec = judging.make_spec(rm_config, tok)
    key = jax.random.key(seed)
    key, head_key = jax.random.split(key)
    params = judging.RewardModelParams(backbone, tfm.init_value_head(cfg, head_key))
    data = encode_pairs(spec, tok, records)
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
    if eval_records:
        accuracy = evaluate(params, cfg, spec, tok, eval_records, batch_size)
        log.info("held-out ranking accuracy %.3f on %d pairs", accuracy, len(eval_records))
    return TrainResult(cfg, params, losses, accuracy)


def evaluate(params: judging.RewardModelParams, cfg, spec: judging.JudgeSpec, tok, records, batch_size: int) -> float:
    data = encode_pairs(spec, tok, records)
    rewards = jax.jit(pair_rewards, static_argnums=1)
    r_a, r_b = [], []
    for start in range(0, data.tokens_a.shape[0], batch_size):
        ra, rb = rewards(params, cfg, PairBatch(*(x[start:start + batch_size] for x in data)))
        r_a.append(np.asarray(ra))
        r_b.append(np.asarray(rb))
    return ranking_accuracy(np.concatenate(r_a), np.concatenate(r_b), data.p_a_better)


def reward_model_config(**overrides):
    """config.judge for a reward model (mode reward_model, its default template) with overrides."""
    c = judging.default_config()
    c.mode = "reward_model"
    c.update(overrides)
    return c


# ---------------------------------------------------------------------------------------------- CLI
def main(argv):
    from absl import flags
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    records = read_preferences(F.data)
    eval_records = read_preferences(F.eval_data) if F.eval_data else None
    unlabelled = [r for r in records + (eval_records or []) if r.get("p_a_better") is None]
    if unlabelled:
        if not F.label_judge.path:
            raise SystemExit(f"{len(unlabelled)} pairs lack p_a_better; pass --label_judge.path=JUDGE to label them")
        judge = judging.load_judge(F.label_judge)
        records = label_preferences(records, judge, F.batch_size, F.seed)
        if eval_records:
            eval_records = label_preferences(eval_records, judge, F.batch_size, F.seed + 1)
    rm_config = F.rm
    rm_config.mode = "reward_model"
    result = train(F.model, records, rm_config, steps=F.steps, batch_size=F.batch_size, learning_rate=F.lr,
                   weight_decay=F.weight_decay, seed=F.seed, eval_records=eval_records)
    tok = hf.load_tokenizer(F.model)
    judging.save_reward_model(F.out, result.cfg, result.params.model, result.params.value_head, tok,
                              judging.make_spec(rm_config, tok))
    log.info("saved the reward model to %s (use config.judge.mode=reward_model, config.judge.path=%s)", F.out, F.out)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("model", None, "HF checkpoint folder (or hub id) of the reward model's backbone", required=True)
    flags.DEFINE_string("data", None, "preference JSONL (prompt, response_a, response_b, p_a_better)", required=True)
    flags.DEFINE_string("eval_data", "", "held-out preference JSONL for ranking accuracy")
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_integer("steps", 200, "optimizer steps")
    flags.DEFINE_integer("batch_size", 16, "pairs per step")
    flags.DEFINE_float("lr", 1e-4, "AdamW learning rate")
    flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay")
    flags.DEFINE_integer("seed", 0, "seed (value-head init, data order, labelling)")
    config_flags.DEFINE_config_dict("rm", reward_model_config(), "template settings of the reward model")
    label_judge_config = judging.default_config()
    label_judge_config.mode = "pairwise"
    config_flags.DEFINE_config_dict("label_judge", label_judge_config,
                                    "pairwise LLM judge that labels the pairs that lack p_a_better")
    app.run(main)
