#!/usr/bin/env bash
# Shared by serve.sh and test.sh: create .venv if needed and install the project (editable, with
# the C kernels built in place). Re-running is cheap: pip skips what is already installed, and
# llama-cpp-python's compiled wheel is cached by pip after the first build (~6 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
if [ "$(uname -m)" = "aarch64" ] && [ -z "${CMAKE_ARGS:-}" ]; then
  # Axion / Neoverse-V2: native CPU flags plus Arm's KleidiAI micro-kernels for quantized matmul.
  export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CPU_KLEIDIAI=ON"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python -m pip install -q -e ".${CAPIBARA6_EXTRAS:-[dev]}"
