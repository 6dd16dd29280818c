"""Serving benchmark: drives any OpenAI-compatible server with a seeded prompt set at several
concurrency levels over streaming HTTP and reports TTFT, inter-token latency, tok/s and errors.

Modules: prompts (seeded prompt set), client (one timed SSE request), runner (levels, bounds),
stats (percentiles), report (JSON + table), compare (before/after table + PNG), cli (`capibara6 bench`).
"""
