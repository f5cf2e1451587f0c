"""Prompt datasets: files or hub datasets -> token ids -> per-process batches -> global arrays.

Pipeline (`load_prompt_splits`):
  1. load     local .json / .jsonl / .parquet / .csv / .arrow files (or a glob of them), a folder written by
              `Dataset.save_to_disk`, or a hub dataset name + split, all through the `datasets` library
  2. text     the prompt is one column (`prompt_field`: a string, or a list of chat messages
              `[{"role", "content"}, ...]`), or several columns combined by `prompt_format`
              ("Question: {question}\\nContext: {context}"), or what the adapter of a public dataset's
              `schema` reads (`DATASETS`, by hub name: TL;DR, OpenAI's comparisons, trl-lib/tldr,
              CarperAI's comparisons, Anthropic HH; also their preference / SFT records)
  3. reject   rows whose prompt is missing, None or blank are dropped and counted
  4. tokenize optionally through the tokenizer's chat template (with the generation prompt appended);
              prompts longer than `max_prompt_len` tokens are cut from the left (the end, which holds the
              question and the assistant header, is kept) and counted
  5. eval     a held-out split: another file / hub split, or a seeded fraction of the training rows

`PromptLoader` (a `RowLoader`) turns a `PromptDataset` into fixed-shape, left-padded batches. Its position is two
integers (`LoaderState(epoch, index)`): epoch e visits the rows in the order of a permutation seeded with `seed + e`,
so a restored loader yields exactly the batches the original would have. With several processes each one
builds only its own contiguous slice of every global batch (process p holds rows [p*b, (p+1)*b) of the
global batch, b = global_batch // process_count), and `to_global` assembles the slices into one jax.Array
with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import glob
import json
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from rlaif_jax.errors import DataError

# Columns added to the dataset; every original column is kept for host-side lookups (e.g. ground truth).
PROMPT_TEXT = "prompt_text"
PROMPT_IDS = "prompt_ids"
REFERENCE_IDS = "reference_ids"

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Local file (.json/.jsonl/.parquet/.csv/.arrow, globs allowed), a save_to_disk folder, or a hub name.
    c.path = ""
    # A public dataset's schema by its hub name (a key of DATASETS): its adapter writes the prompt (and reference)
    # columns, so prompt_field / prompt_format / prompt_parser stay unset. With path empty the hub dataset of that
    # name is read; with path set, a local copy in that schema.
    c.schema = ""
    c.name = ""  # hub dataset configuration name ("" = default)
    c.data_dir = ""  # hub dataset sub-folder, datasets.load_dataset(path, data_dir=...) (e.g. "harmless-base")
    c.split = "train"  # split (slices like "train[:1000]" work); local files hold a single "train" split
    c.prompt_field = "prompt"  # column with the prompt text, or with a list of chat messages
    c.prompt_format = ""  # if set, a str.format template over columns; replaces prompt_field
    c.prompt_parser = ""  # "" = the prompt as read; a name in PROMPT_PARSERS turns it into the real prompt
    c.use_chat_template = False  # wrap the prompt as a user turn with the tokenizer's chat template
    c.system_prompt = ""  # with the chat template: an optional system turn before the user turn
    c.add_special_tokens = True  # without the chat template: let the tokenizer add BOS etc.
    c.max_prompt_len = 256  # prompt length P of every batch; longer prompts are cut from the left
    # Column with a reference response per prompt ("" = none): the baseline of reward.pairwise_baseline=
    # "dataset_reference" and the text of a judge template's {reference} slot. Rows without one are rejected.
    c.reference_field = ""
    c.max_reference_len = 64  # reference length F of every batch (with its EOS); longer ones are cut at the end
    c.seed = 0  # shuffling (epoch e uses seed + e) and the eval_fraction split
    c.shuffle = True
    c.num_epochs = 0  # passes over the training prompts; 0 = unlimited
    # Held-out prompts: eval_path (+ eval_split), else eval_split of `path`, else a fraction of the rows.
    c.eval_path = ""
    c.eval_split = ""
    c.eval_fraction = 0.0
    c.eval_max_prompts = 0  # keep at most this many eval prompts (0 = all)
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError with what to change when the `data` section is inconsistent; reads no file (the columns
    a prompt uses are checked when the data is loaded)."""
    if not cfg.path and not cfg.schema:
        raise ValueError("config.data.path is empty; set it to a .jsonl/.json/.parquet/.csv file, a save_to_disk "
                         "folder or a hub dataset name (or config.data.schema to a dataset of DATASETS)")
    if cfg.schema:
        if cfg.schema not in DATASETS:
            raise ValueError(f"config.data.schema={cfg.schema!r} is not a known dataset; use one of "
                             f"{sorted(DATASETS)} or ''")
        if cfg.prompt_format or cfg.prompt_parser or cfg.prompt_field != SCHEMA_PROMPT:
            raise ValueError(f"config.data.schema={cfg.schema!r} reads the prompt itself; clear config.data."
                             f"prompt_format / prompt_parser and leave prompt_field={SCHEMA_PROMPT!r}")
        if cfg.reference_field and (cfg.reference_field != SCHEMA_REFERENCE
                                    or not DATASETS[cfg.schema].has_reference):
            has = DATASETS[cfg.schema].has_reference
            raise ValueError(f"config.data.reference_field={cfg.reference_field!r} with config.data.schema="
                             f"{cfg.schema!r}: " + (f"the schema's reference column is {SCHEMA_REFERENCE!r}" if has
                                                    else "that dataset has no reference responses; set it to ''"))
    if cfg.prompt_parser and cfg.prompt_parser not in PROMPT_PARSERS:
        raise ValueError(f"config.data.prompt_parser={cfg.prompt_parser!r}; use one of {sorted(PROMPT_PARSERS)} or ''")
    if cfg.prompt_format and not _format_fields(cfg.prompt_format):
        raise ValueError(f"config.data.prompt_format={cfg.prompt_format!r} names no column; write {{column}} slots, "
                         "or clear it and set config.data.prompt_field")
    if not cfg.prompt_format and not cfg.prompt_field:
        raise ValueError("config.data.prompt_field is empty; name the prompt column (or set config.data.prompt_format)")
    if cfg.system_prompt and not cfg.use_chat_template:
        raise ValueError("config.data.system_prompt is only used with the chat template; set "
                         "config.data.use_chat_template=True or clear the system prompt")
    if cfg.max_prompt_len < 1:
        raise ValueError(f"config.data.max_prompt_len={cfg.max_prompt_len} must be >= 1")
    if cfg.max_reference_len < 1:
        raise ValueError(f"config.data.max_reference_len={cfg.max_reference_len} must be >= 1")
    if cfg.num_epochs < 0 or cfg.eval_max_prompts < 0:
        raise ValueError(f"config.data.num_epochs={cfg.num_epochs} and config.data.eval_max_prompts="
                         f"{cfg.eval_max_prompts} must be >= 0 (0 = unlimited / all)")
    if not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"config.data.eval_fraction={cfg.eval_fraction} must be in [0, 1) (0 = no held-out split)")
    if cfg.eval_fraction > 0 and (cfg.eval_path or cfg.eval_split):
        raise ValueError(f"config.data.eval_fraction={cfg.eval_fraction} is unused when config.data.eval_path or "
                         "eval_split names the held-out prompts; set eval_fraction=0 or clear them")


