"""Test setup: 8 fake CPU devices, configured before jax is first imported anywhere; subprocesses import this
checkout's package; one persistent compilation cache for the session; the test files dealt slowest first."""
import gc
import os

# XLA:CPU's loop emitters instead of its MLIR fusion emitters: compiling is most of the suite's time, and the
# fusion emitters' MLIR pipelines were most of that (perf). With the setting XLA's compile time in the suite fell
# from 428 to 172 s and the suite from 532 to 340 s (2 cores, 2026-12-06, with the gc.freeze below). Same
# tolerances; the benchmarks and the demo run XLA's defaults.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA without its expensive optimisation passes (LLVM at -O0), here and in the subprocesses the tests start: the
# tests' programs are tiny, so compiling them is most of the suite's time, and this halves it (the smoke run of
# scripts/rlaif_vs_rlhf.py: 75 -> 46 s). What a program computes is unchanged up to float reassociation, which
# the tests' tolerances cover; comparisons of two runs for equality run both under the same setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The scripts and training programs the tests start as subprocesses import this checkout's package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a program a test starts: the suite's flags, on `devices` CPU devices (the last flag wins)."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # parity tests compare f32 to 1e-4

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the session, shared by the pytest-xdist workers: a program that
    several tests build afresh (each stage launch, each `builder.build` of the same config) compiles once and is
    then loaded from disk. A hit is the program compiled from the same HLO and options, so what runs is unchanged;
    only the compile time goes. Programs under 0.1 s are not worth a file."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder above each worker's own
    settings = {"jax_compilation_cache_dir": str(root / "xla_cache"),
                "jax_persistent_cache_min_compile_time_secs": 0.1, "jax_persistent_cache_min_entry_size_bytes": 0}
    for name, value in settings.items():
        jax.config.update(name, value)
    cc.reset_cache()  # a program compiled during collection may have found the cache off
    yield


# The test files, slowest first (as measured on a 2-core machine, 2026-12). scripts/test.sh hands whole files to 2
# workers in collection order (--dist loadfile --no-loadscope-reorder): starting with the longest files and ending
# with the short ones keeps both workers busy to the end; a long file dealt last would run alone. Files not listed
# come after these, in their usual order: add a new slow file here.
SLOWEST_FIRST = ("test_train_step.py", "test_train.py", "test_plan_pod.py", "test_rlaif_vs_rlhf.py",
                 "test_train_step_pairwise.py", "test_judging.py", "test_plan.py", "test_models.py", "test_sweep.py",
                 "test_demo.py", "test_reward_model.py", "test_remote_judge.py", "test_rollout.py", "test_testbed.py",
                 "test_sft.py", "test_sft_packing.py", "test_conformance.py", "test_reward_functions.py",
                 "test_reward_rules.py", "test_independent_eval.py", "test_checkpoint.py", "test_lora.py")


def pytest_collection_finish(session):
    # Tracing makes many short-lived Python objects, and each of the collector's full passes walks the large heap
    # of the modules loaded by now (jax, transformers, torch): ~5% of a step test's time in perf. Exempt that heap
    # from collection, and collect the young generation less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
