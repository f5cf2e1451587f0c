"""Builds the testbed's tokenizer, SFT policy, judge (HF checkpoints) and prompt file, deterministically, cached.

    from rlaif_jax.testbed import build
    art = build.build(build.default_config())      # or build.fast_config() for tests
    art.policy_dir, art.judge_dir                  # HF folders: hf.load_model / AutoModelForCausalLM load them
    build.locate(build.default_config())           # the same folders, known without building

experiments/testbed.py names the folders of `locate` and sets `config.testbed.build`; the training program (and
the demo) then call `ensure_built(config)` before loading anything, so a config stays a pure description.

Both models are tiny Llama-family transformers trained here with optax on rlaif_jax.models.transformer.forward:
  policy  next-token cross-entropy on the response tokens (and <eos>) of noisy SFT demonstrations;
  judge   next-token cross-entropy on the answer token of noisily labelled judge questions (data.judge_batch):
          rubric Yes / No, pointwise score, and which of two responses is better (pairwise A / B).
Everything is seeded (numpy data stream, jax init), so a config always gives the same checkpoints.

Cache: <cache_dir>/<key>/ where key hashes the config and the source of the world, grader, data and build
modules. A build is written into a temporary sibling folder, finished with a COMPLETE marker, then renamed
into place, so an interrupted build is never mistaken for a finished one and the next call reuses a finished one.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from rlaif_jax import data as data_lib
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig
from rlaif_jax.testbed import data, grader, task, tokenizer, world

COMPLETE_MARKER = "COMPLETE"
BUILD_INFO = "build_info.json"


def _model_config_dict(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int
                       ) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                          num_kv_heads=kv_heads, intermediate_size=intermediate))


def _train_config_dict(steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        warmup_steps=max(steps // 20, 1),  # then cosine decay to 10% of the peak
        weight_decay=0.01, clip_norm=1.0))


def default_config() -> ml_collections.ConfigDict:
    """The full build (the demo's): about 2-3 minutes on 2 busy CPU cores."""
    c = ml_collections.ConfigDict()
    c.seed = 1  # the build seed: the judge's blind spots depend on it (README, "What the demo shows")
    c.cache_dir = ""  # "" = $RLAIF_JAX_CACHE/testbed or ~/.cache/rlaif_jax/testbed
    c.data = data.default_config()
    # Tiny Llama-family models (head_dim = hidden / heads).
    c.policy = _model_config_dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    c.judge = _model_config_dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    c.sft = _train_config_dict(steps=600, batch_size=64, learning_rate=3e-3)
    # Many small steps: the judge's skills (comparing topics, checking the asked adjective) appear suddenly
    # after enough updates, so updates count more than examples per update.
    # 3000 steps: the pairwise question takes a quarter of the mixed steps, so the other questions get as many
    # examples as with 2400 steps before it was added.
    c.judge_train = _train_config_dict(steps=3000, batch_size=32, learning_rate=3e-3)
    c.judge_train.relevance_only_steps = 800  # curriculum: see judge_curriculum_batch
    c.eval_examples = 1024  # fresh clean-labelled judge questions to measure the judge's agreement with
    return c


def fast_config() -> ml_collections.ConfigDict:
    """A small, quick build for tests (about a minute on 2 busy CPU cores): same models, fewer steps."""
    c = default_config()
    c.sft.steps = 250
    c.sft.warmup_steps = 12
    c.judge_train.steps = 500  # 400 before the pairwise question took a quarter of the examples
    c.judge_train.batch_size = 64
    c.judge_train.warmup_steps = 20
    # Too few steps for the relevance curriculum to pay off: train all questions equally from the start.
    c.judge_train.relevance_only_steps = 0
    c.data.judge_question_probs = (0.1875, 0.1875, 0.1875, 0.1875, 0.25)
    c.eval_examples = 256
    return c


class Artifacts(NamedTuple):
    """Where a build lives (`locate`); `info` reads what a finished one measured (build_info.json)."""
    root: str
    tokenizer_dir: str
    policy_dir: str
    judge_dir: str
    prompts_file: str  # the train split's instructions as JSONL {"prompt": text} (the run's config.data.path)
    validation_prompts_file: str  # the validation split's: where stopping points and settings are chosen
    test_prompts_file: str  # the test split's: where results are reported (world.SPLITS)

    def eval_prompts_file(self, split: str) -> str:
        """The prompt file of a held-out split ("validation" or "test")."""
        if split not in ("validation", "test"):
            raise ValueError(f"eval split {split!r}: use validation (to choose settings) or test (to report)")
        return self.validation_prompts_file if split == "validation" else self.test_prompts_file

    @property
    def info(self) -> dict:
        with open(os.path.join(self.root, BUILD_INFO)) as f:
            return json.load(f)


# ---------------------------------------------------------------------------- models and training
def model_config(section: ml_collections.ConfigDict) -> ModelConfig:
    """A Llama ModelConfig over the world's vocabulary from a config section (policy / judge)."""
    return ModelConfig(
        family="llama", vocab_size=world.VOCAB_SIZE, hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size, num_layers=section.num_layers, num_heads=section.num_heads,
        num_kv_heads=section.num_kv_heads, head_dim=section.hidden_size // section.num_heads,
        max_position_embeddings=128, bos_token_id=world.BOS_ID, eos_token_ids=(world.EOS_ID,),
        pad_token_id=world.PAD_ID)


def masked_next_token_loss(logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array) -> jax.Array:
    """Mean cross-entropy of the target tokens:  sum_t m_t * -log softmax(logits_{t-1})[x_t] / sum_t m_t,
    over t >= 1 (logits at t - 1 predict token t)."""
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    target_logp_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    weights_bt = loss_mask_bt[:, 1:]
    return -(target_logp_bt * weights_bt).sum() / jnp.maximum(weights_bt.sum(), 1.0)


class SupervisedState(NamedTuple):
    """What supervised (next-token) training of a testbed model updates: its params and AdamW state."""
    params: tfm.Params
    opt_state: optax.OptState


class TrainHParams(NamedTuple):
    """The hashable (jit-static) form of a training config section."""
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    clip_norm: float

    @classmethod
    def from_config(cls, train: ml_collections.ConfigDict) -> "TrainHParams":
        return cls(int(train.steps), float(train.learning_rate), int(train.warmup_steps),
                   float(train.weight_decay), float(train.clip_norm))


def make_optimizer(hp: TrainHParams) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; linear warmup, then cosine decay to 10% of the peak."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=hp.learning_rate, warmup_steps=hp.warmup_steps,
        decay_steps=max(hp.steps, hp.warmup_steps + 1), end_value=0.1 * hp.learning_rate)
    return optax.chain(optax.clip_by_global_norm(hp.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=hp.weight_decay))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _train_step(cfg: ModelConfig, hp: TrainHParams, state: SupervisedState, tokens_bt, mask_bt, loss_mask_bt
                ) -> tuple[SupervisedState, jax.Array]:
    def loss_fn(params):
        logits = tfm.forward(params, cfg, tokens_bt, mask_bt).logits
        return masked_next_token_loss(logits, tokens_bt, loss_mask_bt)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = make_optimizer(hp).update(grads, state.opt_state, state.params)
    return SupervisedState(optax.apply_updates(state.params, updates), opt_state), loss


