# Sourced by _install.sh and install_c4a.sh (not run): build llama.cpp and our kernels with flags
# this CPU really runs, and prove them with one real generation in a child process.
#
# Why: on an AMX-reporting Xeon VM, llama.cpp built with GGML_NATIVE=ON faults at its first decode
# (ldtilecfg in ggml_backend_amx_mul_mat). `python -m capibara6.hw decide` compiles and runs a tiny
# program per ISA extension the CPU reports (in a child: a fault is an answer) and keeps
# GGML_NATIVE=ON only when every one runs; otherwise GGML_NATIVE=OFF with the working extensions
# spelled out. An explicit CMAKE_ARGS wins. If the smoke generation still dies by a signal, llama.cpp
# is rebuilt once with the fallback flags (without AMX / SVE), and the install fails loudly if that
# dies too. Each build is cached as a wheel keyed by (version, CMake flags, machine, Python,
# compiler): pip's own wheel cache ignores CMAKE_ARGS and would hand back a build made with others.
#
# Needs: `python` on PATH is the target venv's; C6_SRC = the source tree; C6_STATE = the state file
# (`capibara6 doctor` shows it); a function `c6_rebuild_kernels_portable` from the caller.
#   CAPIBARA6_LLAMA_CPP_PYTHON_VERSION  llama-cpp-python to build (default below)
#   CAPIBARA6_WHEEL_CACHE               where built llama.cpp wheels are kept
#   CAPIBARA6_REBUILD_LLAMA=1           build again even when a cached wheel exists

C6_LLAMA_VERSION="${CAPIBARA6_LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
C6_WHEELS="${CAPIBARA6_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capibara6/wheels}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

c6_say() { echo "capibara6 install: $*" >&2; }
c6_die() { echo "capibara6 install: FAILED: $*" >&2; exit 1; }

c6_decide() {  # sets C6_LLAMA_CMAKE_ARGS, C6_LLAMA_FALLBACK_CMAKE_ARGS, C6_LLAMA_SOURCE, C6_KERNEL_ARCH_FLAGS
  local lines
  lines=$(cd "$C6_SRC" && python -m capibara6.hw decide --state "$C6_STATE" --llama-version "$C6_LLAMA_VERSION") || c6_die "the CPU probe failed"
  eval "$lines"
  export CAPIBARA6_KERNEL_ARCH_FLAGS="$C6_KERNEL_ARCH_FLAGS"   # read by capibara6/kernels/build_ffi.py
}

c6_llama_dir() {  # $1 = CMake args; the cache folder of that build. A native build is only good
  # for the CPU it was made on, so its key holds the CPU's model and flags as well.
  local cpu=""
  case "$1" in *GGML_NATIVE=OFF*) ;; *) cpu=$(grep -m2 -E '^(model name|flags|Features|CPU part)' /proc/cpuinfo 2>/dev/null || true) ;; esac
  printf '%s/llama-cpp-python-%s-%s\n' "$C6_WHEELS" "$C6_LLAMA_VERSION" "$(printf '%s\n' "$C6_LLAMA_VERSION" "$1" "$(uname -m)" \
    "$(python -c 'import sys; print(sys.implementation.cache_tag)')" "$(cc --version 2>/dev/null | head -1)" "$cpu" | sha256sum | cut -c1-16)"
}

c6_llama_wheel() {  # $1 = CMake args; prints the path of a wheel built with exactly those flags
  local dir
  dir=$(c6_llama_dir "$1")
  if [ "${CAPIBARA6_REBUILD_LLAMA:-0}" = 1 ]; then rm -rf "$dir"; fi
  if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    c6_say "building llama.cpp (llama-cpp-python $C6_LLAMA_VERSION) with CMAKE_ARGS=\"$1\": about 6 min on 2 cores, once per flag set"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    CMAKE_ARGS="$1" python -m pip wheel -q --no-deps --no-cache-dir -w "$dir.tmp" "llama-cpp-python==$C6_LLAMA_VERSION" >&2 \
      || c6_die "building llama.cpp with CMAKE_ARGS=\"$1\" failed (see above)"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  ls "$dir"/llama_cpp_python-*.whl | head -1
}

