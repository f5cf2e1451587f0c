"""Prompt loading: file formats, field mapping, chat template, rejection / truncation counts, shuffling,
epochs, process sharding, restorable position, global arrays."""
import json

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest

from rlaif_jax import data, sharding

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "hello", "world", "why", "sky", "blue", "q", "ctx"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids_of(words: str) -> list[int]:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    return [vocab[w] for w in words.split()]


# 12 rows: 2 rejected (None, blank), prompt lengths 1..7 words.
ROWS = [
    {"prompt": "a", "answer": "1"},
    {"prompt": "a b", "answer": "2"},
    {"prompt": None, "answer": "x"},
    {"prompt": "a b c", "answer": "3"},
    {"prompt": "   ", "answer": "y"},
    {"prompt": "a b c d", "answer": "4"},
    {"prompt": "a b c d e", "answer": "5"},
    {"prompt": "a b c d e f", "answer": "6"},
    {"prompt": "a b c d e f g", "answer": "7"},
    {"prompt": "hello", "answer": "8"},
    {"prompt": "hello world", "answer": "9"},
    {"prompt": "why sky blue", "answer": "10"},
]


def write(tmp_path, fmt: str, rows=ROWS):
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def cfg_for(path, **kw):
    c = data.default_config()
    c.path = path
    c.update(kw)
    return c


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_local_formats_counts(tmp_path, tok, fmt):
    # plain text + BOS: "a b c d e f g" is 8 tokens; max 5 truncates the 6-, 7- and 8-token prompts
    c = cfg_for(write(tmp_path, fmt), max_prompt_len=5)
    pd_ = data.load_prompt_splits(c, tok).train
    assert (pd_.num_loaded, pd_.num_rejected, len(pd_), pd_.num_truncated) == (12, 2, 10, 3)
    ids = [list(x) for x in pd_.dataset[data.PROMPT_IDS]]
    assert ids[0] == [1] + ids_of("a")
    # left truncation keeps the end
    assert ids[6] == ids_of("c d e f g")
    assert pd_.dataset[data.PROMPT_TEXT][6] == "a b c d e f g"
    assert [str(r["answer"]) for r in pd_.rows([1, 9])] == ["2", "10"]  # csv reads numbers as ints
    assert "10 prompts kept of 12: 2 rejected" in pd_.summary()


def test_prompt_format_and_chat_template(tmp_path, tok):
    rows = [{"q": "why", "ctx": "sky blue"}, {"q": "hello", "ctx": None}, {"q": "", "ctx": "a"},
            {"q": "b"}]
    c = cfg_for(write(tmp_path, "jsonl", rows), prompt_format="q {q} ctx {ctx}", use_chat_template=True,
                system_prompt="a b", max_prompt_len=32)
    pd_ = data.load_prompt_splits(c, tok).train
    # row 2 has ctx None, row 3 an empty q, row 4 no ctx at all: only row 1 survives
    assert (len(pd_), pd_.num_rejected, pd_.num_truncated) == (1, 3, 0)
    text = pd_.dataset[data.PROMPT_TEXT][0]
    assert text == "<bos><|system|> a b <|user|> q why ctx sky blue <|assistant|>"
    assert list(pd_.dataset[data.PROMPT_IDS][0]) == (
        [1, 6] + ids_of("a b") + [4] + ids_of("q why ctx sky blue") + [5])  # no second BOS


def test_chat_messages_column(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hello world"}]},
            {"messages": [{"role": "user", "content": "  "}]}]
    c = cfg_for(write(tmp_path, "jsonl", rows), prompt_field="messages", use_chat_template=True)
    pd_ = data.load_prompt_splits(c, tok).train
    assert (len(pd_), pd_.num_rejected) == (1, 1)
    assert list(pd_.dataset[data.PROMPT_IDS][0]) == [1, 4] + ids_of("hello world") + [5]


