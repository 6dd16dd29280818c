#!/usr/bin/env bash
# Build (once) an aarch64 Debian userland with python3.11 + numpy + cffi + pytest in $ARM_ROOT
# (default: <repo>/.arm-root/root), without touching host packages (no dpkg --add-architecture).
# See /work/shared/ARM_TESTING.md. Idempotent: exits at once when the root is complete.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARM_DIR="${ARM_DIR:-$REPO/.arm-root}"
ROOT="${ARM_ROOT:-$ARM_DIR/root}"
STAMP="$ROOT/.capibara6-root-v1"
if [[ -f "$STAMP" ]]; then
    exit 0
fi
ARCH_PKGS="libblas3 libbz2-1.0 libc6 libcrypt1 libexpat1 libffi8 libgcc-s1 libgfortran5 libgomp1
liblapack3 liblzma5 libncursesw6 libopenblas0-pthread libopenblas0 libpython3.11-minimal
libpython3.11-stdlib libreadline8 libsqlite3-0 libssl3 libstdc++6 libtinfo6 libuuid1
python3-cffi-backend python3-numpy python3.11-minimal zlib1g libpython3.11-dev python3.11-dev"
ALL_PKGS="python3-attr python3-cffi python3-exceptiongroup python3-iniconfig python3-packaging
python3-pluggy python3-ply python3-py python3-pycparser python3-pytest python3-tomli"
APTOPT=(-o APT::Architectures=amd64,arm64)
mkdir -p "$ARM_DIR/debs" "$ROOT"
echo "[arm-root] apt-get update (amd64+arm64 indexes, no dpkg architecture change)"
apt-get "${APTOPT[@]}" update -qq
cd "$ARM_DIR/debs"
pkgs=()
for p in $ARCH_PKGS; do pkgs+=("$p:arm64"); done
for p in $ALL_PKGS; do pkgs+=("$p"); done
echo "[arm-root] downloading ${#pkgs[@]} packages"
apt-get "${APTOPT[@]}" download -qq "${pkgs[@]}"
for d in *.deb; do dpkg-deb -x "$d" "$ROOT"; done
LIB="$ROOT/usr/lib/aarch64-linux-gnu"
for so in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
    if [[ -e "$LIB/openblas-pthread/$so" ]]; then ln -sf "openblas-pthread/$so" "$LIB/$so"; fi
done
touch "$STAMP"
echo "[arm-root] ready: $ROOT"
