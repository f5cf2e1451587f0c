"""Checkpoints: round trip (PRNG key and extra JSON included), interval and retention, atomicity (a torn
save is ignored), restore onto another mesh shape, and resume after a real SIGKILL of a training process."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlaif_jax import checkpoint, errors, sharding
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**kw):
    c = checkpoint.default_config()
    c.update(kw)
    return c


def test_round_trip_interval_retention(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "rng": jax.random.key(11), "step": jnp.int32(0)}
    with checkpoint.Checkpointer(str(tmp_path), cfg(every_steps=2, max_to_keep=2)) as ckpt:
        assert ckpt.latest_step() is None
        saved = []
        for step in range(1, 8):
            state = {**state, "w": state["w"] + 1, "step": jnp.int32(step)}
            saved.append(ckpt.save(step, state, {"loader": {"epoch": 0, "index": step}}))
        assert ckpt.save(7, state, {"loader": {"epoch": 0, "index": 7}}, force=True)
        ckpt.wait()
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    # a fresh process-level object sees the same checkpoints
    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg(every_steps=2, max_to_keep=2))
    restored, extra = ckpt.restore(6, checkpoint.abstract_state(state))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 6)
    assert int(restored["step"]) == 6 and extra == {"loader": {"epoch": 0, "index": 6}}
    assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(11)))
    ckpt.close()


def test_torn_save_is_ignored(tmp_path):
    state = {"w": jnp.ones((4,))}
    with checkpoint.Checkpointer(str(tmp_path), cfg(every_steps=1)) as ckpt:
        ckpt.save(3, state, {"a": 1})
    ckpt_dir = tmp_path / checkpoint.CHECKPOINT_DIR
    assert sorted(os.listdir(ckpt_dir)) == ["3"]  # the tmp folder was renamed on completion
    # what a save killed midway leaves: a tmp folder with part of the items
    torn = ckpt_dir / "5.orbax-checkpoint-tmp"  # orbax 0.12's name for an unfinished step 5
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "partial").write_bytes(b"\0" * 10)
    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg(every_steps=1))
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    restored, extra = ckpt.restore(3, checkpoint.abstract_state(state))
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    assert extra == {"a": 1}
    # the leftover is removed in the background at start, at the latest before the next save
    assert ckpt.save(4, state, {"a": 2})
    ckpt.close()
    assert not torn.exists() and sorted(os.listdir(ckpt_dir)) == ["3", "4"]


def test_restore_onto_other_mesh(tmp_path):
    w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    b = np.arange(16, dtype=np.float32)
    mesh_a = sharding.make_mesh(2, 2, 2)
    state = {"w": jax.device_put(w, NamedSharding(mesh_a, P(("data", "fsdp"), "tensor"))),
             "b": jax.device_put(b, NamedSharding(mesh_a, P("tensor")))}
    with checkpoint.Checkpointer(str(tmp_path), cfg(every_steps=1)) as ckpt:
        ckpt.save(1, state, {})
    mesh_b = sharding.make_mesh(1, 4, 2)
    targets = {
        "other mesh": {"w": NamedSharding(mesh_b, P("fsdp", "tensor")), "b": NamedSharding(mesh_b, P("fsdp"))},
        "one device": {"w": jax.sharding.SingleDeviceSharding(jax.devices()[3]),
                       "b": jax.sharding.SingleDeviceSharding(jax.devices()[3])},
    }
    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg(every_steps=1))
    for name, shardings in targets.items():
        abstract = checkpoint.with_shardings(jax.eval_shape(lambda: state), shardings)
        restored, _ = ckpt.restore(1, abstract)
        for k in ("w", "b"):
            assert restored[k].sharding == shardings[k], name
            np.testing.assert_array_equal(np.asarray(restored[k]), {"w": w, "b": b}[k])
        # each device holds only its block: the (1, 4, 2) mesh splits w's rows in 4 and columns in 2
        if name == "other mesh":
            assert {s.data.shape for s in restored["w"].addressable_shards} == {(2, 8)}
    ckpt.close()


# A toy deterministic training run with everything a real one resumes: params + Adam state + PRNG key in the
# orbax state, the prompt loader's position in the extra JSON, metrics through MetricsWriter.
TOY_RUN = textwrap.dedent('''
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, optax, datasets
    from typing import Any, NamedTuple
    from rlaif_jax import checkpoint, data, metrics

    workdir, total_steps = sys.argv[1], int(sys.argv[2])

    class TrainState(NamedTuple):
        params: Any
        opt_state: Any
        rng: jax.Array

    rows = [[3 + (7 * i + j) % 13 for j in range(1 + i % 5)] for i in range(10)]
    prompts = data.PromptDataset(datasets.Dataset.from_dict({data.PROMPT_IDS: rows}), max_prompt_len=6,
                                 pad_id=0, num_loaded=10, num_rejected=0, num_truncated=0)
    loader = data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=1)
    opt = optax.adam(0.05)

    def init():
        params = {"emb": jax.random.normal(jax.random.key(0), (16, 4)), "w": jnp.zeros((4,))}
        return TrainState(params, opt.init(params), jax.random.key(42))

    @jax.jit
    def train_step(state, tokens_bp, mask_bp):
        rng, key = jax.random.split(state.rng)
        target_b = jax.random.normal(key, (tokens_bp.shape[0],))
        def loss_fn(params):
            feats_bd = (params["emb"][tokens_bp] * mask_bp[..., None]).sum(1) / mask_bp.sum(1, keepdims=True)
            return jnp.mean((feats_bd @ params["w"] - target_b) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, rng), {"loss": loss, "target_mean": target_b.mean(),
                                                    "token_sum": tokens_bp.sum()}

    ckpt_cfg = checkpoint.default_config()
    ckpt_cfg.every_steps, ckpt_cfg.max_to_keep, ckpt_cfg.async_save = 3, 2, True
    ckpt = checkpoint.Checkpointer(workdir, ckpt_cfg)
    state = init()
    start = ckpt.latest_step() or 0
    if start:
        state, extra = ckpt.restore(start, checkpoint.abstract_state(state))
        loader.restore(extra["loader"])
    print("resumed from", start, flush=True)
    log_cfg = metrics.default_config()
    log_cfg.progress_bar = False
    writer = metrics.MetricsWriter(workdir, log_cfg, start_step=start)
    for step in range(start + 1, total_steps + 1):
        batch = next(loader)
        state, m = train_step(state, batch.tokens_bp, batch.mask_bp)
        writer.write(step, m)
        ckpt.save(step, state, {"loader": loader.state().to_json()}, force=step == total_steps)
        time.sleep(0.05)  # room for the kill to land anywhere in a step, mid-save included
    ckpt.close()
    writer.close()
''')


def _launch(script, workdir, steps):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    return subprocess.Popen([sys.executable, str(script), str(workdir), str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return open(path).read().splitlines() if os.path.exists(path) else []


def test_sigkill_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "toy_run.py"
    script.write_text(TOY_RUN)
    steps = 14
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _launch(script, ref_dir, steps)  # both start together: the machine's cores are few
    run = _launch(script, run_dir, steps)
    deadline = time.time() + 120
    while len(_lines(run_dir)) < 7:  # past the checkpoint of step 6, before the end
        assert run.poll() is None, run.communicate()
        assert time.time() < deadline, "toy run too slow"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL
    assert len(_lines(run_dir)) < steps
    rerun = _launch(script, run_dir, steps)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    resumed_from = int(out.split("resumed from")[1].split()[0])
    # a completed checkpoint, not step 0: the save of step 6 waited for step 3's to finish, and the
    # 7th line was written after it started (the save of 6 itself may still have been in flight)
    assert resumed_from in (3, 6, 9, 12), out
    ref_out, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_err
    assert "resumed from 0" in ref_out
    want = _lines(ref_dir)
    assert len(want) == steps
    assert _lines(run_dir) == want  # every step's metrics, bit for bit


def test_best_policies_keep_the_k_highest_and_survive_a_restart(tmp_path):
    """checkpoint.keep_best: a sequence of evaluation values, hand-ranked: exports happen exactly for the steps that
    enter the top 2, folders falling out are deleted, ties keep the earlier step, a restart reads the ranking back."""
    exported = []

    def export(folder):
        os.makedirs(folder)
        open(os.path.join(folder, "config.json"), "w").write("{}")
        exported.append(int(folder.rsplit("_", 1)[1]))

    best = checkpoint.BestPolicies(str(tmp_path), cfg(keep_best=2, best_metric="eval/win_rate"))
    for step, value in ((10, 0.50), (20, 0.40), (30, 0.70), (40, 0.45), (50, 0.50)):
        best.consider(step, {"eval/win_rate": value, "loss": 1.0}, export)
    # 10 enters, 20 enters, 30 enters (20 out), 40 does not enter, 50 ties with 10 and loses to the earlier step
    assert exported == [10, 20, 30]
    folder = tmp_path / checkpoint.BEST_DIR
    assert sorted(os.listdir(folder)) == ["index.json", "step_10", "step_30"]
    restarted = checkpoint.BestPolicies(str(tmp_path), cfg(keep_best=2, best_metric="eval/win_rate"))
    assert [(e["step"], e["value"]) for e in restarted.kept] == [(30, 0.70), (10, 0.50)]
    assert restarted.consider(60, {"eval/win_rate": 0.6}, export) and exported[-1] == 60
    assert sorted(os.listdir(folder)) == ["index.json", "step_30", "step_60"]
    with pytest.raises(errors.ConfigError, match="best_metric='eval/win_rate' is not among"):
        restarted.consider(70, {"eval/judge_score": 1.0}, export)
    assert not checkpoint.BestPolicies(str(tmp_path / "off"), cfg()).consider(1, {}, export)
