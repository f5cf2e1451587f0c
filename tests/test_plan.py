"""Plan mode of the training program (`--plan`): ahead-of-time compiles on simulated devices, memory per program,
fit. Split from tests/test_train.py (same tiny world and command line) so that the two run on two test workers at
once."""
import subprocess

import pytest

from tests import tiny
from tests.test_train import ROOT, command, env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    tiny.make_world(root)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def plan(world, cache_dir, *overrides, devices):
    out = subprocess.run(command(world, "/nonexistent", "--plan", f"--plan_devices={devices}", *overrides),
                         env=env(cache_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_plan_small_mesh(world, cache_dir):
    """Also plan mode's scaling check (--plan_scaling: the step compiled again with the fsdp axis halved), tested
    here on the tiny world rather than at pod scale, where it would compile the 8B plan a second time."""
    out = plan(world, cache_dir, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
               "--device_memory_gib=1e-6", "--plan_scaling", devices=8)
    print(out)
    peak = float(out.split("peak")[1].split()[0])
    assert "8 devices {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    assert peak > 1e-6 and "of 1e-06: DOES NOT FIT" in out  # (tests/test_plan_pod.py checks "fits" at pod scale)
    line = next(line for line in out.splitlines() if line.startswith("scaling:"))
    half, full = float(line.split("peak ")[1].split()[0]), float(line.split("-> ")[1].split()[0])
    assert "on 4 devices" in line and full == pytest.approx(peak, rel=1e-3) and full < half
    assert line.endswith("falls")


def test_plan_host_judge_path_compiles_its_three_programs(world, cache_dir, tmp_path):
    """A judge whose tokenizer differs from the policy's: plan mode compiles the rollout, the judge forward over
    re-tokenised rows and the learn phase, one by one, and reports each one's memory."""
    judge = tiny.write_judge_with_other_tokenizer(str(tmp_path / "other_judge"))
    out = plan(world, cache_dir, f"--config.judge.path={judge}", "--config.train.allow_tokenizer_mismatch=True",
               "--config.mesh.data=2", devices=2)
    assert "judge (pointwise, host path), 2 devices" in out
    rows = {line.split()[0]: [float(x) for x in line.split()[-5:]] for line in out.splitlines()
            if line.strip().startswith(("rollout", "learn", "judge forward"))}
    assert set(rows) == {"rollout", "learn", "judge"}
    # arguments, outputs, donated, temporaries, peak; only the learn phase donates (the train state).
    assert rows["learn"][2] > 0 and rows["rollout"][2] == rows["judge"][2] == 0
    for arguments, outputs, donated, temporaries, peak in rows.values():  # printed to 4 digits
        assert peak == pytest.approx(arguments + outputs - donated + temporaries, rel=3e-3, abs=1e-9)
    assert f"peak (the largest program's) {max(r[4] for r in rows.values()):.4g}" in out and "fits" in out


def test_step_flops_count_the_forwards_the_step_runs():
    """plan.step_flops, by hand: the reference's forward only where a KL is weighted, no forward for the "old"
    log-probs (the sampler's), a value-head critic's forward of the policy."""
    import types

    from rlaif_jax import config as config_lib
    from rlaif_jax import plan as plan_lib
    from rlaif_jax import train_step as ts
    from rlaif_jax.models.config import ModelConfig

    m = ModelConfig(family="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=4)
    Np = 2 * (2 * 8 * 2 * 4 + 2 * 8 * 1 * 4 + 3 * 8 * 16) + 8 * 100  # q, o; k, v; gate, up, down; LM head
    assert plan_lib.matmul_params(m) == Np
    c = config_lib.base_config()
    c.train.batch_size, c.rollout.n_samples, c.data.max_prompt_len, c.rollout.max_new_tokens = 4, 2, 5, 3
    c.algo.epochs, c.critic.kind, c.reward.kl_coef = 2, "none", 0.0
    spec = types.SimpleNamespace(mode="rubric", queries_per_example=3, max_len=20)
    seq = 4 * 2 * (5 + 3)
    flops = plan_lib.step_flops(c, ts.Models(policy=m, judge=m), spec)
    assert flops == {"rollout": 2 * Np * (4 * 5 + 8 * 3), "judge": 2 * Np * 8 * 3 * 20, "update": 2 * 3 * 2 * Np * seq}
    c.reward.kl_coef, c.critic.kind = 0.05, "value_head"
    flops = plan_lib.step_flops(c, ts.Models(policy=m, judge=m), spec)
    assert flops["reference"] == flops["value-head forward"] == 2 * Np * seq


def test_attention_kernels_refused_off_their_backend_and_planned_chunked():
    """compute.attention names a kernel: training on this CPU refuses it in one line (train.launch calls the check
    with the config's validation: tests/test_errors.py); plan mode (which compiles here for an accelerator)
    accepts it and plans it with "chunked" (memory linear in T, as the kernel's), refusing only cuDNN in float32;
    "fused" trains here as "chunked"."""
    from rlaif_jax import builder
    from rlaif_jax.config import base_config
    c = base_config()
    c.policy.dtype = c.judge.dtype = "bfloat16"  # cuDNN's kernels'
    for kernel in ("splash", "cudnn"):
        c.compute.attention = kernel
        with pytest.raises(ValueError, match=f"attention='{kernel}' is the (TPU|GPU) kernel; this backend is cpu"):
            builder.check_attention(c)
        builder.check_attention(c, plan=True)
        assert builder._attention(c, weights=False) == "chunked"
    c.judge.dtype = "float32"
    with pytest.raises(ValueError, match="bfloat16 and float16 kernels only; the model computes in float32"):
        builder.check_attention(c, plan=True)
    c.compute.attention = "fused"
    builder.check_attention(c)
    assert builder._attention(c, weights=True) == "fused" and builder._attention(c, weights=False) == "chunked"
