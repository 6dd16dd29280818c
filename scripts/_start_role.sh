#!/usr/bin/env bash
# Shared by the start_*_server.sh scripts: run one role from the repo's .venv.
# Usage: _start_role.sh ROLE DEFAULT_PORT [capibara6 serve args...]
set -euo pipefail
role=$1 port=$2
shift 2
cd "$(dirname "$0")/.."
if [ -x .venv/bin/capibara6 ]; then
  CAPIBARA6=(.venv/bin/capibara6)
elif [ -x .venv/bin/python ]; then
  CAPIBARA6=(.venv/bin/python -m capibara6)  # same entry point, before the console script is installed
else
  echo "start_${role}: no .venv here: run ./scripts/serve.sh once (it installs everything)" >&2
  exit 1
fi
exec "${CAPIBARA6[@]}" serve --config "${CAPIBARA6_CONFIG:-models.yaml}" --role "$role" --port "${CAPIBARA6_PORT:-$port}" "$@"
