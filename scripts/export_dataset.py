"""Write a public dataset, read by its schema (`rlaif_jax.data.DATASETS`), as the JSONL files the pipeline reads.

    python scripts/export_dataset.py --dataset vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144 \\
        --kind preferences --out comparisons.jsonl      # -> the reward-model stage, config.data.path
    python scripts/export_dataset.py --dataset vwxyzjn/summarize_from_feedback_tldr_3_filtered \\
        --kind sft --split train --out references.jsonl  # -> SFT, config.data.normalize_to of the RM stage

--kind preferences: {"prompt", "response_a" (the preferred), "response_b", "p_a_better": 1.0} per comparison;
--kind pairs: the same pairs without the human's label, for an AI labeller (RLAIF: the reward-model stage's
config.label_judge labels them, `python -m rlaif_jax.reward_model_stage`), A and B alternating between the preferred and the other reply;
--kind sft: {"prompt", "completion"} per reference response (TRL's prompt-completion format). Prompts are text
(Anthropic HH: the dialogue up to the final "\\n\\nAssistant:"). --path reads a local copy in the same schema.
"""
from __future__ import annotations

import json
import logging

from absl import app, flags

from rlaif_jax import data

log = logging.getLogger("export_dataset")

flags.DEFINE_enum("dataset", None, sorted(data.DATASETS), "hub name of the dataset (its schema)", required=True)
flags.DEFINE_enum("kind", None, ["preferences", "pairs", "sft"], "what to write", required=True)
flags.DEFINE_string("out", None, "output JSONL", required=True)
flags.DEFINE_string("path", "", "a local copy of the dataset in its schema (default: the hub dataset)")
flags.DEFINE_string("split", "train", "split (slices like train[:1000] work)")
flags.DEFINE_string("data_dir", "", "hub sub-folder (Anthropic/hh-rlhf: helpful-base, harmless-base, ...)")


def main(argv):
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    schema = data.DATASETS[F.dataset]
    pairs = F.kind in ("preferences", "pairs")
    if not (schema.has_pairs if pairs else schema.has_reference):
        raise SystemExit(f"{F.dataset} has no {'comparisons' if pairs else 'reference responses'}"
                         f"; datasets with them: " + ", ".join(
                             n for n, s in sorted(data.DATASETS.items()) if (s.has_pairs if pairs else s.has_reference)))
    examples = data.read_examples(F.dataset, F.path, F.split, F.data_dir)
    if pairs:
        records, left_out = data.preference_records(examples, labelled=F.kind == "preferences")
    else:
        records, left_out = data.sft_records(examples)
    with open(F.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    log.info("wrote %d %s records to %s (%d rows without them left out)", len(records), F.kind, F.out, left_out)


if __name__ == "__main__":
    app.run(main)
