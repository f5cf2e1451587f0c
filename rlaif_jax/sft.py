"""Supervised fine-tuning (SFT), the stage before RL: `python -m rlaif_jax.sft --config experiments/X.py[:arg]
--workdir DIR`, with the training program's flags and error conventions (`--config.a.b=value` overrides, a user's
mistake is one line `FATAL <kind> error: ...` and exit code 2, SIGTERM / SIGINT stop at a step boundary with a
checkpoint, an existing workdir is resumed).

Data: prompt/completion records, a local JSONL / parquet file (what `scripts/export_dataset.py --kind sft` writes:
{"prompt", "completion"}) or a public dataset by its schema (`config.data.schema`, `data.DATASETS`, whose reference
response is the completion: `config.data.reference_field = "reference"`). The `data` section is the RL prompts'
(`data.default_config`), read by the same pipeline (`data.load_prompts`): the prompt is rendered and tokenised
exactly as the RL prompts are (chat template or not, cut from the left to max_prompt_len), and the completion is
the reference response of that pipeline, its tokens then EOS, cut at the end to max_reference_len. So the model
is fine-tuned on prompts laid out as the RL stage will show them.

Loss (`completion_loss`): the mean next-token cross-entropy over the completion tokens (EOS included) of the whole
batch; prompt and pad tokens carry no loss:

    L = -(1/N) sum_{b,t} m_bt log pi(y_bt | x_b, y_b<t),   N = sum_{b,t} m_bt  (completion tokens in the batch)

A token mean over the batch, not a mean of per-sequence means: every completion token weighs the same whatever
the length of its completion (a per-sequence mean would weigh a short completion's tokens more), as in TRL's
SFTTrainer with completion-only loss (`ops.aggregate` "token_mean"). N is counted over the whole batch, so
gradient accumulation (`optim.grad_accum`, `train_step.accumulate_gradients`) gives the same update for any split.

Layout: a batch is the RL learn phase's, prompts left-padded (B, P) and completions right-padded (B, C), and the
log-probs are `train_step.response_logprobs` (one forward, only the C completion positions through the LM head).
With `train.packing` a batch is instead train.batch_size packed rows (`data.pack_examples`: whole examples side by
side, next-fit, in a seeded order fixed once; the rows reshuffled each epoch): tokens, segment ids and the
completion mask, (B, L) each. The model runs them block-diagonally (`transformer.forward` with segment ids: each
example attends only to itself, its positions from 0), so the loss (`packed_loss`) is `completion_loss`'s on the
same examples; fewer pad tokens go through the model when examples are short. Its LM head runs over every
position of the rows, where the unpacked path unembeds only the completion positions.

The step (`make_sft_step`) is one `jax.jit` with in/out shardings on the training mesh (`config.mesh`, the same
logical-axis rules) and the state donated; params are read from the HF folder straight into their shards
(`hf.load_model`) and the optimizer state is created by a jitted init with out_shardings. The optimizer is the RL
stage's (`train_step.make_optimizer`: AdamW / Adafactor, warm-up and schedule over train.steps updates, clipping),
behind the same non-finite guard (`train_step.guarded_update`).

Files in the workdir: checkpoints/ (orbax: state and the data position, so a resumed run sees the batches an
uninterrupted one would), metrics.jsonl (sft/loss, sft/completion_tokens, optim/learning_rate, optim/grad_norm,
guard/skipped_updates), config.json, final_policy/ (the HF export of the last step) and policies/step_<s>/ every
train.export_every steps.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import errors, ops, program
from rlaif_jax import metrics as metrics_lib
from rlaif_jax import sharding as shd
from rlaif_jax import train_step as ts
from rlaif_jax import workdir as workdir_lib
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

log = logging.getLogger("rlaif_jax")

# Settings of the `data` section the SFT stage does not use, with the value that leaves them off.
UNUSED_DATA_SETTINGS = {"eval_path": "", "eval_split": "", "eval_fraction": 0.0, "num_epochs": 0}


# ---------------------------------------------------------------------------------------------- config
def base_config() -> ml_collections.ConfigDict:
    """Every section of an SFT config with its defaults (unlocked; experiment files lock it after their changes).
    policy, data, optim, mesh, checkpoint and logging are the RL config's sections (same keys, same validators)."""
    from rlaif_jax import checkpoint, metrics

    rl = config_lib.base_config()
    c = ml_collections.ConfigDict()
    c.policy = rl.policy  # the model fine-tuned: HF folder or hub id, compute and storage dtypes
    c.data = data_lib.default_config()
    c.data.reference_field = "completion"  # the completion column ("reference" with config.data.schema)
    c.data.max_reference_len = 128  # completion tokens (with EOS) per row; longer completions are cut at the end
    c.optim = rl.optim
    c.mesh = rl.mesh
    c.checkpoint = checkpoint.default_config()
    c.logging = metrics.default_config()
    c.logging.progress_keys = "sft/loss,optim/learning_rate"
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # examples per step (x optim.grad_accum micro-batches of batch_size / grad_accum)
    c.train.steps = 1000  # optimizer steps; the data repeats, epoch e shuffled with data.seed + e
    c.train.export_final = True  # write the final model as an HF folder in workdir/final_policy
    c.train.export_every = 0  # also export every N steps to workdir/policies/step_<N>; 0 = never
    c.train.max_consecutive_skipped = 64  # stop after this many non-finite updates in a row; 0 = never
    # Several examples per row (`data.pack_examples`): rows of train.pack_length tokens (0 = data.max_prompt_len +
    # data.max_reference_len), each example attending only to itself; train.batch_size then counts rows.
    c.train.packing = False
    c.train.pack_length = 0
    return c


