"""Bad inputs to the training program, run in-process (`train.launch`): each ends with exit code 2 and one line
`FATAL <kind> error: ...` naming the setting, file or line, no traceback, and (all of these) before any weights
load or anything compiles. Also the workdir's guarantees (workdir.py) and the signal handling of the loop."""
import json
import os
import shutil
import signal

import pytest

from rlaif_jax import builder, errors, train
from rlaif_jax import workdir as workdir_lib
from rlaif_jax.models import hf
from tests import tiny, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world of tests/tiny.py and broken copies of its files."""
    root = str(tmp_path_factory.mktemp("world"))
    tiny.make_world(root)
    policy = os.path.join(root, "policy")
    broken = {}
    for name in ("truncated", "bad_header", "no_tokenizer", "bad_config"):
        broken[name] = shutil.copytree(policy, os.path.join(root, name))
    weights = os.path.join(broken["truncated"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with open(os.path.join(broken["bad_header"], "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"}{ not json")
    for name in os.listdir(broken["no_tokenizer"]):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(broken["no_tokenizer"], name))
    with open(os.path.join(broken["bad_config"], "config.json"), "w") as f:
        f.write('{"model_type": "llama", ')
    files = {"empty": "", "malformed": '{"prompt": "a b"}\n{"prompt": "c d"}\n{"prompt": "e f"\n',
             "latin1": '{"prompt": "a b"}\n{"prompt": "caf\xe9"}\n'}
    for name, text in files.items():
        with open(os.path.join(root, name + ".jsonl"), "wb") as f:
            f.write(text.encode("latin-1"))
    return root


def config(world, **overrides):
    c = tiny_config.get_config(world)
    c.unlock()
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value.format(world=world) if isinstance(value, str) else value
    c.lock()
    return c


@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights or building the step fails the test: these errors must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the error was found")
    monkeypatch.setattr(builder, "build", refuse)
    monkeypatch.setattr(hf, "load_model", refuse)


def launch_expecting_error(capsys, c, workdir, **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.launch(c, str(workdir), **kwargs)
    err = capsys.readouterr().err
    assert exit_info.value.code == errors.EXIT_CODE
    assert "Traceback" not in err
    fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and err.rstrip().endswith(fatal[0]), err[-2000:]
    return fatal[0]


CASES = [
    # config: ranges of numeric settings, sampling settings, empty paths
    ({"train.batch_size": 0}, "config", "config.train.batch_size=0"),
    ({"train.batch_size": -8}, "config", "config.train.batch_size=-8"),
    ({"optim.grad_accum": 0}, "config", "config.optim.grad_accum=0 must be >= 1"),
    ({"checkpoint.every_steps": 0}, "config", "config.checkpoint.every_steps=0 must be >= 1"),
    ({"rollout.top_p": 0.0}, "config", "rollout.top_p=0.0 must be in (0, 1]"),
    ({"optim.learning_rate": float("nan")}, "config", "config.optim.learning_rate=nan must be finite and > 0"),
    ({"reward.kl_coef": -1.0}, "config", "reward.kl_coef"),
    ({"eval.every": -1}, "config", "config.eval.every=-1 must be >= 0"),
    ({"train.max_consecutive_skipped": -1}, "config", "config.train.max_consecutive_skipped=-1 must be >= 0"),
    ({"policy.path": ""}, "config", "config.policy.path is empty"),
    # settings added for pod-scale runs: a kernel this machine cannot run, critic LoRA without a separate critic
    ({"compute.attention": "splash"}, "config", "config.compute.attention='splash' is the TPU kernel; this backend"),
    ({"critic.lora_rank": 2}, "config", "config.critic.lora_rank=2 adapts a separate critic's backbone"),
    # model folders: missing, truncated or corrupt weights, corrupt config.json, no tokenizer
    ({"policy.path": "{world}/nowhere"}, "model", "config.policy.path='"),
    ({"judge.path": "{world}/truncated"}, "model", "truncated/model.safetensors is truncated"),
    ({"policy.path": "{world}/bad_header"}, "model", "bad_header/model.safetensors is not a readable safetensors"),
    ({"policy.path": "{world}/bad_config"}, "model", "bad_config/config.json is not valid JSON"),
    ({"policy.path": "{world}/no_tokenizer"}, "model", "no tokenizer files in"),
    # data files: missing, empty, a malformed record, a wrong encoding, a missing column, every prompt cut
    ({"data.path": "{world}/nowhere.jsonl"}, "data", "config.data.path='"),
    ({"data.path": "{world}/empty.jsonl"}, "data", "empty.jsonl is empty"),
    ({"data.path": "{world}/malformed.jsonl"}, "data", "malformed.jsonl:3: not a JSON record"),
    ({"data.path": "{world}/latin1.jsonl"}, "data", "latin1.jsonl:2: not UTF-8 text"),
    ({"data.prompt_field": "text"}, "data", "prompt column(s) ['text'] not in the dataset columns"),
    ({"data.max_prompt_len": 1}, "data", "is longer than config.data.max_prompt_len=1 tokens"),
]


@pytest.mark.parametrize("overrides,kind,message", CASES, ids=[f"{k}:{list(o)[0]}" for o, k, _ in CASES])
def test_bad_input_is_one_line_before_loading(world, tmp_path, capsys, no_loading, overrides, kind, message):
    line = launch_expecting_error(capsys, config(world, **overrides), tmp_path / "run")
    assert line.startswith(f"FATAL {kind} error: ")
    assert message.format(world=world) in line


def test_bad_keep_freed_memory_value_is_one_line_before_loading(world, tmp_path, capsys, no_loading, monkeypatch):
    """RLAIF_JAX_KEEP_FREED_MEMORY (host_memory.py, read on import) takes 1, 0 or nothing; "off" would otherwise
    have read as "on"."""
    monkeypatch.setenv("RLAIF_JAX_KEEP_FREED_MEMORY", "off")
    line = launch_expecting_error(capsys, config(world), tmp_path / "run")
    assert line == ("FATAL config error: RLAIF_JAX_KEEP_FREED_MEMORY='off' must be 1 (keep freed memory) or 0 / "
                    "unset (glibc's defaults)")


def test_remat_on_a_scan_that_loops_once_is_one_line_before_weights_load(world, tmp_path, capsys, monkeypatch):
    """compute.remat with compute.scan_unroll = the tiny policy's 2 layers: the scan would loop once, and XLA would
    merge the recomputation with the forward (tests/test_models.py measures it). The build refuses it from the
    model's config.json, before any weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the error was found")
    monkeypatch.setattr(hf, "load_model", refuse)
    line = launch_expecting_error(capsys, config(world, **{"compute.remat": "full", "compute.scan_unroll": 2}),
                                  tmp_path / "run")
    assert line == ("FATAL config error: config.compute on the model of config.policy.path: remat='full' needs the "
                    "layer scan to loop at least twice: num_layers=2 with scan_unroll=2 loops once, and XLA then merges "
                    "the recomputation with the forward (no memory saved); use scan_unroll <= 1 or remat='none'")


