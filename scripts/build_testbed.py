"""Build (or reuse from the cache) the testbed's tokenizer, SFT policy and judge.

    python scripts/build_testbed.py                  # full build into ~/.cache/rlaif_jax/testbed/<key>
    python scripts/build_testbed.py --fast           # the quick test-scale build
    python scripts/build_testbed.py --out DIR --force --seed 1

Prints the folders (HF checkpoints: rlaif_jax.models.hf.load_model or transformers load them) and what the
build measured: training losses and the judge's agreement with the ground-truth grader on fresh examples.
"""
from __future__ import annotations

import argparse
import json
import sys

from rlaif_jax.testbed import build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the test-scale build (fewer training steps)")
    parser.add_argument("--out", default=None, help="build into this folder instead of the cache")
    parser.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/rlaif_jax/testbed)")
    parser.add_argument("--seed", type=int, default=None, help="seed of data and init (default: the build config's)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a finished build exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, only log lines")
    args = parser.parse_args(argv)

    config = build.fast_config() if args.fast else build.default_config()
    if args.seed is not None:
        config.seed = args.seed
    if args.cache_dir:
        config.cache_dir = args.cache_dir
    art = build.build(config, out_dir=args.out, force=args.force, show_progress=not args.no_progress)
    summary = {
        "root": art.root, "policy": art.policy_dir, "judge": art.judge_dir, "tokenizer": art.tokenizer_dir,
        "sft_final_loss": art.info["sft"]["final_loss"], "judge_final_loss": art.info["judge"]["final_loss"],
        "judge_agreement": art.info["judge"]["agreement"],
        "build_seconds": {"sft": art.info["sft"]["seconds"], "judge": art.info["judge"]["seconds"],
                          "total": art.info["total_seconds"]},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