def test_bad_config_messages(tmp_path, tok):
    path = write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match="prompt column"):
        data.load_prompt_splits(cfg_for(path, prompt_field="question"), tok)
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(ValueError, match="extension"):
        data.load_raw(str(bad))


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    seen = {}

    def fake(path, name=None, split=None, **kw):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_list([{"prompt": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = data.load_raw("someorg/prompts", "test[:10]", "main")
    assert seen == {"path": "someorg/prompts", "name": "main", "split": "test[:10]"} and len(ds) == 1


def test_save_to_disk_folder(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a b"}, {"prompt": ""}]).save_to_disk(str(tmp_path / "ds"))
    pd_ = data.load_prompt_splits(cfg_for(str(tmp_path / "ds")), tok).train
    assert (len(pd_), pd_.num_rejected) == (1, 1)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tok):
    rows = [{"prompt": " ".join(["a"] * (1 + i % 5)), "id": i} for i in range(22)]
    path = write(tmp_path_factory.mktemp("p"), "jsonl", rows)
    return data.load_prompt_splits(cfg_for(path, max_prompt_len=4), tok).train


def collect(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_padding_and_epochs(prompts):
    loader = data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=3, num_epochs=2)
    assert loader.batches_per_epoch == 5 and len(loader) == 10
    batches = list(loader)
    assert len(batches) == 10
    ids = prompts.dataset[data.PROMPT_IDS]
    for b in batches:
        assert b.tokens_bp.shape == (4, 4) and b.tokens_bp.dtype == np.int32
        for row, toks, mask in zip(b.index_b, b.tokens_bp, b.mask_bp):
            want = list(ids[row])
            assert list(toks[4 - len(want):]) == want and mask.sum() == len(want)
            assert (toks[:4 - len(want)] == prompts.pad_id).all() and (mask[:4 - len(want)] == 0).all()
    # each epoch visits 20 distinct rows in the order of the seed+e permutation, dropping the last 2
    for e in range(2):
        seen = np.concatenate([b.index_b for b in batches[5 * e:5 * e + 5]])
        np.testing.assert_array_equal(seen, np.random.default_rng(3 + e).permutation(22)[:20])
    assert not np.array_equal(np.concatenate([b.index_b for b in batches[:5]]),
                              np.concatenate([b.index_b for b in batches[5:]]))


def test_shuffle_determinism_and_unshuffled(prompts):
    a = collect(data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=1), 7)
    b = collect(data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=1), 7)
    c = collect(data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=2), 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens_bp, y.tokens_bp)
        np.testing.assert_array_equal(x.index_b, y.index_b)
    assert any(not np.array_equal(x.index_b, z.index_b) for x, z in zip(a, c))
    plain = collect(data.PromptLoader(prompts, 4, process_index=0, process_count=1, shuffle=False), 6)
    np.testing.assert_array_equal(np.concatenate([p.index_b for p in plain]),
                                  np.r_[np.arange(20), np.arange(4)])


def test_process_sharding_partitions_global_batch(prompts):
    whole = data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=5)
    parts = [data.PromptLoader(prompts, 4, process_index=p, process_count=2, seed=5) for p in range(2)]
    for _ in range(8):  # crosses an epoch boundary
        g = next(whole)
        p0, p1 = next(parts[0]), next(parts[1])
        assert p0.tokens_bp.shape == (2, 4)
        assert not set(p0.index_b) & set(p1.index_b)
        np.testing.assert_array_equal(np.concatenate([p0.index_b, p1.index_b]), g.index_b)
        np.testing.assert_array_equal(np.concatenate([p0.tokens_bp, p1.tokens_bp]), g.tokens_bp)
    with pytest.raises(ValueError, match="divisible"):
        data.PromptLoader(prompts, 5, process_index=0, process_count=2)


