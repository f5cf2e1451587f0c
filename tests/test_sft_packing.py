"""SFT packing (`train.packing`): packed rows computed block-diagonally equal each sequence run alone, the packer's
rows against hand-made ones, the packed loss equal to the unpacked one on the same examples, and a packed run that
learns and resumes exactly after a stop."""
import json
import os
import signal

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from rlaif_jax import data as data_lib
from rlaif_jax import program, sft
from rlaif_jax.models import hf
from rlaif_jax.models import transformer as tfm
from tests import tiny, tiny_sft_config
from tests.test_sft import write_sft_data


@pytest.mark.parametrize("window", [None, 3])
def test_packed_rows_compute_each_sequence_as_if_alone(window):
    """Two sequences and padding in one row: each one's logits equal its own forward (the forward checked against
    HF in tests/test_models.py), with a sliding window too."""
    cfg = tiny.model_config(sliding_window=window)
    params = tfm.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, cfg.vocab_size, 4), rng.integers(3, cfg.vocab_size, 5)
    row = np.concatenate([a, b, [tiny.PAD] * 2])[None]
    segments = np.asarray([[1] * 4 + [2] * 5 + [0] * 2])
    np.testing.assert_array_equal(tfm.packed_positions(segments), [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]])
    forward = jax.jit(tfm.forward, static_argnums=1)
    packed = np.asarray(forward(params, cfg, row, segments > 0, segments).logits)[0]
    for seq, where in ((a, slice(0, 4)), (b, slice(4, 9))):
        alone = np.asarray(forward(params, cfg, seq[None], np.ones((1, len(seq)), np.int32)).logits)[0]
        np.testing.assert_allclose(packed[where], alone, atol=1e-5)


class FakePrompts:
    """The two columns `pack_examples` reads, as a PromptDataset holds them."""

    def __init__(self, prompts, completions):
        import datasets
        self.dataset = datasets.Dataset.from_dict({data_lib.PROMPT_IDS: prompts, data_lib.REFERENCE_IDS: completions})

    def __len__(self):
        return len(self.dataset)


def test_pack_examples_fills_rows_next_fit_in_a_seeded_order():
    prompts = FakePrompts([[1, 10], [1, 11, 12], [1, 13]], [[20, 2], [21, 2], [22, 23, 2]])  # lengths 4, 5, 5
    order = np.random.default_rng(5).permutation(3).tolist()
    packed = data_lib.pack_examples(prompts, 9, 0, seed=5)
    lengths = [4, 5, 5]
    expected_rows, row = [], []
    for i in order:  # next-fit by hand
        if sum(lengths[j] for j in row) + lengths[i] > 9:
            expected_rows.append(row)
            row = []
        row.append(i)
    expected_rows.append(row)
    assert len(packed.tokens_bl) == len(expected_rows)
    for r, examples in enumerate(expected_rows):
        tokens, segments, loss = [], [], []
        for s, i in enumerate(examples, 1):
            p, c = prompts.dataset[i][data_lib.PROMPT_IDS], prompts.dataset[i][data_lib.REFERENCE_IDS]
            tokens += p + c
            segments += [s] * (len(p) + len(c))
            loss += [0.0] * len(p) + [1.0] * len(c)
        pad = 9 - len(tokens)
        np.testing.assert_array_equal(packed.tokens_bl[r], tokens + [0] * pad)
        np.testing.assert_array_equal(packed.segment_ids_bl[r], segments + [0] * pad)
        np.testing.assert_array_equal(packed.loss_mask_bl[r], loss + [0.0] * pad)
    with pytest.raises(data_lib.DataError, match="does not fit a packed row of 4"):
        data_lib.pack_examples(prompts, 4, 0, seed=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("packing_world"))
    tiny.write_policy(os.path.join(root, "policy"))
    write_sft_data(os.path.join(root, "sft.jsonl"), n=16)
    return root


def packed_config(world, **train):
    c = ConfigDict(tiny_sft_config.get_config(world).to_dict())
    c.train.packing = True
    c.train.batch_size = 8
    for k, v in train.items():
        c.train[k] = v
    return c


def test_packed_loss_equals_the_unpacked_loss_on_the_same_examples(world):
    c = packed_config(world)
    tok = hf.load_tokenizer(c.policy.path)
    loader, _ = data_lib.load_prompts(c.data, tok, 16, process_index=0, process_count=1)
    unpacked = next(loader)  # all 16 examples
    cfg, params = hf.load_model(c.policy.path)
    packed = data_lib.pack_examples(loader.prompts, 24, loader.prompts.pad_id, seed=0)
    assert len(packed.tokens_bl) < 16  # several examples share rows
    want = jax.jit(sft.completion_loss, static_argnums=1)(params, cfg, unpacked.tokens_bp, unpacked.mask_bp,
                                                           unpacked.reference_bf, unpacked.reference_mask_bf)
    got = jax.jit(sft.packed_loss, static_argnums=1)(params, cfg, *packed)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_a_pack_length_shorter_than_an_example_is_refused(world):
    with pytest.raises(Exception, match="pack_length=5 is shorter than the longest example"):
        sft.validate(packed_config(world, pack_length=5))


def test_a_packed_run_learns_and_resumes_exactly(world, tmp_path, monkeypatch):
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    assert sft.launch(packed_config(world), full) == 0
    records = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    losses = [r["sft/loss"] for r in records]
    assert len(losses) == 16 and np.mean(losses[-2:]) < 0.5 * losses[0], losses  # it learns (16 examples)
    # SIGTERM during step 7 (the program's preemption path: stop after the step, with a checkpoint), then the same
    # command again: every step's metrics as the uninterrupted run's, bit for bit (the packed rows' order included).
    requested = program.Preemption.requested

    def sigterm_at_step_7(self, step):
        if step == 7 and self.signum is None:
            self._handle(signal.SIGTERM, None)
        return requested(self, step)

    monkeypatch.setattr(program.Preemption, "requested", sigterm_at_step_7)
    assert sft.launch(packed_config(world), stopped) == 128 + signal.SIGTERM
    assert len(open(os.path.join(stopped, "metrics.jsonl")).read().splitlines()) == 7
    monkeypatch.setattr(program.Preemption, "requested", requested)
    assert sft.launch(packed_config(world), stopped) == 0
    assert open(os.path.join(stopped, "metrics.jsonl")).read() == open(os.path.join(full, "metrics.jsonl")).read()