# ---------------------------------------------------------------------------------------------- loading


def _is_local(path: str) -> bool:
    return os.path.exists(path) or bool(glob.glob(path))


def load_raw(path: str, split: str = "train", name: str = "", data_dir: str = "") -> Any:
    """A `datasets.Dataset` from a local file / glob / save_to_disk folder, or from a hub dataset name."""
    import datasets

    if not path:
        raise DataError("config.data.path is empty; set it to a .jsonl/.json/.parquet/.csv file or a hub name")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        return loaded
    if _is_local(path):
        files = sorted(glob.glob(path)) if not os.path.exists(path) else [path]
        exts = {os.path.splitext(f[:-3] if f.endswith(".gz") else f)[1].lower() for f in files}
        builders = {_LOCAL_BUILDERS.get(e) for e in exts}
        if len(builders) != 1 or None in builders:
            raise DataError(
                f"data file(s) {path!r} have extension(s) {sorted(exts)}; use one of {sorted(_LOCAL_BUILDERS)}"
            )
        builder = builders.pop()
        if builder == "json":
            for f in files:
                check_json_file(f)
        try:
            return datasets.load_dataset(builder, data_files=files, split=split)
        except Exception as e:  # the datasets library's own parse errors name neither file nor line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"data file(s) {path!r} could not be read as {builder}: {first}") from None
    return datasets.load_dataset(path, name or None, split=split, data_dir=data_dir or None)


def check_json_file(path: str) -> None:
    """A local .json / .jsonl file (not compressed) read before the datasets library sees it, so that a fault is
    named with its file and line: not UTF-8, empty, a line that is not a JSON object. A .json file may also hold
    one JSON document (a list of records)."""
    if path.endswith(".gz"):
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path} is empty; it holds no prompts")
    if path.endswith(".json") and text.lstrip()[:1] in "[{":
        try:
            json.loads(text)
            return
        except ValueError:
            pass  # JSON lines in a .json file: checked line by line below
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            json_record(path, i, line)


