"""The one writer: batches concurrent writes into one transaction and one fsync (group commit).

While a commit is on disk, new requests queue up; the next batch takes all of them. Each
operation runs in its own savepoint, so one failing operation fails alone, and every caller's
future resolves only after its batch is committed (WAL + synchronous=FULL: fsync on commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ..errors import ReceiverError, StoreUnavailable

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

log = logging.getLogger("receiver.store")

MAX_BATCH = 1024


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
    return conn


class Writer:
    """Owns the only write connection, on a thread of its own."""

    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._queue: queue.SimpleQueue[tuple[Operation, Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        conn = connect(self._path, busy_timeout=self._busy_timeout)
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="receiver-writer", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Finish every queued operation, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, operation: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        if self._thread is None:
            future.set_exception(StoreUnavailable("the store is closed"))
        else:
            self._queue.put((operation, future))
        return future

    async def run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run `operation` in the next batch; returns once it is committed and on disk."""
        return await asyncio.wrap_future(self.submit(operation))

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while (item := self._queue.get()) is not None:
                batch = [item]
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
                try:
                    self._commit(conn, batch)
                except Exception as exc:  # never let the one writer die: fail the batch
                    log.exception("store write failed, nothing acknowledged")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(StoreUnavailable(f"the store failed: {exc}"))
                if stopping:
                    break
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Operation, Future[Any]]]) -> None:
        # A caller that went away before its batch began is skipped: it was never acknowledged.
        batch = [(op, future) for op, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        results: list[tuple[Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcome = operation(conn)
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                        raise  # SQLite rolled it all back (disk full, I/O error): fail the batch
                    conn.execute("ROLLBACK TO op")
                    results.append((future, False, _translate(exc)))
                else:
                    results.append((future, True, outcome))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store write failed, nothing acknowledged: %s", exc)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # a failing ROLLBACK must not kill us
                    conn.execute("ROLLBACK")
            for _, future in batch:
                future.set_exception(StoreUnavailable(f"the store cannot write: {exc}"))
            return
        for future, ok, value in results:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ReceiverError):
        return exc
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"the store cannot write: {exc}")
    return exc
