"""A model's bounded FIFO of requests waiting for a lease.

A waiter is a future the pool resolves with an Instance (granted), or with an error (the load
failed, shutdown). A waiter that gives up (timeout, client gone) is removed; if the grant raced
with its giving up, the caller hands the lease straight back, so a slot never leaks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(eq=False)
class Waiter:
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class WaitQueue:
    def __init__(self) -> None:
        self._q: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._q)

    def push(self, waiter: Waiter) -> None:
        self._q.append(waiter)

    def remove(self, waiter: Waiter) -> None:
        try:
            self._q.remove(waiter)
        except ValueError:
            pass  # already granted or failed

    def pop(self) -> Waiter | None:
        """The oldest waiter still waiting (cancelled ones are dropped)."""
        while self._q:
            w = self._q.popleft()
            if not w.future.done():
                return w
        return None

    def fail_all(self, err: BaseException) -> None:
        while self._q:
            w = self._q.popleft()
            if not w.future.done():
                w.future.set_exception(err)
