"""Checkpoints with orbax: periodic, asynchronous, the last N kept, atomic; restore into any mesh.

A checkpoint of step s is the folder workdir/checkpoints/<s>/ with two items:
  state   the train-state pytree (params, optimizer state, PRNG key, ...), written by every process,
          each its own shards (orbax StandardSave)
  extra   a small JSON document: data-loader position, host-side counters, anything else to resume exactly

Atomicity is orbax's: a save is written to `<s>.orbax-checkpoint-tmp*` and renamed to `<s>` once complete
(on object stores, where rename is not atomic, a commit_success file marks completion). A folder left
behind by a killed save is therefore never taken for a checkpoint; `cleanup_tmp_directories` removes it
at the next start.

Restoring takes the abstract target state: a pytree of `jax.ShapeDtypeStruct` carrying the target
`.sharding`. Orbax reads each shard straight into its place, so a checkpoint written on one mesh shape
restores onto another (or onto a single device) without ever gathering the whole array on one host.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from rlaif_jax import errors

CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger("rlaif_jax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 100  # save when step % every_steps == 0 (the last step is saved with force=True)
    c.max_to_keep = 3  # older checkpoints are deleted; 0 keeps all
    c.async_save = True  # write in a background thread while training continues
    # Checkpoint selection by an evaluation metric (Lee et al. 2023 keep the checkpoints of highest validation
    # reward as candidates): after each evaluation whose `best_metric` ranks among the `keep_best` highest so far,
    # the policy is exported as an HF folder to workdir/best_policies/step_<s> (index.json ranks them); 0 = off.
    c.keep_best = 0
    c.best_metric = "eval/judge_score"
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError with what to change when the `checkpoint` section is inconsistent."""
    if cfg.every_steps < 1:
        raise ValueError(f"config.checkpoint.every_steps={cfg.every_steps} must be >= 1 (the last step is always "
                         "saved: set it to train.steps to save only then)")
    if cfg.max_to_keep < 0:
        raise ValueError(f"config.checkpoint.max_to_keep={cfg.max_to_keep} must be >= 0 (0 keeps all)")
    if cfg.keep_best < 0:
        raise ValueError(f"config.checkpoint.keep_best={cfg.keep_best} must be >= 0 (0 = no best-policy exports)")
    if cfg.keep_best and not cfg.best_metric.startswith("eval/"):
        raise ValueError(f"config.checkpoint.best_metric={cfg.best_metric!r} must be an evaluation metric "
                         "(eval/...): checkpoints are ranked at evaluations")


