#!/usr/bin/env bash
# Shared by serve.sh and test.sh: create .venv if needed, probe the CPU, build llama.cpp and our
# kernels with flags this CPU really runs, install the project (editable), then prove it with one
# real generation in a child process. Re-running is cheap: each llama.cpp build is cached as a wheel
# keyed by (version, CMake flags, machine, Python, compiler) in ~/.cache/capibara6/wheels, because
# pip's own wheel cache ignores CMAKE_ARGS and would hand back a build made with other flags.
#
# Why probe: on an AMX-reporting Xeon VM, llama.cpp built with GGML_NATIVE=ON faults at its first
# decode (ldtilecfg in ggml_backend_amx_mul_mat). `python -m server.hw decide` compiles and runs a
# tiny program per ISA extension the CPU reports (a fault is an answer) and picks GGML_NATIVE=ON
# only when every one runs; otherwise GGML_NATIVE=OFF with the working extensions spelled out.
# An explicit CMAKE_ARGS from you wins. If the smoke generation still dies by a signal, the build is
# redone once with the fallback flags (without AMX / SVE), and the install fails loudly if that dies too.
#   CAPIBARA6_LLAMA_CPP_PYTHON_VERSION  llama-cpp-python to build (default below)
#   CAPIBARA6_WHEEL_CACHE               where built llama.cpp wheels are kept
#   CAPIBARA6_EXTRAS                    pip extras of the project (default [dev]; serve.sh: none)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LLAMA_VERSION="${CAPIBARA6_LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEELS="${CAPIBARA6_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capibara6/wheels}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
STATE="$VIRTUAL_ENV/capibara6-build.json"   # the decision, read by `capibara6 doctor`

say() { echo "capibara6 install: $*" >&2; }
die() { echo "capibara6 install: FAILED: $*" >&2; exit 1; }

# C6_LLAMA_CMAKE_ARGS, C6_LLAMA_FALLBACK_CMAKE_ARGS, C6_LLAMA_SOURCE, C6_KERNEL_ARCH_FLAGS
eval "$(python -m server.hw decide --state "$STATE" --llama-version "$LLAMA_VERSION")"

llama_wheel() {  # $1 = CMake args; prints the path of a wheel built with exactly those flags
  local key dir
  key=$(printf '%s\n' "$LLAMA_VERSION" "$1" "$(uname -m)" "$(python -c 'import sys; print(sys.implementation.cache_tag)')" \
        "$(cc --version 2>/dev/null | head -1)" | sha256sum | cut -c1-16)
  dir="$WHEELS/llama-cpp-python-$LLAMA_VERSION-$key"
  if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama.cpp (llama-cpp-python $LLAMA_VERSION) with CMAKE_ARGS=\"$1\": about 6 min on 2 cores, once per flag set"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    CMAKE_ARGS="$1" python -m pip wheel -q --no-deps --no-cache-dir -w "$dir.tmp" "llama-cpp-python==$LLAMA_VERSION" >&2
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  ls "$dir"/llama_cpp_python-*.whl | head -1
}

install_llama() {  # $1 = CMake args; (re)installs only when the venv holds another build
  local whl marker="$VIRTUAL_ENV/.capibara6-llama-wheel"
  whl=$(llama_wheel "$1")
  if [ "$(cat "$marker" 2>/dev/null)" != "$whl" ] || ! python -c 'import llama_cpp' 2>/dev/null; then
    python -m pip install -q --no-deps --force-reinstall "$whl"
    echo "$whl" > "$marker"
  fi
}

smoke() {  # $1 = target (llama | kernels); sets SMOKE_RC (0 ok, 3 died by a signal, else failed) and SMOKE_OUT
  set +e
  SMOKE_OUT=$(python -m server.smoke "$1")
  SMOKE_RC=$?
  set -e
  [ -n "$SMOKE_OUT" ] || SMOKE_OUT='{"ok": false, "detail": "no answer"}'
  python -m server.hw record-smoke --state "$STATE" --target "$1" --result "$SMOKE_OUT"
}

install_llama "$C6_LLAMA_CMAKE_ARGS"
export CAPIBARA6_KERNEL_ARCH_FLAGS="$C6_KERNEL_ARCH_FLAGS"   # read by kernels/build_ffi.py
python -m pip install -q -e ".${CAPIBARA6_EXTRAS:-[dev]}"

smoke kernels
if [ "$SMOKE_RC" = 3 ]; then
  say "our kernels died by a signal with ${C6_KERNEL_ARCH_FLAGS:--march=native}: rebuilding them portable (no -march)"
  CAPIBARA6_PORTABLE=1 python kernels/build_ffi.py >/dev/null
  smoke kernels
  python -m server.hw record-smoke --state "$STATE" --target kernels --result "$SMOKE_OUT" \
    --kernel-arch-flags "portable" --why "the -march=native build died by a signal in its smoke test"
fi
[ "$SMOKE_RC" = 0 ] || die "our C kernels do not compute right on this CPU: $SMOKE_OUT. Try CAPIBARA6_PORTABLE=1 ./scripts/_install.sh and report the CPU (capibara6 doctor)."

smoke llama
if [ "$SMOKE_RC" = 3 ] && [ "$C6_LLAMA_SOURCE" != user ] && [ -n "$C6_LLAMA_FALLBACK_CMAKE_ARGS" ]; then
  say "llama.cpp built with \"$C6_LLAMA_CMAKE_ARGS\" died by a signal in its first generation: rebuilding with \"$C6_LLAMA_FALLBACK_CMAKE_ARGS\""
  eval "$(python -m server.hw fallback --state "$STATE" --why "the build with $C6_LLAMA_CMAKE_ARGS died by a signal in its smoke generation")"
  install_llama "$C6_LLAMA_CMAKE_ARGS"
  smoke llama
fi
if [ "$SMOKE_RC" != 0 ]; then
  die "llama.cpp cannot generate on this machine with CMAKE_ARGS=\"$C6_LLAMA_CMAKE_ARGS\": $SMOKE_OUT
  Fix: rerun with the baseline build, e.g.
    CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" ./scripts/_install.sh   (x86-64)
    CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod\" ./scripts/_install.sh              (aarch64)
  and run 'capibara6 doctor' to see what this CPU reports."
fi
say "llama.cpp ($C6_LLAMA_SOURCE: CMAKE_ARGS=\"$C6_LLAMA_CMAKE_ARGS\") and our kernels generate on this CPU"