def _validate_train(t: ml_collections.ConfigDict) -> None:
    if t.batch_size < 1 or t.steps < 1:
        raise ValueError(f"config.train.batch_size={t.batch_size} and config.train.steps={t.steps} must be >= 1")
    if t.export_every < 0 or t.max_consecutive_skipped < 0:
        raise ValueError(f"config.train.export_every={t.export_every} and config.train.max_consecutive_skipped="
                         f"{t.max_consecutive_skipped} must be >= 0 (0 = off)")
    if t.pack_length < 0 or (t.pack_length and not t.packing):
        raise ValueError(f"config.train.pack_length={t.pack_length} must be >= 0, and is read only with "
                         "config.train.packing=True (0 = data.max_prompt_len + data.max_reference_len)")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises `errors.ConfigError` with one line naming the field to change; reads no file. The shared sections are
    checked by the RL config's own validators (`config.section_validators`)."""
    config_lib.as_config_error(_validate, c, num_devices)


def _validate(c: ml_collections.ConfigDict, num_devices: int | None) -> None:
    shared = config_lib.section_validators()
    validators = {**{name: shared[name] for name in ("policy", "data", "optim", "mesh", "checkpoint", "logging")},
                  "train": _validate_train}
    if set(c.keys()) != set(validators):
        raise ValueError(f"an SFT config has the sections {sorted(validators)}; this one has {sorted(c.keys())} "
                         "(start it from rlaif_jax.sft.base_config(), not the RL config)")
    for name, check in validators.items():
        check(c[name])
    if not c.data.reference_field:
        raise ValueError("config.data.reference_field is empty: name the completion column ('completion' in "
                         "prompt/completion records, 'reference' with config.data.schema)")
    for name, off in UNUSED_DATA_SETTINGS.items():
        if c.data[name] != off:
            raise ValueError(f"config.data.{name}={c.data[name]!r} is not used by SFT (no held-out evaluation; the "
                             f"data repeats for config.train.steps steps): set it to {off!r}")
    longest = c.data.max_prompt_len + c.data.max_reference_len
    if c.train.packing and 0 < c.train.pack_length < longest:
        raise ValueError(f"config.train.pack_length={c.train.pack_length} is shorter than the longest example "
                         f"(data.max_prompt_len + data.max_reference_len = {longest}): raise it, or set 0")
    program.check_batch_on_mesh(c.mesh, c.train.batch_size, c.optim.grad_accum, "config.train.batch_size",
                                num_devices)


