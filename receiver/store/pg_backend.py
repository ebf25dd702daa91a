"""What the Store needs on PostgreSQL besides the writer: migrations, pooled readers, a probe.

psycopg errors stop here: a database that cannot be reached or migrated is a ConfigError at
start, one that fails a read is StoreUnavailable (503), with the password never shown.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..database_url import redact
from ..errors import ConfigError, StoreUnavailable
from .pg_connection import PgConnection, configure, connect, connect_options, describe
from .pg_schema import migrate

POOL_TIMEOUT = 10.0  # seconds a read waits for a free connection before it is a 503


def schema_version(url: str) -> int:
    """The newest migration applied (0 for a database without any)."""
    try:
        conn = connect(url)
    except psycopg.Error as exc:
        raise ConfigError(
            f"RECEIVER_DATABASE: cannot open {redact(url)}: {describe(exc)}"
        ) from None
    try:
        exists = conn.raw.execute("SELECT to_regclass('migrations') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.raw.execute("SELECT coalesce(max(version), 0) FROM migrations").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def migrate_url(url: str) -> list[int]:
    """Apply pending migrations (idempotent; concurrent starters take turns)."""
    try:
        conn = connect(url)
    except psycopg.Error as exc:
        reason = f"cannot open {redact(url)}: {describe(exc)}"
        raise ConfigError(f"RECEIVER_DATABASE: {reason}") from None
    try:
        return migrate(conn)
    except psycopg.Error as exc:
        raise ConfigError(
            f"RECEIVER_DATABASE: cannot migrate {redact(url)}: {describe(exc)}"
        ) from None
    finally:
        conn.close()


def probe(conn: sqlite3.Connection) -> None:
    """A writer operation that makes its COMMIT write and flush WAL: an empty transaction
    would commit without touching the disk and pass on a full or read-only one."""
    conn.execute("SELECT pg_current_xact_id()")


class PgReaders:
    """Read connections from a pool shared by the threads of this process."""

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=size,
            kwargs={"autocommit": True, **connect_options(url)},
            configure=configure,
            check=ConnectionPool.check_connection,
            timeout=POOL_TIMEOUT,
            name="receiver-readers",
            open=False,
        )
        self._opened = False
        self._lock = threading.Lock()

    @contextmanager
    def connection(self, wait: float | None = None) -> Iterator[PgConnection]:
        """A pooled connection, waiting up to `wait` seconds for one (POOL_TIMEOUT if None)."""
        with self._lock:
            if not self._opened:
                self._pool.open(wait=False)
                self._opened = True
        try:
            with self._pool.connection(wait) as raw:
                yield PgConnection(raw)
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise StoreUnavailable(f"the store cannot be read: {describe(exc)}") from None

    def close(self) -> None:
        with self._lock:
            if self._opened:
                self._pool.close()
                self._opened = False
