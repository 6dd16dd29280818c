#!/usr/bin/env python3
"""Serving benchmark against an OpenAI-compatible URL; same flags as `capibara6 bench`.

Example: python scripts/bench_serving.py --url http://127.0.0.1:8082 --concurrency 1,8 --out bench-out/a.json
The last stdout line is JSON (per-level digest, or ratios with --compare).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capibara6.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
