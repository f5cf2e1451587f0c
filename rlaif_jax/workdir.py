"""The run folder (`--workdir`): what may be written into it, and whether a new run starts or resumes there.

Guarantees (README, "When something goes wrong"):
  - a workdir is marked as a run's on creation (MARKER_FILE); a folder without the marker is used only when it is
    empty, or a run folder of an earlier version (a run's config.json beside its checkpoints/metrics); a folder
    holding anything else (model weights, an HF config.json, unknown files) is refused: nothing is overwritten
  - a marked workdir without a checkpoint but with an earlier run's files (metrics, config.json, final_policy,
    samples) starts afresh after moving them into previous-<time>/ with a warning: nothing is truncated
  - resuming compares the config with the saved config.json: a change of what the run computes (model, data,
    shapes, batch, algorithm, reward, optimiser, seed) is refused with the list of differences unless
    `allow_changes`; the harmless ones (RESUME_ALLOWED: logging, evaluation and checkpoint cadence, train.steps
    raised, compute and mesh layout) are logged; config.json then holds the config in force
  - train.steps below the checkpoint's step is refused; equal to it (a finished run) does nothing more

Only process 0 writes; every process calls `prepare` (the others only wait at a barrier for process 0's verdict).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import ml_collections

from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import metrics as metrics_lib
from rlaif_jax.errors import UserError, WorkdirError

log = logging.getLogger("rlaif_jax")

MARKER_FILE = ".rlaif_jax_run"
LAUNCHER_FILES = ("train.log",)  # scripts/sweep.py's log of the run, written beside it
CONFIG_FILE = "config.json"
FINAL_POLICY = "final_policy"
POLICY_EXPORTS = "policies"  # sft.py's exports every train.export_every steps: policies/step_<s>
REWARD_MODEL = "reward_model"  # reward_model_stage.py's export: the reward-model folder
# An earlier run's outputs, moved aside (never truncated) when there is no checkpoint to resume them from.
RUN_OUTPUTS = (metrics_lib.METRICS_FILE, CONFIG_FILE, FINAL_POLICY, metrics_lib.SAMPLES_DIR,
               metrics_lib.WANDB_ID_FILE, ckpt_lib.BEST_DIR, POLICY_EXPORTS, REWARD_MODEL)
# Settings a resumed run may change: how it is logged, evaluated, checkpointed and laid out on devices, how long
# it runs. Every other setting changes what the run computes.
RESUME_ALLOWED = ("logging.", "eval.", "checkpoint.", "compute.", "mesh.", "testbed.", "train.steps",
                  "train.export_final", "train.export_every", "train.max_consecutive_skipped")
# Files that say a folder holds a model (or other foreign data), not a run.
_FOREIGN_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".model", ".index.json")


class Start(NamedTuple):
    step: int  # the checkpoint's step to resume from; 0 = a fresh run
    finished: bool  # the checkpoint is of the last step (train.steps): nothing left to train


def config_json(c: ml_collections.ConfigDict) -> str:
    """The run config as saved (and compared on resume): a remote judge's URL and key redacted."""
    from rlaif_jax.judging import remote

    return remote.redacted(c).to_json_best_effort(indent=2)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (saved value, new value)} of every setting that differs ('<absent>' where one side lacks it)."""
    a, b = flatten(saved), flatten(new)
    absent = "<absent>"
    return {k: (a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)}


def _allowed(setting: str) -> bool:
    return any(setting == p or (p.endswith(".") and setting.startswith(p)) for p in RESUME_ALLOWED)


def _listing(entries: list[str]) -> str:
    return ", ".join(sorted(entries)[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _is_run_config(path: str) -> bool:
    """A config.json written by a run (an experiment config: policy and train sections), not an HF model's."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "policy" in d and "train" in d and "model_type" not in d