def json_record(path: str, line_number: int, line: str) -> dict[str, Any]:
    """One JSON-lines record, or a DataError naming the file and line."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}:{line_number}: not a JSON record ({e}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_number}: a JSON {type(record).__name__}, not a record {{\"column\": value}}")
    return record


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def hh_transcript_prompt(transcript: Any, as_messages: bool = True) -> list[dict[str, str]] | str | None:
    """The prompt of an Anthropic HH-RLHF transcript: everything before its final assistant reply.

    A transcript (the "chosen" / "rejected" columns) is "\\n\\nHuman: h1\\n\\nAssistant: a1\\n\\nHuman: h2\\n\\n
    Assistant: a2". With i the position of the last "\\n\\nAssistant:":
      text      transcript[:i] + "\\n\\nAssistant:"   (a base model continues after the colon)
      messages  the turns of transcript[:i]: [{"role": "user", "content": "h1"}, {"role": "assistant", "content":
                "a1"}, {"role": "user", "content": "h2"}], contents stripped, consecutive turns of one role joined
                with a blank line (chat templates expect alternating roles)
    None (the row is rejected like a blank prompt) when there is no "\\n\\nAssistant:" or the dialogue before it
    does not end with a human turn.
    """
    if not isinstance(transcript, str):
        return None
    i = transcript.rfind(HH_ASSISTANT)
    if i < 0:
        return None
    head = transcript[:i]
    pieces = re.split(r"(\n\nHuman:|\n\nAssistant:)", head)
    messages: list[dict[str, str]] = []
    if pieces[0].strip():  # text before the first marker: part of the first human turn
        messages.append({"role": "user", "content": pieces[0].strip()})
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if marker == HH_HUMAN else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content.strip()).strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        return None
    return messages if as_messages else head + HH_ASSISTANT


# name -> function(raw prompt field value) -> prompt (str or chat messages) or None (reject the row)
PROMPT_PARSERS = {
    "hh_transcript": hh_transcript_prompt,                                     # chat messages
    "hh_transcript_text": lambda t: hh_transcript_prompt(t, as_messages=False),  # raw text
}


# ---------------------------------------------------------------------------------------------- dataset schemas
# Public datasets by hub name: each schema adapter reads one raw row into an `Example` (prompt, reference
# response, preferred / dispreferred response). `config.data.schema` names one for the RL prompts (a hub name, or a
# local copy in `config.data.path`); `read_examples` + `preference_records` / `sft_records` turn one into the JSONL
# files the reward-model stage and SFT trainers read (scripts/export_dataset.py).
#
# Responses are written as the continuation of the text prompt: a leading space after the prompt's final
# "TL;DR:" / "Assistant:", the rest stripped (the sources disagree on the space; the reproduction and TRL's
# trl-lib/tldr add it to the summaries, openai/summarize_from_feedback's texts carry it).

# OpenAI's TL;DR query format (summarize-from-feedback tasks.py; the reproduction's tldr_dataset.py format_str,
# TRL's examples/datasets/tldr.py).
TLDR_PROMPT_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
SCHEMA_PROMPT, SCHEMA_REFERENCE = "prompt", "reference"  # the columns a schema writes for the prompt pipeline


class Example(NamedTuple):
    """One row of a dataset in the terms of this codebase; None where the row has no such field (a row without a
    prompt is rejected like a blank prompt)."""
    prompt: Any  # text, or chat messages [{"role", "content"}, ...] when asked for messages
    reference: str | None = None  # a reference response (SFT target, reward.pairwise_baseline="dataset_reference")
    chosen: str | None = None  # the preferred response of a comparison
    rejected: str | None = None


class Schema(NamedTuple):
    read: Any  # (row: dict, as_messages: bool) -> Example
    has_reference: bool
    has_pairs: bool


def _continuation(text: Any) -> str | None:
    """A response as the continuation of its text prompt: " " + the stripped text (None when blank)."""
    return " " + text.strip() if isinstance(text, str) and text.strip() else None


def _tldr_prompt(fields: Any) -> str | None:
    if not isinstance(fields, dict) or any(_is_blank(fields.get(k)) for k in ("subreddit", "title", "post")):
        return None  # e.g. the CNN/DM rows of openai/summarize_from_feedback (an "article", no post)
    return TLDR_PROMPT_FORMAT.format(subreddit=fields["subreddit"], title=fields["title"], post=fields["post"])


def _read_tldr_posts(row: dict, as_messages: bool) -> Example:
    """vwxyzjn/summarize_from_feedback_tldr_3_filtered (id, subreddit, title, post, summary) and the
    reproduction's tokenised copy of it (+ query, query_token, reference_response, ...: tldr_dataset.py), whose
    pre-tokenised Pythia columns are not used: the prompt is rebuilt from the raw columns, the reference is the
    summary (which has no leading space there; tldr_dataset.py adds it, and "<|endoftext|>")."""
    return Example(_tldr_prompt(row), reference=_continuation(row.get("summary")))


def _read_oai_comparisons(row: dict, as_messages: bool) -> Example:
    """vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144: openai/summarize_from_feedback's
    "comparisons" (info {id, post, title, subreddit, ...}, summaries [{text, policy, note}, x2], choice, worker,
    batch, split, extra) plus the reproduction's tokenised columns (query, chosen, rejected with "<|endoftext|>",
    ...: tldr_dataset.py `process_response_data`), which are not used. chosen = summaries[choice].text."""
    summaries, choice = row.get("summaries"), row.get("choice")
    pair = (None, None)
    if isinstance(summaries, list) and len(summaries) == 2 and choice in (0, 1):
        pair = (_continuation(summaries[choice].get("text")), _continuation(summaries[1 - choice].get("text")))
    return Example(_tldr_prompt(row.get("info")), chosen=pair[0], rejected=pair[1])


def _read_prompt_completion(row: dict, as_messages: bool) -> Example:
    """trl-lib/tldr (prompt, completion): TRL's examples/datasets/tldr.py, prompt in OpenAI's format, completion
    " " + summary."""
    prompt = row.get("prompt")
    return Example(None if _is_blank(prompt) else prompt, reference=_continuation(row.get("completion")))


CARPER_TLDR_CUE = "TL;DR:"


def _read_carper_comparisons(row: dict, as_messages: bool) -> Example:
    """CarperAI/openai_summarize_comparisons (prompt, chosen, rejected): the prompt is the post without the
    "TL;DR:" cue and each summary starts with "TL;DR: " (trlx's summarize_rlhf scripts strip those 7 characters
    and join prompt + "\\n" + summary). Not verifiable from code in reach: the exact line breaks inside the
    prompt; it is kept as published, with "\\nTL;DR:" appended so the responses continue it."""
    prompt = row.get("prompt")

    def summary(text: Any) -> str | None:
        if isinstance(text, str) and text.lstrip().startswith(CARPER_TLDR_CUE):
            text = text.lstrip()[len(CARPER_TLDR_CUE):]
        return _continuation(text)

    prompt = None if _is_blank(prompt) else prompt.rstrip() + "\n" + CARPER_TLDR_CUE
    return Example(prompt, chosen=summary(row.get("chosen")), rejected=summary(row.get("rejected")))


def _final_reply(transcript: Any) -> str | None:
    if not isinstance(transcript, str) or transcript.rfind(HH_ASSISTANT) < 0:
        return None
    return _continuation(transcript[transcript.rfind(HH_ASSISTANT) + len(HH_ASSISTANT):])


def _read_hh(row: dict, as_messages: bool) -> Example:
    """Anthropic/hh-rlhf (chosen, rejected transcripts): the prompt is the dialogue before the final assistant
    reply (`hh_transcript_prompt`), the two final replies are the pair. A row whose two transcripts differ before
    their final replies has no common prompt and is rejected (TRL's hh-rlhf-helpful-base.py takes their common
    prefix instead)."""
    prompts = [hh_transcript_prompt(row.get(k), as_messages=False) for k in ("chosen", "rejected")]
    if prompts[0] is None or prompts[0] != prompts[1]:
        return Example(None)
    prompt = hh_transcript_prompt(row["chosen"], as_messages) if as_messages else prompts[0]
    return Example(prompt, chosen=_final_reply(row["chosen"]), rejected=_final_reply(row["rejected"]))


TLDR_POSTS = Schema(_read_tldr_posts, has_reference=True, has_pairs=False)
# hub name -> schema (config.data.schema, scripts/export_dataset.py --dataset)
DATASETS: dict[str, Schema] = {
    "vwxyzjn/summarize_from_feedback_tldr_3_filtered": TLDR_POSTS,
    "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144": TLDR_POSTS,
    "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144": Schema(_read_oai_comparisons, False, True),
    "trl-lib/tldr": Schema(_read_prompt_completion, has_reference=True, has_pairs=False),
    "CarperAI/openai_summarize_comparisons": Schema(_read_carper_comparisons, has_reference=False, has_pairs=True),
    "Anthropic/hh-rlhf": Schema(_read_hh, has_reference=False, has_pairs=True),
}


def schema_of(name: str) -> Schema:
    if name not in DATASETS:
        raise DataError(f"no dataset schema {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def apply_schema(raw: Any, name: str, as_messages: bool) -> Any:
    """The raw dataset with the schema's prompt and reference written into SCHEMA_PROMPT / SCHEMA_REFERENCE (the
    other columns kept, for host-side lookups); the prompt pipeline reads them like any prompt column."""
    read = schema_of(name).read

    def columns(batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        examples = [read({k: v[i] for k, v in batch.items()}, as_messages) for i in range(n)]
        return {SCHEMA_PROMPT: [e.prompt for e in examples], SCHEMA_REFERENCE: [e.reference for e in examples]}

    return raw.map(columns, batched=True, desc=f"read {name}")


def read_examples(name: str, path: str = "", split: str = "train", data_dir: str = "",
                  as_messages: bool = False) -> list[Example]:
    """Every row of dataset `name` (the hub dataset, or a local copy of it at `path`) as an Example."""
    read = schema_of(name).read
    return [read(row, as_messages) for row in load_raw(path or name, split, data_dir=data_dir)]


def preference_records(examples: Sequence[Example], labelled: bool = True) -> tuple[list[dict[str, Any]], int]:
    """The comparisons as the reward-model stage's JSONL records {"prompt", "response_a" (the preferred),
    "response_b", "p_a_better": 1.0}, and how many examples had no complete pair (left out). Unlabelled (RLAIF:
    an AI labeller decides, `config.label_judge`), the pairs carry no p_a_better and the human's choice is not in the
    order: it alternates from row to row, so A is the preferred reply in half of them."""
    complete = [e for e in examples if isinstance(e.prompt, str) and e.chosen and e.rejected]
    if labelled:
        records = [{"prompt": e.prompt, "response_a": e.chosen, "response_b": e.rejected, "p_a_better": 1.0}
                   for e in complete]
    else:
        records = [{"prompt": e.prompt, "response_a": a, "response_b": b}
                   for i, e in enumerate(complete) for a, b in [(e.chosen, e.rejected)[::1 if i % 2 == 0 else -1]]]
    return records, len(examples) - len(records)


def sft_records(examples: Sequence[Example]) -> tuple[list[dict[str, Any]], int]:
    """(prompt, reference response) as prompt-completion records {"prompt", "completion"} (TRL's SFT format, and
    the reward-model stage's config.data.normalize_to), and how many examples had none (left out)."""
    records = [{"prompt": e.prompt, "completion": e.reference} for e in examples
               if isinstance(e.prompt, str) and e.reference]
    return records, len(examples) - len(records)


def _format_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):  # chat messages: blank when every content is blank
        return all(_is_blank(m.get("content") if isinstance(m, dict) else m) for m in value)
    return False


