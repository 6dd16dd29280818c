#!/usr/bin/env bash
# Install everything (first run) and run the whole test suite: Python tests on this machine, then
# the aarch64 (NEON) kernel tests under qemu when the cross tools are present.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/_install.sh
. .venv/bin/activate
python -m pytest -q "$@"
if [ -x scripts/test_arm.sh ] && command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
  ./scripts/test_arm.sh
else
  echo "test.sh: aarch64-linux-gnu-gcc or qemu-aarch64 missing: NEON kernel lane NOT run" >&2
fi