# ---------------------------------------------------------------------------------------------- loss and step
@flax.struct.dataclass
class SFTState:
    params: Any  # the model's params (tfm layout)
    opt_state: Any
    step: jax.Array  # () int32, completed steps
    skipped_updates: jax.Array  # () int32, updates dropped by the non-finite guard


def completion_loss(params, cfg: ModelConfig, prompts_bp, prompt_mask_bp, completions_bc, completion_mask_bc,
                    norm: ops.LossNorm | None = None) -> jax.Array:
    """-(1/N) sum_{b,t} m_bt log pi(y_bt | x_b, y_b<t): the token-mean cross-entropy of the completions (the module
    docstring says why a token mean). Prompts (B, P) left-padded, completions (B, C) right-padded with mask m.
    `norm` holds N of the whole batch when these rows are one micro-batch of it (None: N counted here)."""
    logp_bc, _, _ = ts.response_logprobs(params, cfg, prompts_bp, prompt_mask_bp, completions_bc,
                                         completion_mask_bc, 1.0)
    return ops.aggregate(-logp_bc, completion_mask_bc, "token_mean", norm)


def packed_loss(params, cfg: ModelConfig, tokens_bl, segment_ids_bl, loss_mask_bl,
                norm: ops.LossNorm | None = None) -> jax.Array:
    """`completion_loss` on packed rows (`data.pack_examples`): the same token mean over the completion tokens, each
    example computed as if alone (`transformer.forward` with segment ids). The hidden state at t - 1 predicts token
    t, and a target's previous token is always of its own example (an example starts with its prompt); the LM head
    and log-softmax are the unpacked path's (`train_step.token_logprobs`), over all L - 1 positions."""
    hidden_bld = tfm.forward(params, cfg, tokens_bl, segment_ids_bl > 0, segment_ids_bl).hidden
    logp_bl, _ = ts.token_logprobs(params, cfg, hidden_bld[:, :-1], tokens_bl[:, 1:], loss_mask_bl[:, 1:], 1.0)
    return ops.aggregate(-logp_bl, loss_mask_bl[:, 1:], "token_mean", norm)


def make_optimizer(c: ml_collections.ConfigDict):
    """The RL stage's optimizer over the SFT run's train.steps updates (one per step)."""
    return ts.make_optimizer(c, c.train.steps)


def init_state(c: ml_collections.ConfigDict, params) -> SFTState:
    return SFTState(params=params, opt_state=make_optimizer(c).init(params), step=jnp.zeros((), jnp.int32),
                    skipped_updates=jnp.zeros((), jnp.int32))


def state_shardings(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh: jax.sharding.Mesh,
                    abstract: SFTState) -> SFTState:
    """Params by their logical axes, optimizer leaves of a param's shape like their param, the rest replicated
    (`train_step.optimizer_state_shardings`, as in training)."""
    params = shd.tree_shardings(mesh, tfm.param_logical_axes(cfg), abstract.params)
    replicated = shd.replicated(mesh)
    opt_state = ts.optimizer_state_shardings(make_optimizer(c), abstract.opt_state, abstract.params, params,
                                             replicated)
    return SFTState(params=params, opt_state=opt_state, step=replicated, skipped_updates=replicated)