class _PromptSource:
    """Reads one row's prompt: a column value (text or chat messages) or a template over columns."""

    def __init__(self, cfg: ml_collections.ConfigDict, columns: list[str]):
        self.template = cfg.prompt_format
        self.parser = PROMPT_PARSERS[cfg.prompt_parser] if cfg.prompt_parser else None
        self.fields = _format_fields(self.template) if self.template else [cfg.prompt_field]
        missing = [f for f in self.fields if f not in columns]
        if missing:
            raise DataError(
                f"prompt column(s) {missing} not in the dataset columns {columns}; "
                "set config.data.prompt_field or config.data.prompt_format"
            )

    def __call__(self, row: dict[str, Any]) -> Any:
        """The prompt (str or list of messages), or None when any field it uses is missing or blank."""
        values = {f: row.get(f) for f in self.fields}
        if any(_is_blank(v) for v in values.values()):
            return None
        prompt = self.template.format(**values) if self.template else values[self.fields[0]]
        return self.parser(prompt) if self.parser else prompt


def _messages(prompt: Any, system_prompt: str) -> list[dict[str, str]]:
    msgs = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def render_prompt(prompt: Any, tokenizer: Any, cfg: ml_collections.ConfigDict) -> str:
    """The text the policy sees: the chat template (with the assistant header appended) or the raw prompt."""
    if cfg.use_chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("config.data.use_chat_template is set but the tokenizer has no chat_template")
        return tokenizer.apply_chat_template(
            _messages(prompt, cfg.system_prompt), add_generation_prompt=True, tokenize=False
        )
    if not isinstance(prompt, str):
        raise DataError("prompts given as chat messages need config.data.use_chat_template=True")
    return prompt