def test_workdir_holding_a_model_is_refused(world, tmp_path, capsys, no_loading):
    model = shutil.copytree(os.path.join(world, "policy"), str(tmp_path / "model"))
    before = {n: open(os.path.join(model, n), "rb").read() for n in os.listdir(model)}
    line = launch_expecting_error(capsys, config(world), model)
    assert line.startswith("FATAL workdir error:") and "model.safetensors" in line and "config.json" in line
    assert {n: open(os.path.join(model, n), "rb").read() for n in os.listdir(model)} == before


@pytest.mark.parametrize("layout,message", [
    ("file", "is a file"),
    ("unknown", "is not empty and holds no run (notes.txt)"),
])
def test_workdir_that_is_not_a_run_folder_is_refused(world, tmp_path, capsys, no_loading, layout, message):
    workdir = tmp_path / "run"
    if layout == "file":
        workdir.write_text("x")
    else:
        workdir.mkdir()
        (workdir / "notes.txt").write_text("mine")
    assert message in launch_expecting_error(capsys, config(world), workdir)


def fake_run_folder(workdir, c, steps=(2, 4), metrics_lines=5):
    """A marked workdir as a run leaves it: config.json, metrics and (empty) checkpoint folders of `steps`."""
    os.makedirs(workdir)
    open(os.path.join(workdir, workdir_lib.MARKER_FILE), "w").write("{}\n")
    open(os.path.join(workdir, "config.json"), "w").write(workdir_lib.config_json(c))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s}) + "\n" for s in range(metrics_lines))
    for s in steps:
        os.makedirs(os.path.join(workdir, "checkpoints", str(s)))
    return str(workdir)