def test_state_restore_resumes_exactly(prompts):
    ref = collect(data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=7), 12)
    first = data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=7)
    collect(first, 5)  # exactly at the end of epoch 0
    saved = json.loads(json.dumps(first.state().to_json()))
    assert saved == {"epoch": 0, "index": 5}
    second = data.PromptLoader(prompts, 4, process_index=0, process_count=1, seed=7)
    second.restore(saved)
    for want, got in zip(ref[5:], collect(second, 7)):
        np.testing.assert_array_equal(want.index_b, got.index_b)
        np.testing.assert_array_equal(want.tokens_bp, got.tokens_bp)
    assert second.state() == data.LoaderState(2, 2)


def test_eval_loader_pads_last_batch(tmp_path, tok):
    rows = [{"prompt": " ".join(["b"] * (1 + i % 3)), "id": i} for i in range(10)]
    c = cfg_for(write(tmp_path, "jsonl", rows), eval_fraction=0.3, seed=4)
    train, held_out = data.load_prompts(c, tok, 4, process_index=0, process_count=1)
    assert len(train.prompts) == 7 and len(held_out.prompts) == 3
    batches = list(held_out)
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0].valid_b, [1, 1, 1, 0])
    np.testing.assert_array_equal(batches[0].index_b, [0, 1, 2, 0])
    # the split is seeded and disjoint
    tr, ev = list(train.prompts.dataset["id"]), list(held_out.prompts.dataset["id"])
    assert sorted(tr + ev) == list(range(10))
    again = data.load_prompts(c, tok, 4, process_index=0, process_count=1)[1]
    assert list(again.prompts.dataset["id"]) == ev
    c2 = cfg_for(c.path, eval_path=c.path, eval_max_prompts=4)
    assert len(data.load_prompts(c2, tok, 4, process_index=0, process_count=1)[1].prompts) == 4


def test_to_global(prompts):
    mesh = sharding.make_mesh(2, 2, 2)
    batch = next(data.PromptLoader(prompts, 8, process_index=0, process_count=1, seed=0))
    out = data.to_global(batch, sharding.batch_sharding(mesh, 1))
    assert isinstance(out.tokens_bp, jax.Array) and out.tokens_bp.shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(out.tokens_bp), batch.tokens_bp)
    np.testing.assert_array_equal(np.asarray(out.index_b), batch.index_b)
    # batch over data x fsdp = 4 shards of 2 rows, replicated over tensor
    shard_rows = {tuple(s.index[0].indices(8)) for s in out.mask_bp.addressable_shards}
    assert shard_rows == {(0, 2, 1), (2, 4, 1), (4, 6, 1), (6, 8, 1)}


def test_default_config_is_plain():
    c = data.default_config()
    assert isinstance(c, ml_collections.ConfigDict) and c.max_prompt_len > 0