def left_truncate(ids: list[int], max_len: int) -> tuple[list[int], bool]:
    """Keeps the last `max_len` tokens: ids[-max_len:]; returns (ids, was_truncated)."""
    if len(ids) <= max_len:
        return list(ids), False
    return list(ids[len(ids) - max_len:]), True


@dataclass
class PromptDataset:
    """Tokenized prompts (columns PROMPT_TEXT, PROMPT_IDS + the original ones) and what loading did."""

    dataset: Any  # datasets.Dataset
    max_prompt_len: int
    pad_id: int
    num_loaded: int  # rows read
    num_rejected: int  # rows dropped: prompt missing, None or blank
    num_truncated: int  # kept rows whose prompt was cut from the left to max_prompt_len tokens
    max_reference_len: int = 0  # 0: no reference column (config.data.reference_field is empty)
    num_reference_truncated: int = 0  # kept rows whose reference was cut at its end to max_reference_len tokens

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices: Any) -> list[dict[str, Any]]:
        """Host-side lookup of full rows (e.g. a ground-truth column) by the `index_b` of a batch."""
        return [self.dataset[int(i)] for i in np.asarray(indices)]

    def summary(self) -> str:
        refs = (f"; {self.num_reference_truncated} references cut to {self.max_reference_len} tokens"
                if self.max_reference_len else "")
        return (f"{len(self)} prompts kept of {self.num_loaded}: {self.num_rejected} rejected (missing or "
                f"empty), {self.num_truncated} left-truncated to {self.max_prompt_len} tokens{refs}")


