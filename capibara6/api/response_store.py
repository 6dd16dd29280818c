"""Stored Responses (`store: true`), for `GET /v1/responses/{id}` and `previous_response_id`.

In memory, one store per process (every port sees the same responses), bounded three ways: a
time to live from the moment a response is stored, a cap on entries and a cap on bytes (the JSON
size of the response plus its conversation). Past a cap the least recently used entries go first;
reading an entry (GET, or a follow-up through `previous_response_id`) makes it recent. Nothing
survives a restart. The clock is injectable so the TTL is testable without sleeping.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was returned
    history: Messages  # the conversation so far as chat messages: earlier turns, this input, this output
    size: int  # bytes counted against the cap
    expires_at: float  # on the store's clock


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], history: Messages) -> bool:
        """Keep `response` (by its id); False when it alone is over the byte cap (then not kept)."""
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(history, ensure_ascii=False))
        if size > self.max_bytes:
            return False
        entry = StoredResponse(response, history, size, self._clock() + self.ttl_s)
        with self._lock:
            self._drop(response["id"])
            self._entries[response["id"]] = entry
            self._bytes += size
            self._expire()
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry, or None when it was never stored, has expired, was evicted or deleted."""
        with self._lock:
            self._expire()
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            self._expire()
            return self._drop(response_id)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _drop(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True

    def _expire(self) -> None:
        now = self._clock()
        for rid in [rid for rid, e in self._entries.items() if e.expires_at <= now]:
            self._drop(rid)


__all__ = ["ResponseStore", "StoredResponse"]
