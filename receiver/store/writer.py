"""The one writer: batches concurrent writes into one transaction and one fsync (group commit).

While a commit is on disk, new requests queue up; the next batch takes all of them. Each
operation of a batch runs in its own savepoint, so one failing operation fails alone, and every
caller's future resolves only after its batch is committed (WAL + synchronous=FULL: fsync on
commit).

Writers in several processes (`serve --workers N`, a separate `receiver worker`) take turns on
an flock of `<database>-writer.lock` before BEGIN: the kernel wakes the next one as soon as the
lock is free, where SQLite's own busy handler sleeps up to 100 ms between tries (a p99 of
seconds under load, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from ..errors import ReceiverError, StoreUnavailable
from .backlog import Backlog
from .dialect import Later

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
# Who waits for an operation: a thread (`submit`) or a coroutine (`run`).
Waiter = Future[Any] | asyncio.Future[Any]
Item = tuple[Operation, Waiter]
Result = tuple[Waiter, bool, Any]  # waiter, succeeded, value or exception

log = logging.getLogger("receiver.store")

MAX_BATCH = 1024
# Bytes the WAL file is cut back to whenever a checkpoint starts it over. It grows past this only
# while a reader holds an old snapshot (Datasette, an sqlite3 shell in BEGIN); without a limit it
# kept that peak size on disk for as long as the server ran. Four times the WAL of the automatic
# checkpoint (1000 pages): normal operation seldom truncates.
WAL_SIZE_LIMIT = 16 * 2**20


def connect(path: str, *, readonly: bool = False, busy_timeout: float = 10.0) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN/COMMIT), WAL, durable commits.

    `busy_timeout` is how long to wait for another process's write lock before giving up.
    """
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    if readonly:
        conn.execute("PRAGMA query_only = 1")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


