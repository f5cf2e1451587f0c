#!/usr/bin/env bash
# Run the test suite. On a fresh machine with only python3 this creates (or reuses) a virtual
# environment in .venv, installs rlaif_jax with its test extra, then runs pytest.
# Extra arguments go to pytest:  bash scripts/test.sh -k parity -x
# The tests run in RLAIF_TEST_WORKERS worker processes (default 2, pytest-xdist), each test file on one worker
# (its module fixtures built once); RLAIF_TEST_WORKERS=0 runs them in this process. Files are dealt in the order of
# tests/conftest.py's SLOWEST_FIRST (--no-loadscope-reorder: not xdist's default order, by number of tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pytest tests -n "${RLAIF_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
