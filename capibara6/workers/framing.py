"""The wire between the server and one worker: two Unix socketpairs, one per direction (server ->
worker: requests, cancels; worker -> server: answers, tokens), each framed by
`multiprocessing.connection.Connection` (a 4-byte big-endian length, then the payload).

One socket per direction because a Unix socket has one wait queue for its readers and writers:
over a single socketpair, every token frame the worker wrote woke its main thread (blocked reading
the same socket for the next request) once the server had read the frame, on the worker's own
pinned CPU: 1.06 wakeups and 15-75 us of that CPU per token, measured from
/proc/PID/task/TID/schedstat.

Payload, by its first byte:

- `t` token fast path: `<I` request id, `<i` token id, then the text as UTF-8 (a TokenEvent
  with no logprobs and no piece: the common case, ~20 bytes a token, no pickle).
- `p` everything else: a pickled `(op, request_id, body)` tuple. Control messages carry the
  contract's dataclasses (Prompt, Prepared, SamplingParams, TokenEvent, GenerationOutcome)
  pickled whole, so a field added to them crosses the boundary with no change here.

Requests are multiplexed by id over the one connection (a batched instance runs several
generations at once); request id 0 is the worker itself (load, close).
"""

from __future__ import annotations

import importlib
import pickle
import struct
from typing import Any

from ..types import TokenEvent

_TOKEN = struct.Struct("<Ii")

Message = tuple[str, int, Any]


def encode_token(req: int, ev: TokenEvent) -> bytes:
    """The `t` frame when the event fits it, else a pickled ("tok", req, event)."""
    if ev.logprob is None and ev.top_logprobs is None and ev.piece is None and type(ev) is TokenEvent:
        return b"t" + _TOKEN.pack(req, ev.token_id) + ev.text.encode("utf-8", "surrogatepass")
    return encode("tok", req, ev)


def encode(op: str, req: int, body: Any = None) -> bytes:
    return b"p" + pickle.dumps((op, req, body), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    if data[:1] == b"t":
        req, token_id = _TOKEN.unpack_from(data, 1)
        return "tok", req, TokenEvent(token_id, data[1 + _TOKEN.size :].decode("utf-8", "surrogatepass"))
    op, req, body = pickle.loads(data[1:])
    return str(op), int(req), body


def pack_error(err: BaseException) -> tuple[str, str, tuple[Any, ...], dict[str, Any], str]:
    """An exception as (module, class, args, __dict__, str): rebuilt without calling its
    __init__, so errors with their own constructors (ContextLengthExceeded) cross as themselves."""
    state = {k: v for k, v in vars(err).items() if _picklable(v)} if hasattr(err, "__dict__") else {}
    args = err.args if _picklable(err.args) else (str(err),)
    return type(err).__module__, type(err).__qualname__, args, state, f"{type(err).__name__}: {err}"


def unpack_error(body: tuple[str, str, tuple[Any, ...], dict[str, Any], str]) -> BaseException:
    module, name, args, state, text = body
    try:
        cls = getattr(importlib.import_module(module), name)
        err = cls.__new__(cls)
        BaseException.__init__(err, *args)
        err.__dict__.update(state)
        return err
    except Exception:
        return RuntimeError(text)


def _picklable(v: Any) -> bool:
    try:
        pickle.dumps(v)
        return True
    except Exception:
        return False
