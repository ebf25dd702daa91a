"""When the writer applies accepted callbacks: the ack path only stores the delivery and queues
it (ingest.accept); the writer applies the queue to evaluations, rollups, search and the outbox
in the time acks leave it.

- Acks come first: a chunk is applied only when no operation is waiting. Deliveries gather
  first, until GATHER are queued or the oldest has waited LINGER (20 ms): each commit writes
  the same index and text-index pages again, so applying costs ~540 µs of CPU per callback in
  chunks of one, ~290 in chunks of 8 and ~230 in chunks of 32 (docs/performance.md), and each
  chunk wakes the worker for a claim and a send of its own. While operations keep arriving a
  chunk is what has gathered (CHUNK to GATHER, ~2-7 ms); once none arrives, chunks double up
  to QUIET_CHUNK: an operation that arrives waits for at most about as long as the writer had
  been idle.
- Except in a burst: callers queue up for the writer (batches of PRESSURE operations or more,
  on average) while the process is CPU-bound or the writer is (either over BUSY in the last
  WINDOW: of a core, or of the writer's time spent on operations; on PostgreSQL the writer
  waits for round trips and is saturated while the CPU is not). Applying would only slow the
  acks then, so it waits for a pause in the operations (IDLE): a burst is acknowledged at the
  speed of the ack path and applied right after it.
- Once its own are applied it looks at the queue again every LOOK: with several processes on one
  database, callbacks one acknowledged and did not apply (it was killed) are applied by another.
- Backpressure: past `limit` queued deliveries a chunk is applied before every batch of
  operations, so acks slow to the speed of applying and the lag stays bounded.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future

from .apply import Applied

log = logging.getLogger("receiver.store")

CHUNK = 8  # deliveries per apply transaction while operations arrive (~2 ms: none waits longer)
QUIET_CHUNK = 128  # … at most, once they stop: chunks double from CHUNK up to this
PRESSURE = 6  # operations per batch, on average, that say callers are queueing up
MAX_CHUNK = 1024
BUSY = 0.8  # share of a core, or of the writer's time, above which either counts as busy
WINDOW = 0.05  # seconds of CPU accounting behind each decision
IDLE = 0.01  # seconds without an operation that count as a pause, when busy
PAUSE = 1.0  # seconds to wait after a failed apply transaction before trying again

GATHER = 32  # queued deliveries worth a chunk at once
LINGER = 0.02  # seconds the oldest queued delivery waits, at most, for GATHER to gather

LOOK = 5.0  # seconds between looks at a queue this process has nothing of its own in

CATCH_UP_CHUNK = 256  # deliveries per transaction when a reader waits for them
# apply(conn, most, through, skip, isolate): apply.apply_queued with the store's forwarding
Apply = Callable[[sqlite3.Connection, int, int | None, frozenset[int], bool], Applied]


class Backlog:
    def __init__(
        self,
        apply: Apply,
        limit: int,
        on_applied: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.limit = limit
        self.pending = 1  # unknown at start: look once (callbacks queued before a restart)
        self.on_applied = on_applied
        self._apply = apply
        self._skip: frozenset[int] = frozenset()
        self._clock = clock
        self._cpu = cpu
        self._since = clock()
        self._cpu_since = cpu()
        self._busy = 0.0
        self._worked = 0.0  # seconds the writer spent on operations since _since
        self._resume_at = 0.0
        self._last_operation = -IDLE
        self._batch = 0.0  # operations per batch, moving average
        self._chunk = CHUNK  # the next chunk's size when no operation arrives
        self._queued_at: float | None = None  # when the oldest queued came; None: not known
        self._look_at = 0.0  # when to look at a queue with nothing of this process's in it
        self._isolate = False  # a savepoint per callback: after a failed chunk, until one works

    def took(self, batch: int) -> None:
        """The writer took a batch of operations (acks, a read's catch-up, a worker's claim…)."""
        self._last_operation = self._clock()
        self._batch += (batch - self._batch) * 0.2
        self._chunk = CHUNK

    def worked(self, seconds: float) -> None:
        """The writer spent `seconds` on a batch of operations, commit included."""
        self._worked += seconds

    def burst(self) -> bool:
        return self._busy >= BUSY and self._batch >= PRESSURE

    def added(self) -> None:
        """One more delivery queued (called in the writer thread, inside its transaction)."""
        self.pending += 1
        if self._queued_at is None:
            self._queued_at = self._clock()

    def forced(self) -> bool:
        return self.pending >= self.limit and self._clock() >= self._resume_at

    def due(self) -> float:
        """How long to wait for an operation before applying a chunk: 0 to apply now unless
        one is waiting; with nothing queued, until the next look (LOOK)."""
        now = self._clock()
        if self.pending <= 0:
            if now < self._look_at:
                return self._look_at - now
            self.pending = 1  # what another process acknowledged and left (it died) applies here
        if now < self._resume_at:
            return self._resume_at - now
        if self.pending >= self.limit:
            return 0.0
        if now - self._since >= WINDOW:
            cpu = self._cpu()
            self._busy = max(cpu - self._cpu_since, self._worked) / (now - self._since)
            self._since, self._cpu_since, self._worked = now, cpu, 0.0
        if not self.burst():
            return self._gathering(now)
        return max(0.0, self._last_operation + IDLE - now)

    def _gathering(self, now: float) -> float:
        """How long to let deliveries gather before a chunk: until GATHER are queued or the
        oldest has waited LINGER (0 when it is not known how long)."""
        if self._queued_at is None or self.pending >= GATHER:
            return 0.0
        return max(0.0, self._queued_at + LINGER - now)

    def ready(self) -> bool:
        """Whether a chunk may run now (not while pausing after a failure)."""
        return self.pending > 0 and self._clock() >= self._resume_at

    def operation(self, conn: sqlite3.Connection) -> Applied:
        """One chunk (in the writer thread): when forced, as many as it takes to get back
        under the limit; while operations arrive (one in the last IDLE), what has gathered
        (CHUNK to GATHER), so that none waits behind a long chunk; once they stop, chunks
        double from CHUNK to QUIET_CHUNK (a pause in a burst must not cost the next acks a
        30 ms chunk)."""
        if self.pending >= self.limit:
            most = min(MAX_CHUNK, max(CHUNK, self.pending - self.limit + 1))
        elif self._clock() - self._last_operation < IDLE:
            most = max(CHUNK, min(self.pending, GATHER))
        else:
            most = self._chunk
            self._chunk = min(2 * self._chunk, QUIET_CHUNK)
        return self.apply(conn, most, isolate=self._isolate)

    def apply(
        self,
        conn: sqlite3.Connection,
        most: int = CATCH_UP_CHUNK,
        through: int | None = None,
        isolate: bool = True,
    ) -> Applied:
        """Apply up to `most` queued deliveries (up to `through`) and count them off, in the
        writer thread. Isolated (always for a read's catch-up), a delivery that fails to apply
        is skipped until restart (it is logged and stays queued); otherwise it fails the chunk,
        and the next one is isolated (`settled`)."""
        applied = self._apply(conn, most, through, self._skip, isolate)
        self._skip |= frozenset(applied.failed)
        if applied.more or through is not None:
            self.pending = max(self.pending - applied.count, 1)  # more, or newer ones: look
        else:
            self.pending = 0
            self._queued_at = None
            self._look_at = self._clock() + LOOK
        return applied

    def settled(self, future: Future[Applied]) -> None:
        """After a chunk's transaction: tell whoever waits for applied work. After a failure
        (the transaction rolled back) try again at once with a savepoint per callback, which
        finds the delivery at fault; if an isolated chunk fails, pause, then look again."""
        error = future.exception()
        if error is not None:
            self.pending = max(self.pending, 1)
            if not self._isolate:
                self._isolate = True
                return
            log.error("applying accepted callbacks failed, retrying in %gs: %s", PAUSE, error)
            self._resume_at = self._clock() + PAUSE
            return
        self._isolate = False
        if future.result().count:
            self.notify()

    def notify(self) -> None:
        if self.on_applied is not None:
            self.on_applied()
