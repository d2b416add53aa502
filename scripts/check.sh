#!/usr/bin/env bash
# The checks CI runs: lint, formatting, then the test suite (with doctests and docs examples).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check lmcascade tests benchmarks examples scripts
.venv/bin/python -m pytest "$@"
