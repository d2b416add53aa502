#!/usr/bin/env bash
# The LLaMPPL baseline's own environment (never a dependency of lmcascade): benchmarks/.venv-llamppl
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv-llamppl/bin/python ] || "$PYTHON" -m venv .venv-llamppl
.venv-llamppl/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv-llamppl/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "llamppl==0.2.3"
