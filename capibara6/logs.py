"""Structured logs: one JSON object per line on stderr (journald and log shippers parse it as is).

Every record carries `ts`, `level`, `logger`, `msg`; a record made while a request is handled also
carries its `request_id` (a context variable set by the request middleware, so pool and serving
logs need no plumbing). Extra fields passed as `logger.info(..., extra={"fields": {...}})` are
merged in. Prompt text is never logged unless the operator turns on `log_prompts`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("capibara6_request_id", default=None)

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "fields"}


class JsonFormatter(logging.Formatter):
    """LogRecord -> one line of JSON; never raises on odd values (falls back to str())."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        for key, value in vars(record).items():  # plain `extra={...}` keys
            if key not in _STD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Route the root logger (and uvicorn's) through one JSON handler. Idempotent."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


__all__ = ["JsonFormatter", "request_id_var", "setup_logging"]