def make_sft_step(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh: jax.sharding.Mesh,
                  shardings: SFTState) -> Callable:
    """`sft_step(state, prompts_bp, prompt_mask_bp, completions_bc, completion_mask_bc) -> (state, metrics)`: one
    optimizer update on `completion_loss` over optim.grad_accum micro-batches, behind the non-finite guard; one
    jax.jit with in/out shardings on `mesh` (the batch over the rules' batch axes) and the state donated."""
    optimizer, schedule = make_optimizer(c), ts.learning_rate_schedule(c, c.train.steps)
    accum = int(c.optim.grad_accum)

    def sft_step(state: SFTState, *arrays):
        if c.train.packing:  # (tokens_bl, segment_ids_bl, loss_mask_bl)
            names, loss_of, targets = ("tokens", "segments", "loss_mask"), packed_loss, arrays[2][:, 1:]
        else:  # (prompts_bp, prompt_mask_bp, completions_bc, completion_mask_bc)
            names, loss_of, targets = ("prompt", "pmask", "resp", "rmask"), completion_loss, arrays[3]
        norm = ops.loss_norm(targets)  # N of the whole batch, shared by its micro-batches

        def loss_fn(params, d):
            return loss_of(params, cfg, *(d[n] for n in names), norm), ({}, None)

        batch = dict(zip(names, arrays))
        loss, _, grads = ts.accumulate_gradients(loss_fn, state.params, batch, accum)
        params, opt_state, kept, grad_norm = ts.guarded_update(optimizer, grads, state.opt_state, state.params, loss)
        skipped = 1 - kept.astype(jnp.int32)
        metrics = {"sft/loss": loss, "sft/completion_tokens": norm.tokens.astype(jnp.int32),
                   # the rate of this update: the schedule advances only on kept updates
                   "optim/learning_rate": schedule(state.step - state.skipped_updates),
                   "optim/grad_norm": grad_norm, "guard/skipped_updates": skipped}
        return SFTState(params, opt_state, state.step + 1, state.skipped_updates + skipped), metrics

    batch = shd.batch_sharding(mesh, 2)
    return jax.jit(sft_step, in_shardings=(shardings,) + (batch,) * (3 if c.train.packing else 4),
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=0)


