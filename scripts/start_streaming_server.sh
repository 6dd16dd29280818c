#!/usr/bin/env bash
# The streaming role alone on 127.0.0.1:8083 (stream defaults to true, tuned for time to first token), from the repo's .venv.
# The seed's three-server layout; one process for all roles instead: scripts/serve.sh.
# Extra args go to `capibara6 serve` (e.g. --api-key-file FILE, --host 0.0.0.0); the port can be
# changed with CAPIBARA6_PORT, the registry with CAPIBARA6_CONFIG.
set -euo pipefail
exec "$(dirname "$0")/_start_role.sh" streaming 8083 "$@"
