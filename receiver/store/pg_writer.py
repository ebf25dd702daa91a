"""The group-commit writer on PostgreSQL: the same contract as writer.Writer.

One thread, one connection: the queued operations run in one transaction (again with a
savepoint each when one fails, so that it fails alone; a batch of acks in one pipeline, every
answer read after all are sent), and every future resolves only after
COMMIT returned with `synchronous_commit = on` (WAL flushed). Other replicas write at the same
time: a deadlock or serialization failure retries the whole batch; a lost connection fails it
with StoreUnavailable (the caller answers 503, never a false 200) and the next batch reconnects.
A lock another session holds (`LOCK TABLE`, a long transaction of a script) fails the batch
after `lock_timeout` instead of holding every write after it: its callers get a 503 and
Runflow retries. Only this connection has it: migrations run on their own and wait.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import time
from typing import cast

import psycopg
from psycopg import errors

from ..errors import ReceiverError, StoreUnavailable
from .dialect import Later
from .pg_connection import PgConnection, connect, describe
from .writer import Batches, Deferred, Item, Result, settle, waits

log = logging.getLogger("receiver.store")

RETRIES = 8  # whole-batch attempts after a deadlock or serialization failure
RETRYABLE = (errors.DeadlockDetected, errors.SerializationFailure)
# What fails the whole batch at once: run again with a savepoint per operation, each would
# wait out the lock again.
WHOLE_BATCH = (*RETRYABLE, errors.LockNotAvailable)


# An apply chunk waits this long for a lock, not the writer's lock_timeout: what it waits
# on (a queue row, an evaluation, a rollup) may be held by another replica that stalled
# mid-transaction (a pause, a partition) for as long as the stall, and the acks queued behind
# it on this writer would get 503s meanwhile. It fails, and applying is tried again later.
APPLY_LOCK_TIMEOUT = "1s"


class PgWriter(Batches):
    """Owns the only write connection of this process, on a thread of its own."""

    def __init__(self, url: str, lock_timeout: float) -> None:
        super().__init__()
        self._url = url
        self._lock_timeout = f"{max(1, round(lock_timeout * 1000))}ms"
        self._conn: PgConnection | None = None

    def start(self) -> None:
        self._start(self._run)

    def _run(self) -> None:
        try:
            for batch, durable in self._batches():
                self._commit(batch, durable)
        finally:
            self._disconnect()

    def _connection(self) -> PgConnection:
        if self._conn is None or self._conn.broken:
            self._disconnect()
            self._conn = connect(self._url)
            self._conn.execute("SET synchronous_commit = on")
            self._conn.execute("SELECT set_config('lock_timeout', ?, false)", (self._lock_timeout,))
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _commit(self, batch: list[Item], durable: bool) -> None:
        for attempt in range(RETRIES):
            try:
                results = self._attempt(self._connection(), batch, durable)
            except RETRYABLE as exc:
                self._rollback()
                log.info("store write retried (%s), attempt %d", type(exc).__name__, attempt + 1)
                time.sleep(random.uniform(0, 0.005 * 2**attempt))
                continue
            except BaseException as exc:  # never let the one writer die: fail the batch
                self._rollback()
                reason = describe(exc)
                log.error("store write failed, nothing acknowledged: %s", reason)
                failure = StoreUnavailable(f"the store cannot write: {reason}")
                settle([(waiter, False, failure) for _, waiter in batch])
                return
            settle(results)
            return
        busy = StoreUnavailable("the store is too busy: retry")
        settle([(waiter, False, busy) for _, waiter in batch])

    def _attempt(self, conn: PgConnection, batch: list[Item], durable: bool) -> list[Result]:
        """The batch in one transaction, first without a savepoint per operation (the pair is
        two round trips each); if an operation fails, the transaction is rolled back and the
        batch runs again with them, so that it fails alone."""
        try:
            return self._transaction(conn, batch, durable, isolate=False)
        except _Isolate:
            conn.execute("ROLLBACK")
        return self._transaction(conn, batch, durable, isolate=True)

    def _transaction(
        self, conn: PgConnection, batch: list[Item], durable: bool, isolate: bool
    ) -> list[Result]:
        results: list[Result] = []
        batch = waits(batch)  # a caller that gave up while an earlier attempt waited on a lock
        # Acks (operations that answer Later) send every statement before reading any answer.
        ahead = not isolate and all(isinstance(operation, Deferred) for operation, _ in batch)
        with conn.pipeline() if ahead else contextlib.nullcontext():
            conn.execute("BEGIN")
            if not durable:  # applying: derived rows, done again after a crash that lost them
                conn.execute(  # one statement: one round trip
                    "SELECT set_config('synchronous_commit', 'off', true),"
                    " set_config('lock_timeout', ?, true)",
                    (APPLY_LOCK_TIMEOUT,),
                )
            for operation, waiter in batch:
                if isolate:
                    conn.execute("SAVEPOINT op")
                try:
                    outcome = operation(cast(sqlite3.Connection, conn))
                    if isinstance(outcome, Later) and not ahead:
                        outcome = outcome.read()
                except Exception as exc:
                    if isinstance(exc, WHOLE_BATCH) or conn.broken:
                        raise
                    if not isolate:
                        raise _Isolate from exc
                    conn.execute("ROLLBACK TO SAVEPOINT op")
                    results.append((waiter, False, _translate(exc)))
                else:
                    results.append((waiter, True, outcome))
                if isolate:
                    conn.execute("RELEASE SAVEPOINT op")
            if ahead:
                try:
                    results = [(waiter, ok, later.read()) for waiter, ok, later in results]
                except Exception as exc:  # a failed statement fails the pipeline's others
                    if isinstance(exc, WHOLE_BATCH) or conn.broken:
                        raise
                    raise _Isolate from exc
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


class _Isolate(Exception):
    """An operation failed in a batch run without savepoints: run it again with them."""


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ReceiverError):
        return exc
    if isinstance(exc, psycopg.Error):
        return StoreUnavailable(f"the store cannot write: {describe(exc)}")
    return exc
