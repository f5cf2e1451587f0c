#!/usr/bin/env bash
# The demo: installs (into .venv, as scripts/test.sh does), builds or reuses the testbed's SFT policy and
# judge, runs RLAIF on a laptop CPU, and prints SFT vs RLAIF. Extra arguments go to scripts/demo.py:
#   bash scripts/demo.sh --seed 1 --workdir runs/demo_seed1
#   bash scripts/demo.sh --config_arg judge=relevance --workdir runs/hack   # the reward-hacking ablation
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python scripts/demo.py "$@"
