"""A bound on how long a callback waits for its commit.

The writer can wait without end: for another process's turn (the writers' flock), for a lock
another session holds, for a hung PostgreSQL. Runflow expects an answer within a few seconds
and retries a 503, so a callback not committed within the bound gets StoreTimeout, and the
writer skips it if its transaction has not begun by then (writer.waits): Runflow's retry
stores it. One whose transaction already began may still commit: the retry is then a
duplicate, which is harmless.

Every waiter has the same bound, so they expire in the order they came: one FIFO and one timer,
set for the oldest waiter, instead of a timer per callback (the ack path pays an append).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any, TypeVar

from ..errors import StoreTimeout

T = TypeVar("T")


class Deadlines:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._pending: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, future: asyncio.Future[T]) -> asyncio.Future[T]:
        """`future`, failed with StoreTimeout if it is still pending after the bound."""
        loop = future.get_loop()
        deadline = loop.time() + self.seconds
        pending = self._pending
        if loop is not self._loop:  # a store used from a new event loop: the old one is gone
            pending.clear()
            self._timer, self._loop = None, loop
        # Acks settle about in the order they came: the settled ones are dropped here, as new
        # ones arrive, so the FIFO holds about what is in flight. Left to the sweep, it held
        # every ack of the last 5 s (~30,000 at full load: +14 MB, and a sweep of them all in
        # one loop turn: p99 16 → 24 ms).
        while pending and pending[0][1].done():
            pending.popleft()
        pending.append((deadline, future))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._sweep)
        return future

    def _sweep(self) -> None:
        """Fail every overdue waiter, drop the settled ones, and wake again for the oldest
        one left."""
        self._timer = None
        loop, pending = self._loop, self._pending
        assert loop is not None
        now = loop.time()
        while pending:
            deadline, future = pending[0]
            if not future.done():
                if deadline > now:
                    self._timer = loop.call_at(deadline, self._sweep)
                    return
                future.set_exception(
                    StoreTimeout(
                        f"the store did not commit within {self.seconds:g} s (another process"
                        " holds the writers' turn or a lock, or the database hangs); retry",
                        max(1, math.ceil(self.seconds)),
                    )
                )
            pending.popleft()