def pad_token_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def prepare_prompts(raw: Any, tokenizer: Any, cfg: ml_collections.ConfigDict) -> PromptDataset:
    """Reject blank prompts, render and tokenize the rest, left-truncate, and count both."""
    num_loaded = len(raw)
    source = _PromptSource(cfg, list(raw.column_names))
    max_len = int(cfg.max_prompt_len)

    reference = cfg.reference_field
    if reference and reference not in raw.column_names:
        raise DataError(f"config.data.reference_field={reference!r} is not a dataset column {raw.column_names}")

    def keep(batch: dict[str, list]) -> list[bool]:
        n = len(next(iter(batch.values())))
        return [source({k: v[i] for k, v in batch.items()}) is not None
                and not (reference and _is_blank(batch[reference][i])) for i in range(n)]

    kept = raw.filter(keep, batched=True, desc="reject empty prompts")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        texts = [render_prompt(source({k: v[i] for k, v in batch.items()}), tokenizer, cfg) for i in range(n)]
        # The chat template already carries BOS and friends; plain text gets them from the tokenizer.
        add_special = bool(cfg.add_special_tokens) and not cfg.use_chat_template
        ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
        cut = [left_truncate(x, max_len) for x in ids]
        out = {PROMPT_TEXT: texts, PROMPT_IDS: [c[0] for c in cut], "_truncated": [c[1] for c in cut],
               "_length": [len(x) for x in ids]}
        if reference:
            # A reference is read like a sampled response: its tokens, then the stop token, cut at the end.
            eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
            refs = [x + eos for x in tokenizer(list(batch[reference]), add_special_tokens=False)["input_ids"]]
            out[REFERENCE_IDS] = [x[:cfg.max_reference_len] for x in refs]
            out["_ref_truncated"] = [len(x) > cfg.max_reference_len for x in refs]
        return out

    tokenized = kept.map(tokenize, batched=True, desc="tokenize prompts")
    num_truncated = int(sum(tokenized["_truncated"]))
    num_ref_truncated = int(sum(tokenized["_ref_truncated"])) if reference else 0
    longest = max(tokenized["_length"], default=0)
    tokenized = tokenized.remove_columns(["_truncated", "_length"] + (["_ref_truncated"] if reference else []))
    empty = sum(len(x) == 0 for x in tokenized[PROMPT_IDS])
    if empty:
        raise DataError(f"{empty} prompts tokenized to zero tokens; check the tokenizer and prompt fields")
    if len(tokenized) and num_truncated == len(tokenized):
        raise DataError(f"every one of the {len(tokenized)} prompts of {cfg.path} is longer than config.data."
                        f"max_prompt_len={max_len} tokens and would be cut; raise max_prompt_len (the longest prompt "
                        f"has {longest} tokens) or shorten the prompts")
    return PromptDataset(
        dataset=tokenized, max_prompt_len=max_len, pad_id=pad_token_id(tokenizer), num_loaded=num_loaded,
        num_rejected=num_loaded - len(kept), num_truncated=num_truncated,
        max_reference_len=int(cfg.max_reference_len) if reference else 0, num_reference_truncated=num_ref_truncated,
    )


class PromptSplits(NamedTuple):
    train: PromptDataset
    eval: PromptDataset | None


def load_prompt_splits(cfg: ml_collections.ConfigDict, tokenizer: Any) -> PromptSplits:
    """Train prompts and held-out eval prompts (None when no eval source is configured)."""
    validate_config(cfg)

    def load(path: str, split: str) -> Any:
        raw = load_raw(path or cfg.schema, split, cfg.name, cfg.data_dir)
        return apply_schema(raw, cfg.schema, bool(cfg.use_chat_template)) if cfg.schema else raw

    raw = load(cfg.path, cfg.split)
    raw_eval = None
    if cfg.eval_path:
        raw_eval = load(cfg.eval_path, cfg.eval_split or "train")
    elif cfg.eval_split:
        raw_eval = load(cfg.path, cfg.eval_split)
    elif cfg.eval_fraction > 0:
        parts = raw.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=True)
        raw, raw_eval = parts["train"], parts["test"]
    if raw_eval is not None and cfg.eval_max_prompts > 0 and len(raw_eval) > cfg.eval_max_prompts:
        raw_eval = raw_eval.select(range(cfg.eval_max_prompts))
    train = prepare_prompts(raw, tokenizer, cfg)
    held_out = prepare_prompts(raw_eval, tokenizer, cfg) if raw_eval is not None else None
    return PromptSplits(train, held_out)


# ---------------------------------------------------------------------------------------------- batches


class PromptBatch(NamedTuple):
    """One process's rows of a global batch (numpy), or after `to_global` the whole batch (jax.Array)."""

    tokens_bp: Any  # (b, P) int32, left-padded with the pad id
    mask_bp: Any  # (b, P) int32, 1 = real token
    valid_b: Any  # (b,) int32, 0 = filler row of a final partial eval batch (a copy of a real prompt)
    index_b: Any  # (b,) int32, row of the PromptDataset (for host-side lookups)
    # (b, F) int32 right-padded reference responses and their mask; None without config.data.reference_field
    reference_bf: Any = None
    reference_mask_bf: Any = None