class Batches:
    """What both writers share: callers queue operations, one thread takes them in batches
    (all that are waiting, up to MAX_BATCH) and settles each caller after its commit. Between
    batches it applies accepted callbacks when `backlog` says so (store/backlog.py), in
    transactions that need no fsync: what they write is derived from deliveries already
    durable, and is applied again after a crash that lost it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.backlog: Backlog | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        self._thread = threading.Thread(
            target=target, args=args, name="receiver-writer", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Finish every queued operation, then stop; one queued meanwhile is refused."""
        thread, self._thread = self._thread, None  # from now on, submit and schedule refuse
        if thread is not None:
            self._queue.put(None)
            thread.join()
        while True:  # queued after the stop marker, in the moment before: refused, not lost
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and _begin(item[1]):
                settle([(item[1], False, StoreUnavailable("the store is closed"))])

    def submit(self, operation: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        if self._thread is None:
            future.set_exception(StoreUnavailable("the store is closed"))
        else:
            self._queue.put((operation, future))
        return future

    def schedule(self, operation: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `operation` for the next batch, from the event loop's thread; the future
        resolves once it is committed and durable. The batch wakes the loop once for all its
        futures, not once each."""
        if self._thread is None:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((operation, future))
        return future

    def defer(self, operation: Callable[[sqlite3.Connection], Later[T]]) -> asyncio.Future[T]:
        """`schedule` for an operation that sends its statements and answers with a Later,
        read once the whole batch is sent: PostgreSQL runs a batch of only such operations
        in one pipeline."""
        return cast("asyncio.Future[T]", self.schedule(Deferred(operation)))

    async def run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run `operation` in the next batch; returns once it is committed and durable."""
        return await self.schedule(operation)

    def _batches(self) -> Iterator[tuple[list[Item], bool]]:
        """Each batch of callers still waiting (one that went away before its batch began is
        skipped: it was never acknowledged; the writers skip those that go away before their
        transaction begins, see `waits`) and whether its commit must be durable, until
        close()."""
        while (taken := self._take()) is not None:
            if taken is APPLY:
                assert self.backlog is not None
                future: Future[Any] = Future()
                future.set_running_or_notify_cancel()
                yield [(self.backlog.operation, future)], False
                self.backlog.settled(future)
                continue
            batch = [cast(Item, taken)]
            stopping = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            waiting = [(op, waiter) for op, waiter in batch if _begin(waiter)]
            if self.backlog is not None:
                self.backlog.took(len(batch))
            if waiting:
                started = time.monotonic()
                yield waiting, True
                if self.backlog is not None:
                    self.backlog.worked(time.monotonic() - started)
            if stopping:
                return

    def _take(self) -> Item | object | None:
        """The next operation, or APPLY when the backlog should be applied first."""
        backlog = self.backlog
        while True:
            wait = None if backlog is None else backlog.due()
            if wait == 0 and backlog is not None and backlog.forced():
                return APPLY
            try:
                if wait is None:
                    item = self._queue.get()
                else:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                if backlog is not None and backlog.ready():
                    return APPLY
                continue
            return item


APPLY = object()  # what _take answers when the backlog is to be applied first


class Deferred:
    """An operation scheduled with `defer` (its answer is a Later)."""

    __slots__ = ("operation",)

    def __init__(self, operation: Callable[[sqlite3.Connection], Later[Any]]) -> None:
        self.operation = operation

    def __call__(self, conn: sqlite3.Connection) -> Later[Any]:
        return self.operation(conn)


class Writer(Batches):
    """Owns the only write connection, on a thread of its own."""

    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        super().__init__()
        self._path = path
        self._busy_timeout = busy_timeout

    def start(self) -> None:
        conn = connect(self._path, busy_timeout=self._busy_timeout)
        self._start(self._run, conn, _turns(self._path))

    def _run(self, conn: sqlite3.Connection, turns: int | None) -> None:
        try:
            for batch, durable in self._batches():
                try:
                    with _turn(turns):
                        self._commit(conn, batch, durable)
                except BaseException as exc:  # never let the one writer die: fail the batch
                    log.exception("store write failed, nothing acknowledged")
                    failure = StoreUnavailable(f"the store failed: {exc}")
                    settle([(waiter, False, failure) for _, waiter in batch])
        finally:
            conn.close()
            if turns is not None:
                os.close(turns)

    def _commit(self, conn: sqlite3.Connection, batch: list[Item], durable: bool) -> None:
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: no fsync at this commit
        try:
            self._transaction(conn, batch)
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    def _transaction(self, conn: sqlite3.Connection, batch: list[Item]) -> None:
        results: list[Result] = []
        # A lone operation (applying the backlog is one) needs no savepoint to fail alone, and
        # a savepoint first copies every page it changes: 12% of applying a chunk.
        try:
            conn.execute("BEGIN IMMEDIATE")
            # After the writers' turn and SQLite's lock, which may each take long: a caller
            # that gave up meanwhile (store/deadlines.py) got a 503, so its write is dropped.
            batch = waits(batch)
            isolate = len(batch) > 1
            for operation, waiter in batch:
                if isolate:
                    conn.execute("SAVEPOINT op")
                try:
                    outcome = operation(conn)
                    if isinstance(outcome, Later):
                        outcome = outcome.read()
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                        raise  # SQLite rolled it all back (disk full, I/O error): fail the batch
                    conn.execute("ROLLBACK TO op" if isolate else "ROLLBACK")
                    results.append((waiter, False, _translate(exc)))
                else:
                    results.append((waiter, True, outcome))
                if isolate:
                    conn.execute("RELEASE op")
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store write failed, nothing acknowledged: %s", exc)
            _roll_back(conn)
            failure = StoreUnavailable(f"the store cannot write: {exc}")
            settle([(waiter, False, failure) for _, waiter in batch])
            return
        except BaseException:  # not an Exception: nothing of it may stay, nor the transaction
            _roll_back(conn)
            raise
        settle(results)


def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # a failing ROLLBACK must not kill us
            conn.execute("ROLLBACK")


def _turns(path: str) -> int | None:
    """The lock file writers take turns on; None where it cannot be made (a read-only folder):
    then SQLite's busy handler alone orders them, correctly but more slowly."""
    try:
        return os.open(f"{path}-writer.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None


@contextlib.contextmanager
def _turn(turns: int | None) -> Iterator[None]:
    if turns is None:
        yield
        return
    fcntl.flock(turns, fcntl.LOCK_EX)  # released by the kernel if this process dies
    try:
        yield
    finally:
        fcntl.flock(turns, fcntl.LOCK_UN)


def _begin(waiter: Waiter) -> bool:
    """Whether the caller still waits (a cancelled one, or one that timed out, is skipped,
    never acknowledged)."""
    if isinstance(waiter, Future):
        return waiter.set_running_or_notify_cancel()
    return not waiter.done()


def waits(batch: list[Item]) -> list[Item]:
    """The operations of `batch` whose caller still waits as its transaction begins: a
    coroutine's may have given up since `_begin` (a thread's, once running, cannot)."""
    return [item for item in batch if isinstance(item[1], Future) or not item[1].done()]


def settle(results: list[Result]) -> None:
    """Hand each caller its outcome: threads directly, coroutines by one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Result]] = defaultdict(list)
    for result in results:
        waiter = result[0]
        if isinstance(waiter, Future):
            _resolve(result)
        else:
            by_loop[waiter.get_loop()].append(result)
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting
            loop.call_soon_threadsafe(_resolve_all, batch)


def _resolve_all(results: list[Result]) -> None:
    for result in results:
        _resolve(result)


def _resolve(result: Result) -> None:
    waiter, ok, value = result
    if waiter.done():  # cancelled while its batch ran (the operation committed anyway)
        return
    if ok:
        waiter.set_result(value)
    else:
        waiter.set_exception(value)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ReceiverError):
        return exc
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"the store cannot write: {exc}")
    return exc
