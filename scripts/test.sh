#!/usr/bin/env bash
# Run the test suite. On a fresh machine with only python3 this creates (or reuses) a virtual
# environment in .venv, installs rlaif_jax with its test extra, then runs pytest.
# Extra arguments go to pytest:  bash scripts/test.sh -k parity -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pytest tests "$@"
