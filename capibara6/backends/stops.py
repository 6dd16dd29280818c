"""Token-by-token text assembly with stop strings, shared by every local backend.

Token bytes are decoded incrementally (a UTF-8 character may span tokens), and text that could be
the start of a stop string is held back until it is known not to be one, so a stop string never
leaks into the output, not even partly.
"""

from __future__ import annotations

import codecs
from typing import Sequence


class StopText:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet released
        self.stopped = False

    def _holdback(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of a stop."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to emit ('' while held back)."""
        return self.push(self._decoder.decode(piece)) if not self.stopped else ""

    def push(self, text: str) -> str:
        """Add already-decoded text (a backend with its own UTF-8 decoder); as `feed`."""
        if self.stopped:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return out
        keep = self._holdback()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        return out

    def flush(self) -> str:
        """At the end of generation: whatever is held back (no stop string followed)."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
