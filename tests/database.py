"""The database the tests run on: SQLite files (the default) or PostgreSQL when
RECEIVER_TEST_BACKEND=postgresql (`make test-postgres`). Tests name a database by a path under
their tmp_path as always; on PostgreSQL each distinct path becomes a fresh database of its own
(tests/postgres.py), dropped after the test."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from receiver.database_url import is_postgres_url

if TYPE_CHECKING:
    from .postgres import PostgresService

BACKEND = os.environ.get("RECEIVER_TEST_BACKEND", "sqlite")
if BACKEND not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"RECEIVER_TEST_BACKEND must be sqlite or postgresql, got {BACKEND!r}")
POSTGRES = BACKEND == "postgresql"

# Tests about the SQLite file itself (backup, WAL, locks, sqlite-utils introspection, FTS5).
sqlite_only = pytest.mark.sqlite_only

_server: PostgresService | None = None
_made: dict[str, str] = {}
_opened: list[Any] = []  # closed after the test (tests written for sqlite3 may not close)


def use(server: PostgresService | None) -> None:
    global _server
    _server = server


def database_for(path: Path | str) -> str:
    """RECEIVER_DATABASE for the database a test keeps at `path`."""
    if not POSTGRES or is_postgres_url(str(path)):
        return str(path)
    assert _server is not None, "the PostgreSQL test server is not running"
    key = str(path)
    if key not in _made:
        _made[key] = _server.create()
    return _made[key]


def drop_all() -> None:
    """Drop the databases made for the test that just ended."""
    while _opened:
        _opened.pop().close()
    if _server is not None:
        for url in _made.values():
            _server.drop(url)
    _made.clear()


def connect(database: Path | str) -> sqlite3.Connection:
    """A connection for a test's own set-up and checks: sqlite3 on a file, or on PostgreSQL the
    store's adapter (autocommit; `?` placeholders and rows as sqlite3.Row work the same).
    It first waits (a few seconds at most) until a running server has applied every accepted
    callback, as the store's own reads do (Store.catch_up)."""
    conn = _connect(database)
    applied(conn)
    return conn


def applied(conn: sqlite3.Connection, timeout: float = 5.0) -> None:
    """Wait until nothing is left in the apply queue (if the database has one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if conn.execute("SELECT 1 FROM apply_queue LIMIT 1").fetchone() is None:
                return
        except Exception:  # not migrated yet, or an older schema: nothing to wait for
            return
        time.sleep(0.002)


def _connect(database: Path | str) -> sqlite3.Connection:
    if not POSTGRES and not is_postgres_url(str(database)):
        return sqlite3.connect(database)
    import psycopg

    from receiver.store.pg_connection import PgConnection, configure

    class Connection(PgConnection):
        row_factory: Any = None  # rows already index both ways

        def __enter__(self) -> Connection:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    raw = psycopg.connect(database_for(database), autocommit=True)
    configure(raw)
    if POSTGRES:
        _opened.append(raw)
    return cast(sqlite3.Connection, Connection(raw))


def waiting_for_a_lock(
    conn: Any, timeout: float = 10.0, done: Callable[[], bool] = lambda: False
) -> None:
    """Wait until PostgreSQL shows the session of `conn` (the store's adapter) blocked on a
    lock, or `done()` (a bounded look, not a sleep): its transaction has gone as far as it can
    while ours holds what it needs."""
    import psycopg

    pid = conn.raw.info.backend_pid
    deadline = time.monotonic() + timeout
    watcher = psycopg.connect(conn.raw.info.dsn, autocommit=True)
    try:
        while time.monotonic() < deadline:
            row = watcher.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if (row is not None and row[0] == "Lock") or done():
                return
            time.sleep(0.002)
    finally:
        watcher.close()
    raise AssertionError("the other transaction neither finished nor waited for a lock")