class LoaderState(NamedTuple):
    """The loader's whole position: the next batch is batch `index` of epoch `epoch`."""

    epoch: int
    index: int

    def to_json(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LoaderState":
        return cls(int(d["epoch"]), int(d["index"]))


def left_pad(seqs: Sequence[Sequence[Any]], length: int, pad_value: Any = 0, dtype: Any = np.int32
             ) -> tuple[np.ndarray, np.ndarray]:
    """(values, mask) of shape (len(seqs), length): row i holds seqs[i] in its last len(seqs[i]) positions and
    `pad_value` before them; mask (int32) is 1 on those positions. The one left-padding of token rows (and of
    anything aligned with them, such as per-token loss weights) in this codebase."""
    values = np.full((len(seqs), length), pad_value, dtype)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence of {len(s)} tokens does not fit in {length}")
        if len(s):
            values[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
    return values, mask


def right_pad(seqs: Sequence[Sequence[Any]], length: int, pad_value: Any = 0, dtype: Any = np.int32
              ) -> tuple[np.ndarray, np.ndarray]:
    """(values, mask) of shape (len(seqs), length) with row i's tokens first and padding after them (the layout of
    sampled responses); `left_pad`'s mirror image."""
    values, mask = left_pad([list(s)[::-1] for s in seqs], length, pad_value, dtype)
    return values[:, ::-1].copy(), mask[:, ::-1].copy()


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Row order of one epoch: a permutation drawn with seed `seed + epoch`, or 0..N-1 unshuffled."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng(seed + epoch).permutation(num_rows)


class RowLoader:
    """Fixed-shape batches of this process's rows of a dataset of `num_rows` rows, epoch after epoch, with a
    restorable position; a subclass says what a batch of rows is (`_batch`).

    `drop_last=True` (training) skips the N mod global_batch rows left over at the end of each epoch so
    every batch is full; `drop_last=False` (eval) fills the last batch with copies of its first row marked
    `valid_b = 0`. `num_epochs=0` repeats forever.
    """

    what = "rows"  # what a row is, in errors

    def __init__(self, num_rows: int, global_batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None, seed: int = 0, shuffle: bool = True, num_epochs: int = 0,
                 drop_last: bool = True):
        self.num_rows = num_rows
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise DataError(f"global batch {global_batch_size} is not divisible by the process count "
                             f"{self.process_count}")
        n = num_rows
        if n == 0 or (drop_last and n < global_batch_size):
            raise DataError(f"{n} {self.what} cannot fill one batch of {global_batch_size}; lower the batch size "
                             f"or add {self.what}")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.seed, self.shuffle, self.num_epochs, self.drop_last = seed, shuffle, num_epochs, drop_last
        self.batches_per_epoch = n // global_batch_size if drop_last else -(-n // global_batch_size)
        self._state = LoaderState(0, 0)
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    # --- position
    def state(self) -> LoaderState:
        return self._state

    def restore(self, state: LoaderState | dict[str, Any]) -> None:
        state = LoaderState.from_json(state) if isinstance(state, dict) else LoaderState(*state)
        if not 0 <= state.index <= self.batches_per_epoch or state.epoch < 0:
            raise DataError(f"loader position {state} does not fit {self.batches_per_epoch} batches per "
                             "epoch; was the checkpoint written with another batch size or dataset?")
        self._state = state

    # --- iteration
    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Batches left until the last epoch ends (unlimited epochs: the rest of the current one)."""
        epoch, index = self._state
        left = self.batches_per_epoch - index
        if self.num_epochs:
            left += (self.num_epochs - epoch - 1) * self.batches_per_epoch
        return max(left, 0)

    def _rows_of(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's dataset rows of global batch `index` of `epoch`, and their validity."""
        if self._order_epoch != epoch:
            self._order = epoch_order(self.num_rows, self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        global_rows = self._order[index * self.global_batch_size:(index + 1) * self.global_batch_size]
        valid = np.ones(self.global_batch_size, np.int32)
        if len(global_rows) < self.global_batch_size:  # last partial eval batch
            valid[len(global_rows):] = 0
            filler = np.full(self.global_batch_size - len(global_rows), global_rows[0])
            global_rows = np.concatenate([global_rows, filler])
        lo = self.process_index * self.local_batch_size
        hi = lo + self.local_batch_size
        return global_rows[lo:hi], valid[lo:hi]

    def _batch(self, rows: np.ndarray, valid: np.ndarray) -> Any:
        """The batch of this process's dataset `rows` (and their validity)."""
        raise NotImplementedError

    def __next__(self):
        epoch, index = self._state
        if index >= self.batches_per_epoch:
            epoch, index = epoch + 1, 0
        if self.num_epochs and epoch >= self.num_epochs:
            raise StopIteration
        batch = self._batch(*self._rows_of(epoch, index))
        self._state = LoaderState(epoch, index + 1)
        return batch


class PromptLoader(RowLoader):
    """`RowLoader` batches of a `PromptDataset`: left-padded prompts (and right-padded references)."""

    what = "prompts"

    def __init__(self, prompts: PromptDataset, global_batch_size: int, **loader_settings):
        super().__init__(len(prompts), global_batch_size, **loader_settings)
        self.prompts = prompts
        # A view: the batches need only the ids.
        columns = [PROMPT_IDS] + ([REFERENCE_IDS] if prompts.max_reference_len else [])
        self._ids = prompts.dataset.select_columns(columns)

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def _batch(self, rows: np.ndarray, valid: np.ndarray) -> PromptBatch:
        # Only this process's rows are materialised from the (memory-mapped) dataset.
        selected = self._ids[rows.tolist()]
        tokens, mask = left_pad(selected[PROMPT_IDS], self.prompts.max_prompt_len, self.prompts.pad_id)
        references = reference_mask = None
        if self.prompts.max_reference_len:
            references, reference_mask = right_pad(selected[REFERENCE_IDS], self.prompts.max_reference_len,
                                                   self.prompts.pad_id)
        return PromptBatch(tokens, mask, valid, rows.astype(np.int32), references, reference_mask)


class PackedBatch(NamedTuple):
    """Packed SFT rows (`pack_examples`), numpy: several (prompt, completion) examples side by side per row."""

    tokens_bl: Any  # (b, L) int32: each example's prompt ids then completion ids, right-padded with the pad id
    segment_ids_bl: Any  # (b, L) int32: the example's number in its row (1, 2, ...), 0 on padding
    loss_mask_bl: Any  # (b, L) float32: 1 on completion tokens (the targets), 0 on prompts and padding


def pack_examples(prompts: PromptDataset, row_len: int, pad_id: int, seed: int) -> PackedBatch:
    """Every example of `prompts` (prompt ids then reference ids, which end with EOS) packed into rows of
    `row_len` tokens: the examples in a seeded random order, each appended to the current row while it fits, else
    starting the next one (next-fit; an example is never split). Returns all rows (N, row_len)."""
    ids = prompts.dataset.select_columns([PROMPT_IDS, REFERENCE_IDS])
    rows: list[tuple[list[int], list[int], list[float]]] = []
    tokens: list[int] = []
    segments: list[int] = []
    loss: list[float] = []
    for i in np.random.default_rng(seed).permutation(len(prompts)).tolist():
        prompt, completion = ids[i][PROMPT_IDS], ids[i][REFERENCE_IDS]
        n = len(prompt) + len(completion)
        if n > row_len:
            raise DataError(f"an SFT example of {n} tokens does not fit a packed row of {row_len}; raise "
                            "config.train.pack_length")
        if len(tokens) + n > row_len:
            rows.append((tokens, segments, loss))
            tokens, segments, loss = [], [], []
        segment = (segments[-1] + 1) if segments else 1
        tokens += list(prompt) + list(completion)
        segments += [segment] * n
        loss += [0.0] * len(prompt) + [1.0] * len(completion)
    rows.append((tokens, segments, loss))
    return PackedBatch(right_pad([r[0] for r in rows], row_len, pad_id)[0], right_pad([r[1] for r in rows], row_len)[0],
                       right_pad([r[2] for r in rows], row_len, 0.0, np.float32)[0])


class PackedLoader(RowLoader):
    """`RowLoader` batches of packed SFT rows (`pack_examples`): the rows are fixed once, their order shuffled per
    epoch, and the position restorable like any loader's."""

    what = "packed rows"

    def __init__(self, packed: PackedBatch, global_batch_size: int, **loader_settings):
        super().__init__(len(packed.tokens_bl), global_batch_size, **loader_settings)
        self.packed = packed

    def _batch(self, rows: np.ndarray, valid: np.ndarray) -> PackedBatch:
        return PackedBatch(*(x[rows] for x in self.packed))


def load_prompts(cfg: ml_collections.ConfigDict, tokenizer: Any, global_batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> tuple[PromptLoader, PromptLoader | None]:
    """Training loader (shuffled, `cfg.num_epochs`) and eval loader (one ordered pass, all rows) or None."""
    splits = load_prompt_splits(cfg, tokenizer)
    train = PromptLoader(splits.train, global_batch_size, process_index=process_index,
                         process_count=process_count, seed=cfg.seed, shuffle=cfg.shuffle,
                         num_epochs=cfg.num_epochs, drop_last=True)
    held_out = None
    if splits.eval is not None:
        held_out = PromptLoader(splits.eval, global_batch_size, process_index=process_index,
                                process_count=process_count, shuffle=False, num_epochs=1, drop_last=False)
    return train, held_out


def read_jsonl(path: str, required: set[str], what: str = "records") -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line of a JSONL file; a record without one of the `required`
    keys, or a file without records, is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json_record(path, i, line)
            missing = set(required) - set(record)
            if missing:
                raise DataError(f"{path}:{i}: missing keys {sorted(missing)} (expected {sorted(required)})")
            records.append((i, record))
    if not records:
        raise DataError(f"{path} holds no {what}")
    return records


def to_global(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Process-local numpy rows -> global jax.Arrays (each leaf's leading axis sharded by `sharding`).

    Every process passes its own rows; each lands at the batch positions its devices own, which for a mesh
    from `sharding.make_mesh` (devices grouped by process) is the concatenation in process order.
    A sharding such as `sharding.batch_sharding(mesh, 1)` (P(('data', 'fsdp'))) serves leaves of any rank.
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
