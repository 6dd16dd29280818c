#!/usr/bin/env bash
# Install everything (first run), run the lint and type gates (ruff, mypy), then the whole test
# suite: Python tests on this machine, then
# the aarch64 (NEON) kernel tests under qemu when the cross tools are present.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/_install.sh
. .venv/bin/activate
# gates first (configured in pyproject.toml): lint and import order, then types
ruff check capibara6 tests scripts
mypy capibara6
python -m pytest -q "$@"
if [ -x scripts/test_arm.sh ] && command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
  ./scripts/test_arm.sh
else
  echo "test.sh: aarch64-linux-gnu-gcc or qemu-aarch64 missing: NEON kernel lane NOT run" >&2
fi
