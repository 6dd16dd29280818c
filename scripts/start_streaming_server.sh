#!/usr/bin/env bash
# The streaming role alone on 127.0.0.1:8083 (stream defaults to true, tuned for time to first token), from the repo's .venv.
# The seed's three-server layout; one process for all roles instead: scripts/serve.sh.
# Extra args go to `capibara6 serve` (e.g. --api-key-file FILE, --host 0.0.0.0); the port can be
# changed with CAPIBARA6_PORT, the registry with CAPIBARA6_CONFIG.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/capibara6 ]; then
  CAPIBARA6=(.venv/bin/capibara6)
elif [ -x .venv/bin/python ]; then
  CAPIBARA6=(.venv/bin/python -m server)  # same entry point, before the console script is installed
else
  echo "start_streaming_server.sh: no .venv here: run ./scripts/serve.sh once (it installs everything)" >&2
  exit 1
fi
exec "${CAPIBARA6[@]}" serve --config "${CAPIBARA6_CONFIG:-models.yaml}" --role streaming --port "${CAPIBARA6_PORT:-8083}" "$@"
