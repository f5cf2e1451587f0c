"""SFT (rlaif_jax/sft.py): the completion loss against torch's cross-entropy, the loss falling on a tiny task, the
export read by transformers with our logits, resume after a preemption stop and after a crash equal to an
uninterrupted run, the command line, and the refusals of validation."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rlaif_jax import checkpoint as ckpt_lib
from rlaif_jax import data as data_lib
from rlaif_jax import errors, sft
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from tests import tiny, tiny_sft_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_sft_config.py")


def write_sft_data(path: str, n: int = 8, seed: int = 0) -> str:
    """Prompt/completion records of 1-4 content words; the completion is the prompt's words reversed."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [str(w) for w in rng.choice(tiny.CONTENT, size=rng.integers(1, 5))]
            f.write(json.dumps({"prompt": " ".join(words), "completion": " ".join(reversed(words))}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sft_world"))
    tiny.write_policy(os.path.join(root, "policy"))
    write_sft_data(os.path.join(root, "sft.jsonl"))
    return root


def metric_lines(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return open(path).read().splitlines() if os.path.exists(path) else []


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """The tiny config's run (16 steps, checkpoints every 4) twice, in this process: interrupted twice and resumed,
    and uninterrupted. Returns (interrupted workdir, uninterrupted one).

    The interrupted run is first stopped by SIGTERM (the stage's preemption stop) after step 2, then dies at step
    11, after the lines of steps 9 and 10 and before any checkpoint past step 8: a KeyboardInterrupt raised where
    step 11 is written (not an Exception: nothing on the way may catch it), so the last launch must go back to the
    checkpoint of step 8 and drop the two lines after it. In-process, not a SIGKILLed subprocess: the subprocess
    cost a start-up and a compile of its own (about half this file's time) for a run that stops the same way;
    what SIGKILL adds (nothing cleaned up, a checkpoint half written) is the checkpointer's, which SFT shares
    with the training program (`Checkpointer.resume`), whose SIGKILL tests/test_train.py sends."""
    from rlaif_jax import metrics as metrics_lib

    killed, full = str(tmp_path_factory.mktemp("killed")), str(tmp_path_factory.mktemp("full"))
    config = tiny_sft_config.get_config(world)
    write, handler = metrics_lib.MetricsWriter.write, signal.getsignal(signal.SIGTERM)

    def interrupts(self, step, metrics):
        if step == 11:
            raise KeyboardInterrupt("killed")
        values = write(self, step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the stage's handler: it stops after this step
        return values

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(metrics_lib.MetricsWriter, "write", interrupts)
        assert sft.launch(config, killed) == 128 + signal.SIGTERM
        assert len(metric_lines(killed)) == 2 and ckpt_lib.saved_steps(killed) == [2]  # a checkpoint of step 2
        with pytest.raises(KeyboardInterrupt):
            sft.launch(config, killed)
    assert signal.getsignal(signal.SIGTERM) is handler  # the stage put the previous handler back
    assert len(metric_lines(killed)) == 10 and max(ckpt_lib.saved_steps(killed)) == 8
    assert not os.path.exists(os.path.join(killed, "final_policy"))
    assert sft.launch(config, killed) == 0
    assert sft.launch(config, full) == 0
    return killed, full


def test_completion_loss_is_torch_cross_entropy_over_completion_tokens_only(world):
    import torch
    import transformers

    c = tiny_sft_config.get_config(world)
    tok = hf.load_tokenizer(c.policy.path)
    loader, _ = data_lib.load_prompts(c.data, tok, 8, process_index=0, process_count=1)
    b = next(loader)
    cfg, params = hf.load_model(c.policy.path)
    ours = float(sft.completion_loss(params, cfg, b.tokens_bp, b.mask_bp, b.reference_bf, b.reference_mask_bf))

    # Reference: each example alone, unpadded, through HF transformers; the cross-entropy of its completion tokens
    # (then EOS) given the prompt, summed over the batch and divided by the batch's completion tokens.
    model = transformers.AutoModelForCausalLM.from_pretrained(c.policy.path, attn_implementation="eager").eval()
    rows = loader.prompts.rows(b.index_b)
    nll, count = 0.0, 0
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        nll += torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], ids[0, len(prompt):],
                                                 reduction="sum").item()
        count += len(completion)
    assert len({len(r["completion"].split()) for r in rows}) > 1  # completions of several lengths: padding matters
    assert b.mask_bp.sum() < b.mask_bp.size  # and prompts too
    np.testing.assert_allclose(ours, nll / count, rtol=1e-5)


def test_loss_falls_on_a_tiny_task(runs):
    _, full = runs
    records = [json.loads(line) for line in metric_lines(full)]
    assert [r["step"] for r in records] == list(range(1, 17))
    losses = [r["sft/loss"] for r in records]
    assert np.mean(losses[-2:]) < 0.25 * losses[0], losses  # memorised
    assert all(r["guard/skipped_updates"] == 0 for r in records)
    assert records[0]["optim/learning_rate"] == 0.0 and records[2]["optim/learning_rate"] == pytest.approx(3e-2)
    assert all(r["sft/completion_tokens"] > 8 for r in records)


def test_resume_after_interruptions_equals_the_uninterrupted_run(runs):
    killed, full = runs
    assert metric_lines(killed) == metric_lines(full)  # every step's loss, bit for bit
    weights = [open(os.path.join(w, "final_policy", "model.safetensors"), "rb").read() for w in (killed, full)]
    assert weights[0] == weights[1]


def test_cli_reads_the_config_file_and_finds_the_run_finished(world, runs):
    """The program's command line (`python -m rlaif_jax.sft --config=FILE:ARG --workdir=DIR`) on the finished run:
    its config, read from the file, equals the saved one (a changed setting would be refused), and there is
    nothing left to do; no step is compiled."""
    _, full = runs
    before = metric_lines(full)
    out = subprocess.run([sys.executable, "-m", "rlaif_jax.sft", f"--config={CONFIG}:{world}", f"--workdir={full}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finished at step 16: nothing to do" in out.stderr
    assert metric_lines(full) == before


def test_export_loads_in_transformers_with_our_logits(world, runs):
    import transformers

    _, full = runs
    c = tiny_sft_config.get_config(world)
    folder = os.path.join(full, "final_policy")
    # Ours: the params of the last checkpoint (the trained state), read back from orbax.
    cfg, params = hf.load_model(folder)
    state = sft.init_state(c, params)
    with ckpt_lib.Checkpointer(full, c.checkpoint) as ckpt:
        trained, _ = ckpt.restore(16, ckpt_lib.abstract_state(state))
    tokens, mask = tiny.left_padded_batch([5, 3, 7], 8, cfg.vocab_size, seed=1)
    ours = np.asarray(tfm.forward(trained.params, cfg, tokens, mask).logits)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    theirs = tiny.hf_logits(model, tokens, mask)
    np.testing.assert_allclose(ours[mask > 0], theirs[mask > 0], atol=1e-4, rtol=1e-4)
    initial = np.asarray(tfm.forward(hf.load_model(c.policy.path)[1], cfg, tokens, mask).logits)
    assert np.abs(initial - ours)[mask > 0].max() > 0.1  # the export holds the trained model, not the initial one


@pytest.mark.parametrize("section,field,value,message", [
    ("train", "pack_length", 30, "read only with config.train.packing=True"),
    ("data", "eval_fraction", 0.1, "config.data.eval_fraction=0.1 is not used by SFT"),
    ("data", "num_epochs", 2, "config.data.num_epochs=2 is not used by SFT"),
    ("data", "reference_field", "", "config.data.reference_field is empty"),
    ("train", "batch_size", 12, "use a multiple of 8"),  # 8 devices
    ("optim", "schedule", "step", "config.optim.schedule='step'"),
])
def test_validation_refuses(world, section, field, value, message):
    c = tiny_sft_config.get_config(world)
    c[section][field] = value
    with pytest.raises(errors.ConfigError, match=message):
        sft.validate(c)


def test_program_reports_a_config_error_as_one_line(world, tmp_path, capsys):
    c = tiny_sft_config.get_config(world)
    c.train.pack_length = 30  # without packing
    with pytest.raises(SystemExit) as exit_info:
        sft.launch(c, str(tmp_path / "run"))
    assert exit_info.value.code == errors.EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("FATAL config error: config.train.pack_length=30") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written