@pytest.mark.parametrize("overrides,message", [
    ({"train.steps": 3}, "config.train.steps=3 is below the step of the checkpoint"),
    ({"train.batch_size": 16}, "train.batch_size: 8 -> 16; resume with the saved config"),
    ({"policy.path": "{world}/bad_header"}, "bad_header"),  # checked before the resume, as a model error
])
def test_resume_refuses_what_changes_the_run(world, tmp_path, capsys, no_loading, overrides, message):
    workdir = fake_run_folder(tmp_path / "run", config(world))
    line = launch_expecting_error(capsys, config(world, **overrides), workdir)
    assert message in line
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == workdir_lib.config_json(config(world))  # unchanged


def test_resume_allows_harmless_changes_and_records_them(world, tmp_path, caplog):
    workdir = fake_run_folder(tmp_path / "run", config(world))
    changed = config(world, **{"train.steps": 9, "eval.every": 2})
    with caplog.at_level("INFO", logger="rlaif_jax"):
        assert workdir_lib.prepare(workdir, changed) == workdir_lib.Start(4, False)
    assert "eval.every: 3 -> 2" in caplog.text and "train.steps: 6 -> 9" in caplog.text
    # With the explicit flag a change of what the run computes passes too, with a warning; config.json follows.
    bigger = config(world, **{"train.batch_size": 16})
    with pytest.raises(errors.UserError, match="--allow_config_change"):
        workdir_lib.prepare(workdir, bigger)
    assert workdir_lib.prepare(workdir, bigger, allow_changes=True).step == 4
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["batch_size"] == 16


def test_finished_workdir_without_checkpoints_is_moved_aside_not_truncated(world, tmp_path):
    """The data loss of issue 18: checkpoints/ gone, a new run truncated metrics.jsonl and overwrote the rest."""
    workdir = fake_run_folder(tmp_path / "run", config(world), steps=())
    os.makedirs(os.path.join(workdir, "final_policy"))
    assert workdir_lib.prepare(workdir, config(world)) == workdir_lib.Start(0, False)
    (aside,) = [n for n in os.listdir(workdir) if n.startswith("previous-")]
    assert sorted(os.listdir(os.path.join(workdir, aside))) == ["config.json", "final_policy", "metrics.jsonl"]
    with open(os.path.join(workdir, aside, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 5
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_signal_asks_the_loop_to_stop_and_a_second_one_acts_at_once():
    preemption = train.Preemption()
    try:
        assert not preemption.requested(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.requested(2) and preemption.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the default handler is back
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_consecutive_skipped_updates_stop_the_run(world):
    """4 updates per step (algo.epochs=4): a step with any kept update resets the count; the limit stops the run."""
    c = config(world, **{"train.max_consecutive_skipped": 8})
    assert c.algo.epochs * c.algo.minibatches == 4
    in_a_row = train.count_skipped(c, 1, 4, 0)
    assert in_a_row == 4
    assert train.count_skipped(c, 2, 3, in_a_row) == 0
    with pytest.raises(errors.UserError, match=r"the last 8 optimizer updates \(up to step 3\) were all skipped") as e:
        train.count_skipped(c, 3, 4, in_a_row)
    assert e.value.kind == "training"
    off = config(world, **{"train.max_consecutive_skipped": 0})
    assert train.count_skipped(off, 3, 4, 10**6) == 10**6 + 4