def test_reference_responses_are_right_padded_with_eos_and_counted(tmp_path, tok):
    """config.data.reference_field: each reference is its tokens then EOS, right-padded like a sampled response,
    cut at its end to max_reference_len (counted); a row without a reference is rejected with the blank prompts."""
    rows = [{"prompt": "a b", "ref": "hello world"}, {"prompt": "c", "ref": ""},
            {"prompt": "d e", "ref": "why sky blue q ctx"}, {"prompt": "f", "ref": "a"}]
    cfg = cfg_for(write(tmp_path, "jsonl", rows), reference_field="ref", max_reference_len=4, shuffle=False)
    train, _ = data.load_prompts(cfg, tok, 3)
    assert (train.prompts.num_rejected, train.prompts.num_reference_truncated) == (1, 1)
    assert "1 references cut to 4 tokens" in train.prompts.summary()
    batch = next(train)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    want = [ids_of("hello world") + [eos, pad], ids_of("why sky blue q"), ids_of("a") + [eos, pad, pad]]
    np.testing.assert_array_equal(batch.reference_bf, want)
    np.testing.assert_array_equal(batch.reference_mask_bf, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert next(data.PromptLoader(train.prompts, 3)).reference_bf.shape == (3, 4)


def test_a_missing_reference_column_is_named(tmp_path, tok):
    cfg = cfg_for(write(tmp_path, "jsonl"), reference_field="reference")
    with pytest.raises(ValueError, match="config.data.reference_field='reference' is not a dataset column"):
        data.load_prompts(cfg, tok, 2)


def test_no_reference_field_no_reference_arrays(prompts):
    batch = next(data.PromptLoader(prompts, 4))
    assert batch.reference_bf is None and batch.reference_mask_bf is None


# ---------------------------------------------------------------------------------------------- dataset schemas
# Small files in the exact column layout of each public dataset (parquet as the hub publishes them, HH as jsonl).
TLDR_NAME = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
TLDR_ROWS = [  # summary without a leading space, as in the hub dataset (the reproduction's tldr_dataset.py)
    {"id": "t3_1", "subreddit": "a", "title": "b c", "post": "hello world", "summary": "why sky blue"},
    {"id": "t3_2", "subreddit": "d", "title": "e", "post": "   ", "summary": "f"},  # blank post: rejected
    {"id": "t3_3", "subreddit": "g", "title": "h", "post": "q ctx", "summary": "hello"},
]
TLDR_FIRST = "SUBREDDIT: r/a\n\nTITLE: b c\n\nPOST: hello world\n\nTL;DR:"


def test_tldr_schema_gives_prompts_references_and_sft_records(tmp_path, tok):
    path = write(tmp_path, "parquet", TLDR_ROWS)
    cfg = cfg_for(path, schema=TLDR_NAME, reference_field="reference", shuffle=False)
    train, _ = data.load_prompts(cfg, tok, 2)
    assert (train.prompts.num_loaded, train.prompts.num_rejected) == (3, 1)
    texts = train.prompts.dataset[data.PROMPT_TEXT]
    assert texts == [TLDR_FIRST, "SUBREDDIT: r/g\n\nTITLE: h\n\nPOST: q ctx\n\nTL;DR:"]
    batch = next(train)
    np.testing.assert_array_equal(batch.reference_bf[0, :4], ids_of("why sky blue") + [tok.eos_token_id])
    # the reproduction's tokenised copy has the same raw columns (its extra ones are not read)
    assert data.DATASETS[TLDR_NAME] is data.DATASETS[TLDR_NAME + "_oai_preprocessing_1706381144"]

    records, left_out = data.sft_records(data.read_examples(TLDR_NAME, path))
    assert left_out == 1 and records == [{"prompt": TLDR_FIRST, "completion": " why sky blue"},
                                         {"prompt": texts[1], "completion": " hello"}]


def test_openai_comparisons_schema_gives_the_chosen_summary_first(tmp_path):
    def info(subreddit, title, post, article=None):
        return {"id": "x", "post": post, "title": title, "subreddit": subreddit, "site": None, "article": article}

    def summaries(a, b):
        return [{"text": a, "policy": "sup2", "note": None}, {"text": b, "policy": "ref", "note": None}]

    rows = [
        {"info": info("a", "b", "c"), "summaries": summaries(" hello world", " why"), "choice": 1,
         "worker": "w1", "batch": "batch3", "split": "train", "extra": {"confidence": 7}},
        {"info": info("d", "e", "f"), "summaries": summaries(" sky", " blue"), "choice": 0,
         "worker": "w2", "batch": "batch3", "split": "train", "extra": {"confidence": None}},
        {"info": info(None, None, None, article="news"), "summaries": summaries(" g", " h"), "choice": 0,
         "worker": "w3", "batch": "cnndm0", "split": "valid1", "extra": {"confidence": 1}},  # CNN/DM: no post
    ]
    path = write(tmp_path, "parquet", rows)
    name = "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"
    records, left_out = data.preference_records(data.read_examples(name, path))
    assert left_out == 1
    assert records == [
        {"prompt": "SUBREDDIT: r/a\n\nTITLE: b\n\nPOST: c\n\nTL;DR:", "response_a": " why",
         "response_b": " hello world", "p_a_better": 1.0},
        {"prompt": "SUBREDDIT: r/d\n\nTITLE: e\n\nPOST: f\n\nTL;DR:", "response_a": " sky", "response_b": " blue",
         "p_a_better": 1.0}]


def test_trl_tldr_and_carper_comparisons_schemas(tmp_path, tok):
    trl_rows = [{"prompt": TLDR_FIRST, "completion": " why sky blue"}, {"prompt": "q", "completion": ""}]
    trl_path = write(tmp_path, "parquet", trl_rows)
    train = data.load_prompt_splits(cfg_for(trl_path, schema="trl-lib/tldr", reference_field="reference"), tok).train
    assert (len(train), train.num_rejected) == (1, 1)  # no completion: no reference, rejected
    assert data.sft_records(data.read_examples("trl-lib/tldr", trl_path)) == (
        [{"prompt": TLDR_FIRST, "completion": " why sky blue"}], 1)

    carper_rows = [{"prompt": "SUBREDDIT: r/a\nTITLE: b\nPOST: c", "chosen": "TL;DR: hello world",
                    "rejected": "TL;DR: why"}]
    carper_path = str(tmp_path / "carper.parquet")
    pd.DataFrame(carper_rows).to_parquet(carper_path)
    records, _ = data.preference_records(data.read_examples("CarperAI/openai_summarize_comparisons", carper_path))
    assert records == [{"prompt": "SUBREDDIT: r/a\nTITLE: b\nPOST: c\nTL;DR:", "response_a": " hello world",
                        "response_b": " why", "p_a_better": 1.0}]


def test_hh_schema_pairs_the_final_replies_and_reads_prompts_as_messages(tmp_path, tok):
    rows = [
        {"chosen": "\n\nHuman: hello\n\nAssistant: a b\n\nHuman: why sky\n\nAssistant: blue",
         "rejected": "\n\nHuman: hello\n\nAssistant: a b\n\nHuman: why sky\n\nAssistant: c d"},
        {"chosen": "\n\nHuman: q\n\nAssistant: e", "rejected": "\n\nHuman: ctx\n\nAssistant: f"},  # two prompts
        {"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q"},  # no assistant reply
    ]
    path = write(tmp_path, "jsonl", rows)
    records, left_out = data.preference_records(data.read_examples("Anthropic/hh-rlhf", path))
    assert left_out == 2 and records == [{
        "prompt": "\n\nHuman: hello\n\nAssistant: a b\n\nHuman: why sky\n\nAssistant:", "response_a": " blue",
        "response_b": " c d", "p_a_better": 1.0}]
    # For an AI labeller: no label, and the preferred reply alternates between A and B (rows 0 and 1 here).
    unlabelled, _ = data.preference_records(data.read_examples("Anthropic/hh-rlhf", path) * 2, labelled=False)
    assert [(r["response_a"], r["response_b"]) for r in unlabelled] == [(" blue", " c d"), (" c d", " blue")]
    assert all("p_a_better" not in r for r in unlabelled)
    train = data.load_prompt_splits(cfg_for(path, schema="Anthropic/hh-rlhf", use_chat_template=True), tok).train
    assert train.dataset[data.PROMPT_TEXT] == ["<bos><|user|> hello <|assistant|> a b <|user|> why sky <|assistant|>"]


def test_schema_config_errors():
    for changes, message in [
        (dict(schema="org/unknown"), "config.data.schema='org/unknown' is not a known dataset"),
        (dict(schema="trl-lib/tldr", prompt_format="{post}"), "reads the prompt itself"),
        (dict(schema="Anthropic/hh-rlhf", reference_field="reference"), "that dataset has no reference responses"),
        (dict(schema="trl-lib/tldr", reference_field="completion"), "the schema's reference column is 'reference'"),
    ]:
        with pytest.raises(ValueError, match=message):
            data.validate_config(cfg_for("", **changes))
    data.validate_config(cfg_for("", schema="trl-lib/tldr"))  # the hub dataset of that name
