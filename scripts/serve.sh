#!/usr/bin/env bash
# Install everything (first run) and serve the registry (default: the embedded Gemma 3 270M) on
# 127.0.0.1:8082 (standard), :8083 (streaming) and :8084 (consensus). Extra args go to
# `capibara6 serve`, e.g. ./scripts/serve.sh --host 0.0.0.0 --api-key secret
set -euo pipefail
cd "$(dirname "$0")/.."
CAPIBARA6_EXTRAS="" ./scripts/_install.sh
. .venv/bin/activate
exec capibara6 serve --config "${CAPIBARA6_CONFIG:-models.yaml}" "$@"
