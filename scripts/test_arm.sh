#!/usr/bin/env bash
# ARM lane: cross-compile capibara6/kernels/ for aarch64 (Neoverse-V2 via -mcpu=demeter, so the NEON paths are
# built) and run tests/kernels under qemu-aarch64 with an aarch64 Python 3.11 + numpy + cffi + pytest.
# Needs: aarch64-linux-gnu-gcc, qemu-aarch64 (apt-get install -y gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross qemu-user) and a host python3 with cffi. The aarch64 root is cached in
# .arm-root/ (gitignored). Nothing aarch64 is written into the source tree.
#   CAPIBARA6_ARM_PORTABLE=0  skip the second run on a -DC6_FORCE_PORTABLE aarch64 build (portable C).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARM_DIR="${ARM_DIR:-$REPO/.arm-root}"
ROOT="${ARM_ROOT:-$ARM_DIR/root}"
HOST_PY="${HOST_PY:-}"
if [[ -z "$HOST_PY" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then HOST_PY="$REPO/.venv/bin/python"; else HOST_PY=python3; fi
fi
CC=aarch64-linux-gnu-gcc
for tool in "$CC" qemu-aarch64; do
    command -v "$tool" >/dev/null || { echo "test_arm.sh: $tool not found" >&2; exit 2; }
done
t0=$(date +%s)
ARM_DIR="$ARM_DIR" ARM_ROOT="$ROOT" "$REPO/scripts/build_arm_root.sh"
t1=$(date +%s)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/capibara6-arm.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
QEMU=(qemu-aarch64 -cpu max,sve-default-vector-length=16 -L "$ROOT")
PYINC="$ROOT/usr/include/python3.11"
[[ -f "$PYINC/Python.h" ]] || { echo "test_arm.sh: missing $PYINC/Python.h" >&2; exit 2; }

build_variant() {  # $1 = output dir, $2.. = extra cflags
    local out="$1"; shift
    mkdir -p "$out/capibara6/kernels"
    cp "$REPO/capibara6/__init__.py" "$out/capibara6/"
    cp "$REPO/capibara6/kernels/__init__.py" "$out/capibara6/kernels/"
    (cd "$REPO" && CAPIBARA6_PORTABLE=1 "$HOST_PY" capibara6/kernels/build_ffi.py --emit-c "$out/_kernels.c")
    # shellcheck disable=SC2086
    $CC -shared -fPIC -O3 -std=gnu11 -pthread -fno-math-errno -mcpu=demeter "$@" \
        -I"$ROOT/usr/include" -I"$PYINC" -I"$REPO/capibara6/kernels/src" \
        "$out/_kernels.c" "$REPO"/capibara6/kernels/src/*.c -lm \
        -o "$out/capibara6/kernels/_kernels.cpython-311-aarch64-linux-gnu.so"
}

run_suite() {  # $1 = dir holding the kernels package; QEMU_CPU=... picks another CPU model
    # run from a directory without the repo's capibara6/kernels/ so the aarch64 build is the one imported
    local qemu=("${QEMU[@]}")
    [[ -n "${QEMU_CPU:-}" ]] && qemu=(qemu-aarch64 -cpu "$QEMU_CPU" -L "$ROOT")
    (cd "$WORK" && PYTHONPATH="$1" PYTHONDONTWRITEBYTECODE=1 "${qemu[@]}" "$ROOT/usr/bin/python3.11" \
        -m pytest "$REPO/tests/kernels" -q -p no:cacheprovider -o addopts="" \
        --rootdir "$WORK" -c /dev/null --confcutdir "$REPO/tests/kernels" "${@:2}")
}

echo "[arm] cross-compiling kernels for aarch64 (-mcpu=demeter = Neoverse-V2, NEON paths)"
build_variant "$WORK/neon"
t2=$(date +%s)
"${QEMU[@]}" "$ROOT/usr/bin/python3.11" -c "import sys; sys.path.insert(0, '$WORK/neon'); from capibara6 import kernels; \
info = kernels.build_info(); print('[arm] build_info:', info); assert info['neon'], 'NEON paths not compiled'"
echo "[arm] running tests/kernels under qemu-aarch64 (NEON paths)"
run_suite "$WORK/neon"
echo "[arm] NEON without the dot-product extension (armv8.0: -mcpu=cortex-a72): quantized matmul tests"
build_variant "$WORK/nodot" -mcpu=cortex-a72
run_suite "$WORK/nodot" -k "quant"
echo "[arm] NEON with dotprod, without i8mm (-mcpu=neoverse-n1, run on qemu's neoverse-n1, which has no i8mm): quantized matmul tests"
build_variant "$WORK/noi8mm" -mcpu=neoverse-n1
QEMU_CPU=neoverse-n1 run_suite "$WORK/noi8mm" -k "quant"
t3=$(date +%s)
if [[ "${CAPIBARA6_ARM_PORTABLE:-1}" == "1" ]]; then
    echo "[arm] portable C paths on aarch64 (-DC6_FORCE_PORTABLE)"
    build_variant "$WORK/portable" -DC6_FORCE_PORTABLE
    "${QEMU[@]}" "$ROOT/usr/bin/python3.11" -c "import sys; sys.path.insert(0, '$WORK/portable'); \
from capibara6 import kernels; assert kernels.build_info()['portable']"
    run_suite "$WORK/portable"
fi
t4=$(date +%s)
echo "[arm] OK: NEON paths (dotprod+i8mm, dotprod without i8mm, armv8.0; portable C unless CAPIBARA6_ARM_PORTABLE=0) tested under qemu-aarch64 (root $((t1 - t0))s, build $((t2 - t1))s, tests $((t3 - t2))s, portable $((t4 - t3))s)"