# ---------------------------------------------------------------------------------------------- the run
def run(c: ml_collections.ConfigDict, workdir: str, begin: workdir_lib.Start) -> int:
    """Fine-tunes (or resumes) the run of config `c` in `workdir` (prepared by `workdir.prepare`); returns the exit
    code: 0, or 128 + the signal's number when a signal stopped it."""
    final_policy = os.path.join(workdir, workdir_lib.FINAL_POLICY)
    if begin.finished and (os.path.exists(final_policy) or not c.train.export_final):
        log.info("the run in %s finished at step %d: nothing to do (raise config.train.steps to train on)", workdir,
                 begin.step)
        return 0
    # ---- 1 data first: a fault in it shows before any weights load
    tokenizer = hf.load_tokenizer(c.policy.path)
    loader, _ = data_lib.load_prompts(c.data, tokenizer, c.train.batch_size)
    examples = loader.prompts
    log.info("SFT examples: %s", examples.summary())
    if c.train.packing:
        row_len = c.train.pack_length or c.data.max_prompt_len + c.data.max_reference_len
        packed = data_lib.pack_examples(examples, row_len, examples.pad_id, c.data.seed)
        loader = data_lib.PackedLoader(packed, c.train.batch_size, seed=c.data.seed, shuffle=c.data.shuffle,
                                       num_epochs=c.data.num_epochs, drop_last=True)
        log.info("packed %d examples into %d rows of %d tokens (%.0f%% of the tokens real)", len(examples),
                 len(packed.tokens_bl), row_len, 100 * float(np.mean(packed.segment_ids_bl > 0)))
    if examples.num_reference_truncated > len(examples) / 2:
        log.warning("%d of %d completions are longer than config.data.max_reference_len=%d tokens (with EOS) and "
                    "were cut, losing their EOS; raise max_reference_len", examples.num_reference_truncated,
                    len(examples), examples.max_reference_len)
    # ---- 2 mesh, model (read into its shards), state (born sharded), the compiled step
    mesh, rules = shd.mesh_from_config(c.mesh)
    with shd.use_rules(rules), jax.set_mesh(mesh):
        cfg, params = hf.load_model(c.policy.path, mesh, c.policy.dtype, c.policy.param_dtype, rules)
        init = functools.partial(init_state, c)
        shardings = state_shardings(c, cfg, mesh, jax.eval_shape(init, params))
        state = jax.jit(init, out_shardings=shardings)(params)
        del params  # the state holds its own copy; the loaded buffers can go
        step_fn = make_sft_step(c, cfg, mesh, shardings)

        # ---- 3 resume: state and data position
        ckpt = ckpt_lib.Checkpointer(workdir, c.checkpoint)
        state, start = ckpt.resume(state, loader)
        writer = metrics_lib.MetricsWriter(workdir, c.logging, c, start_step=start, total_steps=c.train.steps)
        log.info("%d devices, mesh %s; %d examples per step", jax.device_count(), dict(mesh.shape),
                 c.train.batch_size)
        batch_sharding = shd.batch_sharding(mesh, 2)

        def export(folder: str) -> None:
            hf.save_model(state.params, cfg, folder, tokenizer=tokenizer)

        # ---- 4 the loop
        preemption = program.Preemption()
        step, skipped_in_a_row, limit = start, 0, c.train.max_consecutive_skipped
        try:
            for step in range(start + 1, c.train.steps + 1):
                local = next(loader)
                arrays = (tuple(local) if c.train.packing else
                          (local.tokens_bp, local.mask_bp, local.reference_bf, local.reference_mask_bf))
                batch = data_lib.to_global(arrays, batch_sharding)
                state, metrics = step_fn(state, *batch)
                values = writer.write(step, metrics)
                stop = preemption.requested(step) and step < c.train.steps
                ckpt.save(step, state, {"data": loader.state().to_json()}, force=step == c.train.steps or stop)
                if c.train.export_every and step % c.train.export_every == 0:
                    export(os.path.join(workdir, workdir_lib.POLICY_EXPORTS, f"step_{step}"))
                if stop:
                    break
                skipped_in_a_row = skipped_in_a_row + 1 if values["guard/skipped_updates"] else 0
                if limit and skipped_in_a_row >= limit:
                    raise errors.UserError(
                        f"the last {skipped_in_a_row} updates (up to step {step}) were all skipped by the non-finite "
                        "guard (NaN or inf in the loss, gradients or new params): lower config.optim.learning_rate; "
                        f"config.train.max_consecutive_skipped={limit} sets this limit (0 = never stop)",
                        kind="training")
        finally:
            preemption.close()
            ckpt.close()
            writer.close()
        if preemption.signum is not None:
            log.warning("stopped by %s after step %d: its checkpoint is in %s; run the same command to resume from "
                        "step %d", signal.Signals(preemption.signum).name, step, ckpt.directory, step + 1)
            return 128 + int(preemption.signum)

        # ---- 5 the fine-tuned model as an HF folder (written beside it, then renamed: atomic)
        if c.train.export_final:
            export(final_policy)
            log.info("exported the model of step %d to %s", step, final_policy)
    return 0


def launch(config: ml_collections.ConfigDict | None, workdir: str | None, *, allow_config_change: bool = False,
           distributed: tuple[str | None, int | None, int | None] = (None, None, None)) -> int:
    """The program after flag parsing (tests call it in-process); returns the exit code. A user error from any
    phase ends it here: one line, exit code 2."""
    try:
        if config is None:
            raise errors.ConfigError("--config is required, e.g. --config experiments/sft_tldr.py:runlocal")
        program.maybe_initialize_distributed(*distributed)
        if not workdir:
            raise errors.WorkdirError("--workdir is required (the run's folder: checkpoints, metrics.jsonl)")
        validate(config)
        workdir_lib.check(workdir)
        hf.check_folder(config.policy.path, "config.policy.path")
        program.check_data_paths(config.data)
        start = workdir_lib.prepare(workdir, config, allow_changes=allow_config_change)
        return run(config, workdir, start)
    except errors.UserError as e:
        errors.report(e)


# ---------------------------------------------------------------------------------------------- the CLI
if __name__ == "__main__":
    program.run_stage_cli(launch, "SFT", "checkpoints, metrics, final_policy")