def train_lm(cfg: ModelConfig, train: ml_collections.ConfigDict, next_batch: Callable[[int], data.LMBatch],
             key: jax.Array, desc: str, show_progress: bool = True, log: Callable[[str], None] | None = None,
             stop_after: int | None = None) -> tuple[tfm.Params, list[float]]:
    """Trains a fresh model (init from `key`) for train.steps steps on batches `next_batch(step)` with masked
    next-token cross-entropy. Returns the params and the loss of every step. Progress: a tqdm bar (when
    show_progress) and, through `log`, a line with the loss five times per run. `stop_after` ends the run
    early (the schedule is still the one of train.steps)."""
    hp = TrainHParams.from_config(train)
    params = tfm.init_params(cfg, key)
    state = SupervisedState(params, make_optimizer(hp).init(params))
    losses = []
    log_every = max(hp.steps // 5, 1)
    t0 = time.time()
    bar = tqdm(range(hp.steps if stop_after is None else min(stop_after, hp.steps)), desc=desc, disable=not show_progress, file=sys.stderr, mininterval=1.0,
               leave=False)
    for step in bar:
        b = next_batch(step)
        state, loss = _train_step(cfg, hp, state, b.tokens_bt, b.mask_bt, b.loss_mask_bt)
        losses.append(loss)
        if show_progress and step % 25 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if log is not None and ((step + 1) % log_every == 0 or step == 0):
            log(f"{desc}: step {step + 1}/{hp.steps}, loss {float(loss):.3f} ({time.time() - t0:.0f}s)")
    return state.params, [float(x) for x in jax.device_get(losses)]


def judge_curriculum_batch(rng: np.random.Generator, config: ml_collections.ConfigDict, step: int
                           ) -> data.LMBatch:
    """The judge's batch at `step`: relevance questions only for the first judge_train.relevance_only_steps
    steps, then all questions (config.data.judge_question_probs). Why: judging relevance means comparing the
    response's topic with the instruction's, a circuit that a mixed-question start often fails to find in
    time (it settles for "Yes when it looks fine"); alone, relevance is learnt within a few hundred steps."""
    data_cfg = config.data
    if step < config.judge_train.relevance_only_steps:
        data_cfg = ml_collections.ConfigDict(config.data.to_dict())
        data_cfg.judge_question_probs = tuple(float(q == "relevant") for q in data.JUDGE_QUESTIONS)
    return data.judge_batch(rng, config.judge_train.batch_size, data_cfg)


# ---------------------------------------------------------------------------- judge agreement
@functools.partial(jax.jit, static_argnums=0)
def _last_logits(cfg: ModelConfig, params, tokens_bt, mask_bt) -> jax.Array:
    """Logits of the next token after each row's last real token (rows are left-padded, so position -1)."""
    return tfm.forward(params, cfg, tokens_bt, mask_bt).logits[:, -1]


def judge_agreement(params: tfm.Params, cfg: ModelConfig, data_cfg: ml_collections.ConfigDict,
                    rng: np.random.Generator, n: int, batch_size: int = 256, split: str = "test") -> dict[str, float]:
    """How often the judge's answer (argmax over the allowed answer words: Yes/No, the five scores, or A/B)
    equals the ground truth, on n fresh judge questions about the instructions of `split` (by default the test
    split, which the judge never trained on): per question (relevant / coherent / harmless / score /
    pairwise, the last in the one random order the question was drawn in), "rubric" (the three Yes/No questions
    together) and "chance" (always answering the majority answer of each question in this sample, the baseline
    to beat). Each pairwise question is also asked with its two responses swapped, as the pairwise judge does:
    "pairwise_both_orders" is the accuracy of P(first better) averaged over both orders (the judge's score),
    "pairwise_consistency" how often both orders pick the same response."""
    allowed_ids = {q: np.asarray(world.words_to_ids(words)) for q, words in (
        *((c, world.JUDGE_ANSWERS) for c in world.RUBRIC_CRITERIA), ("score", world.SCORE_WORDS),
        ("pairwise", world.PAIRWISE_ANSWERS))}
    questions, hits, truths = [], [], []
    pair_p_first, pair_first_better = [], []  # per pairwise question: P(A) in (a, b) and P(B) in (b, a)
    for start in range(0, n, batch_size):
        examples = data.judge_examples(rng, min(batch_size, n - start), data_cfg, label_noise=0.0, split=split)
        swapped = [data.swap_pairwise(e) for e in examples if e.question == "pairwise"]
        # The judge sees everything before the answer, as at judging time.
        tokens_bt, mask_bt = data_lib.left_pad([e.ids[:-1] for e in examples + swapped], data_cfg.judge_max_len,
                                               world.PAD_ID)
        logits = np.asarray(_last_logits(cfg, params, tokens_bt, mask_bt))
        pair_rows = []
        for row, e in zip(logits, examples):
            allowed = allowed_ids[e.question]
            answer = int(allowed[np.argmax(row[allowed])])
            questions.append(e.question)
            hits.append(answer == e.clean_answer_id)
            truths.append(e.clean_answer_id)
            if e.question == "pairwise":
                pair_rows.append((row, e))
        a_id, b_id = allowed_ids["pairwise"]
        for (row, e), row_swapped in zip(pair_rows, logits[len(examples):]):
            p_a = 1 / (1 + np.exp(row[b_id] - row[a_id]))  # P(A) over the two options, in the shown order
            p_b_swapped = 1 / (1 + np.exp(row_swapped[a_id] - row_swapped[b_id]))  # P(B) with the two swapped
            pair_p_first.append((p_a, p_b_swapped))
            pair_first_better.append(e.clean_answer_id == a_id)
    questions, hits, truths = np.asarray(questions), np.asarray(hits), np.asarray(truths)
    out = {q: float(hits[questions == q].mean()) for q in data.JUDGE_QUESTIONS if (questions == q).any()}
    out["rubric"] = float(hits[np.isin(questions, world.RUBRIC_CRITERIA)].mean())
    if pair_p_first:
        p, first_better = np.asarray(pair_p_first), np.asarray(pair_first_better)
        out["pairwise_both_orders"] = float(((p.mean(1) > 0.5) == first_better).mean())
        out["pairwise_consistency"] = float(((p[:, 0] > 0.5) == (p[:, 1] > 0.5)).mean())
    majority_hits = 0
    for q in set(questions.tolist()):
        _, counts = np.unique(truths[questions == q], return_counts=True)
        majority_hits += counts.max()
    out["chance"] = float(majority_hits / len(questions))
    return out


# ---------------------------------------------------------------------------- cache
def default_cache_dir() -> str:
    root = os.environ.get("RLAIF_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlaif_jax")
    return os.path.join(root, "testbed")


def cache_key(config: ml_collections.ConfigDict) -> str:
    """A hash of everything that determines the build: the config (less cache_dir) and the source code of
    the modules that define the world, its data, the model and the training, so editing them invalidates old
    builds (a change to the model's float order alone gives different trained weights)."""
    settings = config.to_dict()
    settings.pop("cache_dir", None)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for module in (world, grader, data, tfm, sys.modules[__name__]):
        h.update(inspect.getsource(module).encode())
    h.update(f"jax={jax.__version__}".encode())  # numerics can change between jax versions
    return h.hexdigest()[:16]


def is_complete(root: str) -> bool:
    return os.path.exists(os.path.join(root, COMPLETE_MARKER))


def locate(config: ml_collections.ConfigDict | None = None, out_dir: str | None = None) -> Artifacts:
    """The folders of the build of `config`: <cache_dir>/<cache_key(config)>, or `out_dir`; nothing is built."""
    config = default_config() if config is None else config
    root = out_dir or os.path.join(config.cache_dir or default_cache_dir(), cache_key(config))
    return Artifacts(root, os.path.join(root, "tokenizer"), os.path.join(root, "policy"),
                     os.path.join(root, "judge"), os.path.join(root, "prompts.jsonl"),
                     os.path.join(root, "prompts_validation.jsonl"), os.path.join(root, "prompts_test.jsonl"))


# ---------------------------------------------------------------------------- build
def build(config: ml_collections.ConfigDict | None = None, out_dir: str | None = None, force: bool = False,
          show_progress: bool = True, log: Callable[[str], None] | None = None) -> Artifacts:
    """Builds (or reuses) tokenizer, SFT policy and judge. `out_dir` overrides the cache folder
    <cache_dir>/<cache_key(config)>; `force` rebuilds even when a finished build is there."""
    config = default_config() if config is None else config
    log = log or (lambda msg: print(f"[testbed] {msg}", file=sys.stderr, flush=True))
    art = locate(config, out_dir)
    root = art.root
    if is_complete(root) and not force:
        log(f"reusing the testbed built in {root}")
        return art
    # One build at a time per folder: processes that start together (parallel test workers, the hosts of a sweep)
    # wait for the first one's build and reuse it instead of each spending minutes on the same models.
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(f"{root.rstrip(os.sep)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(root) and not force:
            log(f"reusing the testbed another process built in {root}")
            return art
        return _build(config, art, force, show_progress, log)


def _build(config: ml_collections.ConfigDict, art: Artifacts, force: bool, show_progress: bool,
           log: Callable[[str], None]) -> Artifacts:
    """`build`'s work, under its lock: writes the build into a temporary sibling, then renames it into place."""
    root = art.root
    tmp = f"{root.rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"building the testbed into {root} (seed {config.seed})")
    t_start = time.time()

    # -- tokenizer: shared by policy and judge, so the judge can read policy tokens directly; the prompt file
    tokenizer.save_tokenizer(os.path.join(tmp, "tokenizer"))
    tok = hf.load_tokenizer(os.path.join(tmp, "tokenizer"))
    for split, path in (("train", art.prompts_file), ("validation", art.validation_prompts_file),
                        ("test", art.test_prompts_file)):
        task.write_prompts(os.path.join(tmp, os.path.basename(path)), split)

    key_policy, key_judge = jax.random.split(jax.random.PRNGKey(config.seed))

    # -- SFT policy: imitate the noisy demonstrations
    t0 = time.time()
    policy_cfg = model_config(config.policy)
    sft_rng = np.random.default_rng([config.seed, 1])
    policy_params, sft_losses = train_lm(
        policy_cfg, config.sft, lambda step: data.sft_batch(sft_rng, config.sft.batch_size, config.data), key_policy,
        desc="SFT policy", show_progress=show_progress, log=log)
    sft_seconds = time.time() - t0
    log(f"SFT policy: {config.sft.steps} steps in {sft_seconds:.1f}s, final loss {np.mean(sft_losses[-20:]):.3f}")
    hf.save_model(policy_params, policy_cfg, os.path.join(tmp, "policy"), tokenizer=tok)

    # -- judge: answer the rubric questions / give a score, on noisy labels
    t0 = time.time()
    judge_cfg = model_config(config.judge)
    judge_rng = np.random.default_rng([config.seed, 2])
    judge_params, judge_losses = train_lm(
        judge_cfg, config.judge_train,
        functools.partial(judge_curriculum_batch, judge_rng, config), key_judge,
        desc="judge", show_progress=show_progress, log=log)
    judge_seconds = time.time() - t0
    agreement = judge_agreement(judge_params, judge_cfg, config.data, np.random.default_rng([config.seed, 3]),
                                config.eval_examples)
    log(f"judge: {config.judge_train.steps} steps in {judge_seconds:.1f}s, final loss "
        f"{np.mean(judge_losses[-20:]):.3f}; agreement with the ground truth on fresh examples: "
        + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    hf.save_model(judge_params, judge_cfg, os.path.join(tmp, "judge"), tokenizer=tok)

    info = {
        "cache_key": cache_key(config), "config": config.to_dict(),
        "sft": {"seconds": sft_seconds, "final_loss": float(np.mean(sft_losses[-20:])),
                "loss_every_50": sft_losses[::50]},
        "judge": {"seconds": judge_seconds, "final_loss": float(np.mean(judge_losses[-20:])),
                  "loss_every_50": judge_losses[::50], "agreement": agreement},
        "total_seconds": time.time() - t_start,
    }
    with open(os.path.join(tmp, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=2, default=str)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:  # written last: the folder is now whole
        f.write("ok\n")

    # Move into place; a concurrent build may have finished first, then use that one.
    if os.path.exists(root):
        if is_complete(root) and not force:
            shutil.rmtree(tmp, ignore_errors=True)
            return art
        shutil.rmtree(root)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:
        if not is_complete(root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"testbed built in {info['total_seconds']:.1f}s: {root}")
    return art


def seeded_config(seed: int) -> ml_collections.ConfigDict:
    """The default build with another build seed (data and initialisation): one draw of the testbed."""
    c = default_config()
    c.seed = int(seed)
    return c


def ensure_built(run_config: ml_collections.ConfigDict) -> None:
    """The training program's (and the demo's) hook, called before any model or prompt file is read: when a
    run's config asks for the testbed (`config.testbed.build`, as experiments/testbed.py does), builds the default
    build of seed `config.testbed.seed` (and of each of `config.testbed.ensemble_seeds`, whose judges join a judge
    ensemble), or reuses the cached one; its config already names the folders `locate` gives. Other configs have no
    `testbed` section and are left alone."""
    if "testbed" in run_config and run_config.testbed.build:
        for seed in (run_config.testbed.seed, *run_config.testbed.get("ensemble_seeds", ())):
            build(seeded_config(seed))