def check(workdir: str) -> None:
    """What is knowable about `workdir` before anything loads: it is (or can be) a writable folder that holds a
    run's files or nothing. Raises WorkdirError; writes nothing."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file; pass a folder (it is created if missing)")
    if not os.path.exists(workdir):
        parent = os.path.dirname(os.path.abspath(workdir))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise WorkdirError(f"--workdir={workdir} cannot be created: {parent} is not writable; choose another "
                               "folder")
        return
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir} is not writable; fix its permissions or choose another folder")
    # The log a launcher (scripts/sweep.py) opens in the workdir before the program starts is not a foreign file.
    entries = [e for e in os.listdir(workdir) if e not in LAUNCHER_FILES]
    if MARKER_FILE in entries or not entries:
        return
    foreign = [e for e in entries if e.endswith(_FOREIGN_SUFFIXES) or e.startswith("tokenizer")]
    config = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(config) and not _is_run_config(config):
        foreign.append(f"{CONFIG_FILE} (not a run's config)")
    if foreign:
        raise WorkdirError(f"--workdir={workdir} holds files that no training run wrote ({_listing(foreign)}), e.g. "
                           "a model folder; a run would overwrite them: pass a new or empty folder")
    if not os.path.exists(config):
        raise WorkdirError(f"--workdir={workdir} is not empty and holds no run ({_listing(entries)}); pass a new or "
                           "empty folder")


def prepare(workdir: str, c: ml_collections.ConfigDict, *, allow_changes: bool = False) -> Start:
    """Checks `workdir` (see the module docstring), creates and marks it, moves an earlier run's files aside or
    compares the config with the saved one, and writes config.json; returns where the run starts."""
    check(workdir)
    verdict: Start | UserError
    try:
        verdict = _prepare(workdir, c, allow_changes) if jax.process_index() == 0 else Start(0, False)
    except UserError as e:
        verdict = e
    if jax.process_count() > 1:
        # The other processes wait for process 0's verdict; should it exit with an error, they fail here, not in
        # the middle of a compiled step.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rlaif_jax.workdir.prepare")
    if isinstance(verdict, UserError):
        raise verdict
    steps = ckpt_lib.saved_steps(workdir)
    return verdict if jax.process_index() == 0 else Start(steps[-1] if steps else 0, bool(steps) and
                                                          steps[-1] >= c.train.steps)


def _prepare(workdir: str, c: ml_collections.ConfigDict, allow_changes: bool) -> Start:
    os.makedirs(workdir, exist_ok=True)
    marker = os.path.join(workdir, MARKER_FILE)
    if not os.path.exists(marker):
        adopted = os.path.exists(os.path.join(workdir, CONFIG_FILE))
        _write_atomic(marker, json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S"), "adopted": adopted}) + "\n")
        if adopted:
            log.info("%s holds a run of an earlier version (no %s): marked as a run folder", workdir, MARKER_FILE)
    steps = ckpt_lib.saved_steps(workdir)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not steps:
        leftovers = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, name))]
        if leftovers:
            aside = os.path.join(workdir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
            while os.path.exists(aside):
                aside += "+"
            os.makedirs(aside)
            for name in leftovers:
                os.replace(os.path.join(workdir, name), os.path.join(aside, name))
            log.warning("%s holds an earlier run's files but no checkpoint to resume them from: moved %s to %s; "
                        "starting afresh", workdir, ", ".join(leftovers), aside)
        _write_atomic(config_path, config_json(c))
        return Start(0, False)

    last = steps[-1]
    if c.train.steps < last:
        raise UserError(f"config.train.steps={c.train.steps} is below the step of the checkpoint in {workdir} ({last}): "
                        f"the run is already past it; set config.train.steps >= {last} to continue it, or use a new "
                        "--workdir", kind="resume")
    if not os.path.exists(config_path):
        log.warning("%s has checkpoints but no %s: the config given now is taken as the run's", workdir, CONFIG_FILE)
    else:
        with open(config_path) as f:
            saved = json.load(f)
        diffs = config_differences(saved, json.loads(config_json(c)))
        computing = {k: v for k, v in diffs.items() if not _allowed(k)}
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
        if computing and not allow_changes:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(computing.items())[:8])
            more = f" and {len(computing) - 8} more" if len(computing) > 8 else ""
            raise UserError(f"the config differs from the one the run in {workdir} was started with, in settings that "
                            f"change what it computes: {shown}{more}; resume with the saved config ({config_path}), "
                            "use a new --workdir, or pass --allow_config_change to continue with the new settings",
                            kind="resume")
        if diffs:
            (log.warning if computing else log.info)("resuming with a changed config%s: %s",
                                                      " (--allow_config_change)" if computing else "", listed)
    _write_atomic(config_path, config_json(c))
    return Start(last, last >= c.train.steps)