c6_use_fallback() {  # $1 = why; switches C6_LLAMA_* to the fallback build
  c6_say "$1: using \"$C6_LLAMA_FALLBACK_CMAKE_ARGS\""
  eval "$(cd "$C6_SRC" && python -m capibara6.hw fallback --state "$C6_STATE" --why "$1")"
}

c6_install_llama() {  # $1 = CMake args; (re)installs only when the venv holds another build.
  # A build whose smoke died by a signal on this CPU before is skipped for the fallback at once.
  local whl marker
  if [ -e "$(c6_llama_dir "$1")/CRASHED" ] && [ "$C6_LLAMA_SOURCE" != user ] && [ -n "$C6_LLAMA_FALLBACK_CMAKE_ARGS" ]; then
    c6_use_fallback "llama.cpp built with $1 died by a signal here before ($(c6_llama_dir "$1")/CRASHED)"
    set -- "$C6_LLAMA_CMAKE_ARGS"
  fi
  marker="$(python -c 'import sys; print(sys.prefix)')/.capibara6-llama-wheel"
  whl=$(c6_llama_wheel "$1")
  if [ "$(cat "$marker" 2>/dev/null)" != "$whl" ] || ! python -c 'import llama_cpp' 2>/dev/null; then
    python -m pip install -q --no-deps --force-reinstall "$whl"
    echo "$whl" > "$marker"
  fi
}

c6_smoke() {  # $1 = llama | kernels; sets C6_SMOKE_RC (0 ok, 3 died by a signal, else failed), C6_SMOKE_OUT
  set +e
  C6_SMOKE_OUT=$(cd / && python -m capibara6.smoke "$1")   # from /: the installed package, not the source tree
  C6_SMOKE_RC=$?
  set -e
  [ -n "$C6_SMOKE_OUT" ] || C6_SMOKE_OUT='{"ok": false, "detail": "no answer"}'
  (cd "$C6_SRC" && python -m capibara6.hw record-smoke --state "$C6_STATE" --target "$1" --result "$C6_SMOKE_OUT")
}

c6_prove() {  # after the project is installed: smoke both, with one rebuild each on a signal death
  c6_smoke kernels
  if [ "$C6_SMOKE_RC" = 3 ]; then
    c6_say "our kernels died by a signal built with ${C6_KERNEL_ARCH_FLAGS:--march=native}: rebuilding them portable (no -march)"
    c6_rebuild_kernels_portable
    c6_smoke kernels
    (cd "$C6_SRC" && python -m capibara6.hw record-smoke --state "$C6_STATE" --target kernels --result "$C6_SMOKE_OUT" \
      --kernel-arch-flags portable --why "the build with ${C6_KERNEL_ARCH_FLAGS:--march=native} died by a signal in its smoke test")
  fi
  [ "$C6_SMOKE_RC" = 0 ] || c6_die "our C kernels do not compute right on this CPU: $C6_SMOKE_OUT
  Fix: CAPIBARA6_PORTABLE=1 (no -march flags) and rerun; 'capibara6 doctor' shows what this CPU reports."

  c6_smoke llama
  if [ "$C6_SMOKE_RC" = 3 ]; then  # remembered, so the next install goes straight to the fallback
    echo "$C6_SMOKE_OUT" > "$(c6_llama_dir "$C6_LLAMA_CMAKE_ARGS")/CRASHED"
  fi
  if [ "$C6_SMOKE_RC" = 3 ] && [ "$C6_LLAMA_SOURCE" != user ] && [ -n "$C6_LLAMA_FALLBACK_CMAKE_ARGS" ]; then
    c6_use_fallback "llama.cpp built with $C6_LLAMA_CMAKE_ARGS died by a signal in its first generation"
    c6_install_llama "$C6_LLAMA_CMAKE_ARGS"
    c6_smoke llama
  fi
  [ "$C6_SMOKE_RC" = 0 ] || c6_die "llama.cpp cannot generate on this machine with CMAKE_ARGS=\"$C6_LLAMA_CMAKE_ARGS\": $C6_SMOKE_OUT
  Fix: rerun with a baseline build, e.g.
    CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\"   (x86-64)
    CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod\"                    (aarch64)
  and run 'capibara6 doctor' to see what this CPU reports."
  c6_say "llama.cpp ($C6_LLAMA_SOURCE: CMAKE_ARGS=\"$C6_LLAMA_CMAKE_ARGS\") and our kernels generate on this CPU"
}
