"""Which database a connection is, for the few places where the store's SQL differs.

Nothing here imports psycopg: it is an optional dependency, needed only for PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def is_postgres(conn: object) -> bool:
    """True for the PostgreSQL adapter (pg_connection.PgConnection), False for sqlite3."""
    return getattr(conn, "dialect", "sqlite") == "postgresql"


def serialize(conn: object, *keys: str) -> None:
    """Take the transaction's lock on each key before a read-merge-write of it, so two servers
    writing the same evaluation or client_ref take turns (a body needs none: its INSERT … ON
    CONFLICT waits for the other's). SQLite needs none: its one write transaction at a time
    (BEGIN IMMEDIATE) already serializes every writer."""
    if not is_postgres(conn):
        return
    for key in keys:
        conn.execute(  # type: ignore[attr-defined]
            "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,)
        )


# SQLSTATE class 40, transaction rollback: a deadlock or serialization failure on PostgreSQL.
CONFLICT_CLASS = "40"
# lock_not_available: the writer's lock_timeout ran out on a lock another session holds.
LOCK_TIMEOUT = "55P03"


def transient(conn: object, exc: BaseException) -> bool:
    """Whether `exc` failed the transaction rather than the statement's own data: a conflict
    with another transaction (PostgreSQL aborts the loser; the writer retries the batch), a
    lock another session held past the writer's lock_timeout (the writer fails the batch; it
    is tried again) or a lost connection. SQLite's own such failures (disk full, I/O) roll the
    transaction back, which callers see as `not conn.in_transaction`."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and (
        sqlstate.startswith(CONFLICT_CLASS) or sqlstate == LOCK_TIMEOUT
    ):
        return True
    return bool(getattr(conn, "broken", False))


def pipelined(conn: object) -> contextlib.AbstractContextManager[Any]:
    """On PostgreSQL, psycopg's pipeline mode: a statement whose result is not read goes out
    without waiting for the answer to the one before, so a callback's apply costs fewer round
    trips. A failure then surfaces at the next read, not at its own statement: use it only
    where any failure fails the whole transaction."""
    if not is_postgres(conn):
        return contextlib.nullcontext()
    return conn.pipeline()  # type: ignore[attr-defined, no-any-return]


class Later(Generic[T]):
    """An operation's answer, read only once the statements of its whole batch are sent: the
    writer runs a batch of such operations in one pipeline on PostgreSQL (one round trip
    for the batch, not one per operation), and reads each at once on SQLite."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], T]) -> None:
        self.read = read
