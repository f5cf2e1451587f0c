"""metrics.jsonl writing and resume truncation, value conversion, sample tables, wandb offline."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import metrics


def cfg(**kw):
    c = metrics.default_config()
    c.progress_bar = False
    c.update(kw)
    return c


def lines(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
        return [json.loads(x) for x in f]


def test_to_floats_one_dict():
    out = metrics.to_floats({"a": jnp.float32(0.5), "b": np.array([2.25]), "n": 3, "c": jnp.int32(7)})
    assert out == {"a": 0.5, "b": 2.25, "n": 3, "c": 7}
    assert type(out["a"]) is float and type(out["c"]) is int
    with pytest.raises(ValueError, match="scalars"):
        metrics.to_floats({"v": jnp.ones(3)})


def test_jsonl_lines_and_resume_truncation(tmp_path):
    wd = str(tmp_path / "run")
    w = metrics.MetricsWriter(wd, cfg(progress_bar=True), total_steps=6)
    for s in range(1, 6):
        got = w.write(s, {"loss": jnp.float32(1.0 / s), "kl": s * 0.25})
        assert got["loss"] == pytest.approx(1.0 / s)
    w.write(4, {"eval/judge_score": 0.5})  # a second line for an eval step
    # each line is on disk as soon as it is written (flushed), before close
    assert [r["step"] for r in lines(wd)] == [1, 2, 3, 4, 5, 4]
    w.close()
    # simulate a SIGKILL that tore the last line
    with open(os.path.join(wd, metrics.METRICS_FILE), "a") as f:
        f.write('{"step": 6, "lo')
    w = metrics.MetricsWriter(wd, cfg(), start_step=3)  # the checkpoint restored is step 3
    assert [r["step"] for r in lines(wd)] == [1, 2, 3]
    assert lines(wd)[2] == {"step": 3, "loss": pytest.approx(1 / 3), "kl": 0.75}
    w.write(4, {"loss": 0.25, "kl": 1.0})
    w.close()
    assert [r["step"] for r in lines(wd)] == [1, 2, 3, 4]


def test_samples_and_non_main(tmp_path):
    wd = str(tmp_path / "run")
    w = metrics.MetricsWriter(wd, cfg())
    rows = [{"prompt": "p", "response": "r", "judge_score": np.float32(0.75),
             "criteria": {"helpful": 1.0, "honest": jnp.float32(0.5)}}]
    path = w.write_samples(12, rows)
    assert path.endswith(os.path.join("samples", "step_000012.jsonl"))
    assert [json.loads(x) for x in open(path)] == [
        {"prompt": "p", "response": "r", "judge_score": 0.75, "criteria": {"helpful": 1.0, "honest": 0.5}}]
    w.write_samples(20, rows)
    w.close()
    # resuming at step 15 drops the sample table written after it
    metrics.MetricsWriter(wd, cfg(), start_step=15).close()
    assert sorted(os.listdir(os.path.join(wd, "samples"))) == ["step_000012.jsonl"]
    other = str(tmp_path / "other")
    w = metrics.MetricsWriter(other, cfg(), is_main=False)
    assert w.write(1, {"x": 1.0}) == {"x": 1.0} and w.write_samples(1, rows) is None
    w.close()
    assert not os.path.exists(other)


def test_wandb_offline_writes_run_folder(tmp_path, monkeypatch):
    # conftest disables wandb through the environment; the config must be what decides here.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "")  # no credentials, no network: offline must not need them
    wd = str(tmp_path / "run")
    w = metrics.MetricsWriter(wd, cfg(wandb_mode="offline"), {"lr": 1e-3, "data": {"seed": 1}})
    run_id = open(os.path.join(wd, metrics.WANDB_ID_FILE)).read().strip()
    assert w.wandb_run.id == run_id
    w.write(1, {"judge_score": jnp.float32(0.5)})
    w.write_samples(1, [{"prompt": "p", "response": "r", "judge_score": 0.5, "criteria": {"a": 1.0}}])
    w.close()
    runs = [d for d in os.listdir(os.path.join(wd, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    files = os.listdir(os.path.join(wd, "wandb", runs[0]))
    assert f"run-{run_id}.wandb" in files
    assert os.path.getsize(os.path.join(wd, "wandb", runs[0], f"run-{run_id}.wandb")) > 0