def saved_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in workdir/checkpoints, from the folder names alone (nothing created,
    no orbax manager): a save a kill interrupted is still named `<s>.orbax-checkpoint-tmp*` and not counted."""
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit() and os.path.isdir(os.path.join(folder, n)))


def abstract_state(state: Any) -> Any:
    """The ShapeDtypeStruct pytree (with shardings) of a concrete state, e.g. from `jax.eval_shape` plus
    shardings, or of arrays already placed on the target mesh."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
    )


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` (e.g. jax.eval_shape(init)) placed on `shardings` (same structure)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


class Checkpointer:
    """Saves and restores (train state, extra JSON) under workdir/checkpoints.

    Every process constructs it and calls `save` / `restore` with the same arguments (orbax coordinates
    the processes). Use: `step = ckpt.latest_step()`; if not None, `state, extra = ckpt.restore(step,
    abstract)`; in the loop `ckpt.save(step, state, extra)`; at the end `ckpt.save(last, ..., force=True)`
    and `ckpt.close()`.
    """

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
        validate_config(cfg)
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.async_save = bool(cfg.async_save)
        # Save exactly at multiples of every_steps (orbax's default would also save the first step it sees).
        # A preemption is the caller's forced save (train.py's `preemption`, one mechanism for every signal).
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(int(cfg.every_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policy,
            max_to_keep=int(cfg.max_to_keep) or None,
            enable_async_checkpointing=bool(cfg.async_save),
            cleanup_tmp_directories=True,  # remove folders of saves that a kill interrupted
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Starts saving `state` and `extra` (JSON-serialisable) as step `step` if the interval says so
        (or `force`); returns whether a save started. Asynchronous: the call returns once the arrays are
        copied off the accelerator, and the next save (or `wait`) waits for this one to finish."""
        if step in self.manager.all_steps():  # e.g. a forced final save on an interval step
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra or {}))
        )
        start = time.perf_counter()
        started = bool(self.manager.save(int(step), args=args, force=force))
        if started:
            log.info("checkpoint of step %d -> %s (%s; %.2f s blocking)", step, os.path.join(self.directory, str(step)),
                     "writing in the background" if self.async_save else "written",
                     time.perf_counter() - start)
        return started

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def resume(self, state: Any, loader: Any) -> tuple[Any, int]:
        """A program's resume: (the newest checkpoint's state, read into the shardings of `state`, and its step)
        with `loader` (a data loader with `restore`) moved to the position saved beside it as extra["data"];
        (state, 0) unchanged when there is no checkpoint."""
        start = self.latest_step() or 0
        if start:
            state, extra = self.restore(start, abstract_state(state))
            loader.restore(extra["data"])
            log.info("resumed from the checkpoint of step %d in %s", start, os.path.dirname(self.directory))
        return state, start

    def restore(self, step: int, abstract: Any) -> tuple[Any, dict[str, Any]]:
        """(state, extra) of checkpoint `step`, each array read into the sharding of its ShapeDtypeStruct
        in `abstract` (which may describe another mesh than the one that saved it)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
        folder = os.path.join(self.directory, str(step))
        try:
            restored = self.manager.restore(int(step), args=args)
        except Exception as e:  # orbax's messages run to hundreds of lines (and advise strict=False): keep the first
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            shape_mismatch = "shape" in str(e).lower() or "structure" in str(e).lower()
            what = ("does not fit the current model (a model, optimizer or critic setting changed since it was "
                    "saved)" if shape_mismatch else "could not be read (corrupt or truncated)")
            raise errors.UserError(f"the checkpoint {folder} {what}: {type(e).__name__}: {first}; resume with the "
                                   "config it was written with, or move the folder away to resume from an earlier "
                                   "checkpoint (or start in a new workdir)", kind="checkpoint") from None
        return restored["state"], dict(restored["extra"] or {})

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


BEST_DIR = "best_policies"
BEST_INDEX = "index.json"


class BestPolicies:
    """The `keep_best` policies of highest `best_metric`, exported as HF folders under workdir/best_policies.

    `consider(step, metrics, export)` is called after each evaluation with the evaluation's metrics and a function
    that writes the policy to a folder; it exports when the step ranks among the best so far and deletes the
    folder that falls out. index.json (rewritten atomically after every change, read back on resume) lists the
    kept steps best first, so an interrupted run neither loses nor duplicates a candidate. Ties keep the earlier
    step. Only process 0 writes files (the export itself is collective: every process calls `consider`).
    """

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
        self.k, self.metric = int(cfg.keep_best), cfg.best_metric
        self.directory = os.path.join(os.path.abspath(workdir), BEST_DIR)
        self.kept: list[dict[str, Any]] = []  # [{"step", "value", "path"}], best first
        index = os.path.join(self.directory, BEST_INDEX)
        if self.k and os.path.exists(index):
            with open(index) as f:
                self.kept = json.load(f)["kept"]

    def consider(self, step: int, metrics: Mapping[str, Any], export: Callable[[str], None]) -> bool:
        """Exports the policy of `step` if its metric ranks among the best `keep_best`; returns whether it did."""
        if not self.k:
            return False
        if self.metric not in metrics:
            raise errors.ConfigError(f"config.checkpoint.best_metric={self.metric!r} is not among this run's "
                                     f"evaluation metrics: choose one of {sorted(m for m in metrics if m.startswith('eval/'))}")
        value = float(metrics[self.metric])
        if any(entry["step"] == step for entry in self.kept) or not math.isfinite(value):
            return False
        ranked = sorted(self.kept + [{"step": step, "value": value}], key=lambda e: (-e["value"], e["step"]))
        if ranked.index(next(e for e in ranked if e["step"] == step)) >= self.k:
            return False
        path = os.path.join(self.directory, f"step_{step}")
        export(path)
        ranked[[e["step"] for e in ranked].index(step)]["path"] = path
        self.kept, dropped = ranked[:self.k], ranked[self.k:]
        if jax.process_index() == 0:
            for entry in dropped:
                shutil.rmtree(entry["path"], ignore_errors=True)
            tmp = os.path.join(self.directory, BEST_INDEX + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"metric": self.metric, "kept": self.kept}, f, indent=2)
            os.replace(tmp, os.path.join(self.directory, BEST_INDEX))
        log.info("policy of step %d (%s = %.4g) exported to %s: rank %d of the %d best", step, self.metric, value,
                 path, [e["step"] for e in self.kept].index(step) + 1, self.k)
        return True
