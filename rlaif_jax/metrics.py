"""Run logging: workdir/metrics.jsonl (always), wandb (disabled / offline / online), a progress bar, and
sample tables.

metrics.jsonl holds one JSON object per `write` call: {"step": s, <name>: float, ...}, flushed at once, and
nothing that depends on wall time, so a resumed run's file equals an uninterrupted run's. On resume
(`start_step=k`) lines with step > k, left by the killed run after its last checkpoint, and a torn last
line are dropped before anything is appended. Timing goes to the progress bar and to wandb only.

Only process 0 writes; every process may call the methods.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_MODES = ("disabled", "offline", "online")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.wandb_mode = "disabled"  # "disabled" | "offline" (no network; `wandb sync` later) | "online"
    c.wandb_project = "rlaif_jax"
    c.wandb_entity = ""  # "" = the account's default entity
    c.wandb_name = ""  # run name; "" = the workdir's base name
    c.wandb_group = ""
    c.wandb_tags = ""  # comma-separated
    c.progress_bar = True
    # Metrics shown in the progress bar's postfix, when present.
    c.progress_keys = "judge/score,kl/k1,response/length,eval/judge_score,eval/gt/pass_rate"
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError with what to change when the `logging` section is inconsistent."""
    if cfg.wandb_mode not in WANDB_MODES:
        raise ValueError(f"config.logging.wandb_mode={cfg.wandb_mode!r}; use one of {WANDB_MODES}")
    if cfg.wandb_mode != "disabled" and not cfg.wandb_project:
        raise ValueError("config.logging.wandb_project is empty; name the wandb project (or set "
                         "config.logging.wandb_mode='disabled')")


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """{name: scalar jax/numpy/python value} -> {name: float or int}, with one device_get for the dict."""
    host = jax.device_get(dict(metrics))
    out: dict[str, float | int] = {}
    for name, value in host.items():
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"metric {name!r} has shape {arr.shape}; metrics must be scalars")
        item = arr.reshape(()).item()
        out[name] = item if type(item) is int else float(item)  # counts stay ints, the rest floats
    return out


def _json_line(record: Mapping[str, Any]) -> str:
    # NaN / inf are written as the bare tokens Python's json reads back (allow_nan), one record per line.
    return json.dumps(record, sort_keys=False) + "\n"


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn (unparsable) line, as a SIGKILL can leave, is skipped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                continue  # a torn last line
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: str, last_step: int) -> int:
    """Rewrites `path` keeping complete lines with step <= last_step (atomically); returns lines kept."""
    if not os.path.exists(path):
        return 0
    kept = [r for r in read_metrics(path) if int(r.get("step", -1)) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(_json_line(r) for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept)


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(v).tolist()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class MetricsWriter:
    """Appends metrics to workdir/metrics.jsonl, mirrors them to wandb, and drives a progress bar.

    Args:
      workdir: the run's folder (created if missing).
      cfg: the `logging` config section (`default_config()`).
      config_dict: the full experiment config, recorded in wandb.
      start_step: the step the run resumes after (0 for a fresh run); later lines are dropped.
      total_steps: for the progress bar's ETA.
      is_main: whether this process writes (default: process 0).
    """

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict, config_dict: Mapping[str, Any] | None = None,
                 *, start_step: int = 0, total_steps: int | None = None, is_main: bool | None = None):
        validate_config(cfg)
        self.workdir = workdir
        self.cfg = cfg
        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        self.path = os.path.join(workdir, METRICS_FILE)
        self.step = start_step
        self._file = None
        self._wandb_run = None
        self._bar = None
        self._last_time, self._last_step = time.perf_counter(), start_step
        if not self.is_main:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._drop_samples_after(start_step)
        self._file = open(self.path, "a")
        if cfg.wandb_mode != "disabled":
            self._wandb_run = self._init_wandb(config_dict)
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    # --- wandb
    def _init_wandb(self, config_dict: Mapping[str, Any] | None):
        import wandb

        # The run id lives in the workdir so a restarted run continues the same wandb run.
        id_path = os.path.join(self.workdir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            run_id = open(id_path).read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # wandb run ids: lowercase letters and digits
            with open(id_path, "w") as f:
                f.write(run_id)
        tags = [t for t in self.cfg.wandb_tags.split(",") if t]
        if hasattr(config_dict, "to_dict"):  # a ConfigDict: nested sections become nested dicts
            config_dict = config_dict.to_dict()
        return wandb.init(
            project=self.cfg.wandb_project, entity=self.cfg.wandb_entity or None,
            name=self.cfg.wandb_name or os.path.basename(os.path.abspath(self.workdir)),
            group=self.cfg.wandb_group or None, tags=tags or None, config=dict(config_dict or {}),
            dir=self.workdir, id=run_id, resume="allow", mode=self.cfg.wandb_mode,
        )

    @property
    def wandb_run(self):
        return self._wandb_run

    # --- per-step metrics
    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Records `metrics` (scalars, jax arrays welcome) for `step`; returns them as Python numbers.

        Eval metrics may go in the same call or in a second call for the same step (a second line).
        """
        values = to_floats(metrics)
        if not self.is_main:
            return values
        record = {"step": int(step), **values}
        self._file.write(_json_line(record))
        self._file.flush()
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9) if step > self._last_step else None
        if self._wandb_run is not None:
            extra = {"perf/steps_per_sec": rate} if rate is not None else {}
            self._wandb_run.log({**values, **extra}, step=int(step))
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            keys = [k for k in self.cfg.progress_keys.split(",") if k in values]
            if keys:
                self._bar.set_postfix({k: _short(values[k]) for k in keys}, refresh=False)
        if step > self._last_step:
            self._last_time, self._last_step = now, step
        self.step = max(self.step, int(step))
        return values

    # --- sample tables
    def _samples_path(self, step: int) -> str:
        return os.path.join(self.workdir, SAMPLES_DIR, f"step_{step:06d}.jsonl")

    def _drop_samples_after(self, step: int) -> None:
        folder = os.path.join(self.workdir, SAMPLES_DIR)
        if not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            m = re.fullmatch(r"step_(\d+)\.jsonl", name)
            if m and int(m.group(1)) > step:
                os.remove(os.path.join(folder, name))

    def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """Writes a table of samples, e.g. {prompt, response, judge_score, criteria: {name: score}}, to
        workdir/samples/step_XXXXXX.jsonl and as a wandb.Table (nested dicts become "criteria/name" columns).
        Returns the file's path (None on other processes)."""
        if not self.is_main:
            return None
        rows = [_plain(r) for r in rows]
        path = self._samples_path(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)
        if self._wandb_run is not None and rows:
            import wandb

            flat = [_flatten(r) for r in rows]
            columns = list(dict.fromkeys(k for r in flat for k in r))
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat])
            self._wandb_run.log({"samples": table}, step=int(step))
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(v: float | int) -> str:
    if isinstance(v, int) or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return str(v)
    return f"{v:.4g}"
