"""The group-commit writer on PostgreSQL: the same contract as writer.Writer.

One thread, one connection: the queued operations run in one transaction, each in a savepoint
(a failing statement fails its operation alone), and every future resolves only after COMMIT
returned with `synchronous_commit = on` (WAL flushed). Other replicas write at the same time:
a deadlock or serialization failure retries the whole batch; a lost connection fails it with
StoreUnavailable (the caller answers 503, never a false 200) and the next batch reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors

from ..database_url import redact
from ..errors import ReceiverError, StoreUnavailable
from .pg_connection import PgConnection, connect

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
Item = tuple[Operation, Future[Any]]
Result = tuple[Future[Any], bool, Any]

log = logging.getLogger("receiver.store")

MAX_BATCH = 1024
RETRIES = 8  # whole-batch attempts after a deadlock or serialization failure
RETRYABLE = (errors.DeadlockDetected, errors.SerializationFailure)


class PgWriter:
    """Owns the only write connection of this process, on a thread of its own."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: PgConnection | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="receiver-writer", daemon=True)
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
        """Run `operation` in the next batch; returns once it is committed and durable."""
        return await asyncio.wrap_future(self.submit(operation))

    def _run(self) -> None:
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
                self._commit([(op, f) for op, f in batch if f.set_running_or_notify_cancel()])
                if stopping:
                    break
        finally:
            self._disconnect()

    def _connection(self) -> PgConnection:
        if self._conn is None or self._conn.broken:
            self._disconnect()
            self._conn = connect(self._url)
            self._conn.execute("SET synchronous_commit = on")
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _commit(self, batch: list[Item]) -> None:
        if not batch:
            return
        for attempt in range(RETRIES):
            try:
                results = self._attempt(self._connection(), batch)
            except RETRYABLE as exc:
                self._rollback()
                log.info("store write retried (%s), attempt %d", type(exc).__name__, attempt + 1)
                time.sleep(random.uniform(0, 0.005 * 2**attempt))
                continue
            except Exception as exc:  # never let the one writer die: fail the batch
                self._rollback()
                reason = redact(str(exc).strip()) or type(exc).__name__
                log.error("store write failed, nothing acknowledged: %s", reason)
                for _, future in batch:
                    future.set_exception(StoreUnavailable(f"the store cannot write: {reason}"))
                return
            for future, ok, value in results:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            return
        for _, future in batch:
            future.set_exception(StoreUnavailable("the store is too busy: retry"))

    def _attempt(self, conn: PgConnection, batch: list[Item]) -> list[Result]:
        results: list[Result] = []
        conn.execute("BEGIN")
        for operation, future in batch:
            conn.execute("SAVEPOINT op")
            try:
                outcome = operation(cast(sqlite3.Connection, conn))
            except Exception as exc:
                if isinstance(exc, RETRYABLE) or conn.broken:
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT op")
                results.append((future, False, _translate(exc)))
            else:
                results.append((future, True, outcome))
            conn.execute("RELEASE SAVEPOINT op")
        conn.execute("COMMIT")
        return results

    def _rollback(self) -> None:
        if self._conn is None:
            return
        if self._conn.broken:
            self._disconnect()
            return
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except psycopg.Error:
            self._disconnect()


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ReceiverError):
        return exc
    if isinstance(exc, psycopg.Error):
        return StoreUnavailable(f"the store cannot write: {str(exc).strip()}")
    return exc
