"""The store: the only place SQL lives. Writes go through the group-commit Writer; reads use a
read-only connection per thread (WAL lets them run beside the writer). With a PostgreSQL URL
the same store functions run through pg_connection's adapter: writes on PgWriter, reads from a
connection pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..database_url import DATABASE_SETTING, is_postgres_url
from ..errors import ConfigError, StoreUnavailable
from . import maintenance, outbox, service
from .apply import NO_FORWARDING, Applied, Forwarding, apply_evaluation, apply_queued
from .backlog import Backlog
from .deadlines import Deadlines
from .dialect import Later
from .ingest import Delivery, Receipt, accept_later, ingest, quarantine
from .lineage import lineage
from .outbox import Claim, Outcome
from .queries import (
    EvaluationFilter,
    get_client_ref,
    get_evaluation,
    has_evaluation,
    list_changes,
    list_evaluations,
    stats,
)
from .schema import MIGRATIONS, migrate, refuse_newer
from .writer import Writer, connect

log = logging.getLogger("receiver.store")

if TYPE_CHECKING:
    from .pg_backend import PgReaders
    from .pg_writer import PgWriter

__all__ = ["Claim", "Delivery", "EvaluationFilter", "Forwarding", "Outcome", "Receipt", "Store"]

MAX_BACKLOG = 100_000
MIGRATION_WAIT = 600.0  # seconds a starter waits for another's migration (SQLite)
CATCH_UP_TIMEOUT = 5.0  # seconds a read waits for callbacks accepted before it
# Seconds a callback waits for its commit before it is a 503 (store/deadlines.py): Runflow
# expects an answer within a few seconds, and retries.
ACK_TIMEOUT = 5.0
# Seconds a glance at the store (/metrics) waits for a pooled connection: with PostgreSQL down
# the pool would wait its own timeout, as long as a scraper waits for the whole answer.
GLANCE_WAIT = 1.0
# One snapshot for every statement of a read (READ COMMITTED, the default, takes one each).
SNAPSHOT_POSTGRES = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def _rewrite_header(conn: sqlite3.Connection) -> None:
    (value,) = conn.execute("PRAGMA application_id").fetchone()
    conn.execute(f"PRAGMA application_id = {int(value)}")


class Store:
    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 10.0,
        forwarding: Forwarding = NO_FORWARDING,
        pool_size: int = 10,
        max_backlog: int = MAX_BACKLOG,
        ack_timeout: float = ACK_TIMEOUT,
        applies: bool = True,
        setting: str = DATABASE_SETTING,
    ) -> None:
        """`applies`: whether this store's writer applies the callbacks acknowledged and
        queued (store/backlog.py). Only the servers and the worker do, with the sinks of the
        service's configuration: a CLI command that writes (prune, refetch…) may run without
        them (or in another folder, with another receiver.toml), and callbacks it applied
        would queue no forwards, or the wrong ones."""
        self.path = path
        self.setting = setting  # the variable it came from, for errors
        self.deadlines = Deadlines(ack_timeout)
        self.forwarding = forwarding
        self.postgres = is_postgres_url(path)
        self.writer: Writer | PgWriter
        self._pool: PgReaders | None = None
        if self.postgres:
            from .pg_backend import PgReaders
            from .pg_writer import PgWriter

            # Twice the bound: the callbacks behind a lock have had their 503 (with Retry-After)
            # by then; what the lock_timeout fails is their batch, so the writer goes on.
            self.writer = PgWriter(path, lock_timeout=2 * ack_timeout)
            self._pool = PgReaders(path, pool_size)
        else:
            self.writer = Writer(path, busy_timeout)
        self.backlog = Backlog(self._apply, max_backlog)
        self.applies = applies
        self.writer.backlog = self.backlog if applies else None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def migrate(self) -> list[int]:
        """Create the file (or schema) if needed and apply pending migrations (idempotent)."""
        with self._named():
            return self._migrate()

    def _migrate(self) -> list[int]:
        if self.postgres:
            from .pg_backend import migrate_url

            return migrate_url(self.path)
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Another starter may be migrating a big database: wait for it, as on PostgreSQL.
            conn = connect(self.path, busy_timeout=MIGRATION_WAIT)
        except (OSError, sqlite3.Error) as exc:
            raise self._cannot_open(exc) from None
        try:
            return migrate(conn)
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.setting}: cannot migrate {self.path!r}: {exc}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """The errors of the backends below (which know only the URL) name the variable the
        database came from, as the store's own do: DATABASE_URL, where a platform sets only
        that, was named RECEIVER_DATABASE."""
        try:
            yield
        except ConfigError as exc:
            text = str(exc)
            if self.setting == DATABASE_SETTING or not text.startswith(DATABASE_SETTING):
                raise
            raise ConfigError(self.setting + text.removeprefix(DATABASE_SETTING)) from None

    def _cannot_open(self, exc: Exception) -> ConfigError:
        return ConfigError(f"{self.setting}: cannot open {self.path!r}: {exc}")

    def check_schema(self) -> None:
        """For a command that only reads: the database must be at this receiver's schema. It is
        not migrated from here, under a server still running the version before (that is
        `receiver migrate`, or the server's next start)."""
        with self._named():
            self._check_schema()

    def _check_schema(self) -> None:
        if self.postgres:
            from .pg_backend import schema_version
            from .pg_schema import MIGRATIONS as PG_MIGRATIONS

            found, known = schema_version(self.path), PG_MIGRATIONS[-1][0]
        else:
            try:
                conn = connect(self.path, readonly=True)
            except (OSError, sqlite3.Error) as exc:  # a folder, say: a traceback, before
                raise self._cannot_open(exc) from None
            try:
                (found,) = conn.execute(
                    "SELECT coalesce(max(version), 0) FROM migrations"
                ).fetchone()
            except sqlite3.OperationalError:  # no migrations table: nothing applied
                found = 0
            except sqlite3.DatabaseError as exc:  # not an SQLite file: a traceback, before
                raise self._cannot_open(exc) from None
            finally:
                conn.close()
            known = MIGRATIONS[-1][0]
        refuse_newer({found}, known)
        if found < known:
            raise ConfigError(
                f"{self.setting} is at schema version {found}, this receiver needs {known}:"
                " run `receiver migrate` (or start the server, which does)"
            )

    def open(self, *, migrate: bool = True) -> None:
        """Start the writer; with `migrate` (the servers and the worker), apply pending
        migrations first. A CLI command checks the schema instead (check_schema): migrating
        under a server still running the version before would leave it writing by older rules
        into the newer schema."""
        if migrate:
            self.migrate()
        self.writer.start()
        if self.applies:  # a server or the worker: the CLI compares its forwarding with this
            recorded = partial(service.record, forwarding=self.forwarding)
            dropped = self.writer.submit(recorded).result()
            if dropped.refetches:
                log.warning("%d pending refetch(es) dropped: refetch is off", dropped.refetches)
            for sink, count in sorted(dropped.forwards.items()):
                log.warning(
                    "%d forward(s) to sink %r made dead: it is not in this configuration"
                    " (`receiver forwards --retry-all-dead --sink %s` once it is again)",
                    count,
                    sink,
                    sink,
                )

    def close(self) -> None:
        self.writer.close()
        if self._pool is not None:
            self._pool.close()
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._local = threading.local()

    def on_applied(self, callback: Callable[[], object] | None) -> None:
        """Call `callback` (from the writer thread) whenever accepted callbacks were applied:
        new outbox rows may be due."""
        self.backlog.on_applied = callback

    # writes

    async def ingest(self, delivery: Delivery) -> Receipt:
        """Store a delivery and apply it in one transaction."""
        return await self.writer.run(partial(ingest, delivery=delivery, forwarding=self.forwarding))

    async def accept(self, delivery: Delivery) -> Receipt:
        """Store a delivery durably and queue it to be applied (store/backlog.py): the ack
        path. Reads through this store first apply what was accepted before them."""
        return await self.accepting(delivery)

    def accepting(self, delivery: Delivery) -> asyncio.Future[Receipt]:
        """`accept` for a caller on the event loop that cannot await (protocol.py): the
        future resolves once the delivery is durable, or fails with StoreTimeout after
        `ack_timeout` seconds."""

        def accepted(conn: sqlite3.Connection) -> Later[Receipt]:
            sent = accept_later(conn, delivery)

            def read() -> Receipt:
                receipt = sent.read()
                if receipt.applies:
                    self.backlog.added()
                return receipt

            return Later(read)

        return self.deadlines.watch(self.writer.defer(accepted))

    def _apply(
        self,
        conn: sqlite3.Connection,
        most: int,
        through: int | None,
        skip: frozenset[int],
        isolate: bool,
    ) -> Applied:
        return apply_queued(conn, most, through, skip, self.forwarding, isolate)

    def catch_up(self, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """Apply every callback accepted before this call, so that the read after it sees all
        that was acknowledged. Bounded: after `timeout` seconds (a huge backlog) the read goes
        ahead with what is applied. Without a running writer (a read-only CLI) there is
        nothing to do: the server applies its own backlog within milliseconds."""
        if not (self.writer.running and self.applies):
            return
        with self.read() as conn:
            (head,) = conn.execute("SELECT max(delivery_id) FROM apply_queue").fetchone()
        deadline = time.monotonic() + timeout
        while head is not None and (left := deadline - time.monotonic()) > 0:
            try:
                applied = self.writer.submit(partial(self.backlog.apply, through=head)).result(left)
            except TimeoutError:
                return  # read what is there: a huge backlog, still being applied
            except StoreUnavailable as exc:
                log.warning("reading without what is still queued: %s", exc)
                return
            if applied.count:
                self.backlog.notify()
            if not applied.more:
                return

    async def acatch_up(self, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """catch_up for a coroutine, without blocking its event loop."""
        await asyncio.to_thread(self.catch_up, timeout)

    async def quarantine(
        self, body: bytes, reason: str, headers: dict[str, str], request_id: str | None
    ) -> int:
        """Keep a signed body that cannot be used; bounded like `accepting`."""
        return await self.deadlines.watch(
            self.writer.schedule(
                partial(
                    quarantine, body=body, reason=reason, headers=headers, request_id=request_id
                )
            )
        )

    async def claim_forwards(
        self, sink: str, *, now: str, lease_until: str, refetch_cutoff: str, limit: int
    ) -> list[Claim]:
        return await self.writer.run(
            partial(
                outbox.claim_forwards,
                sink=sink,
                now=now,
                lease_until=lease_until,
                refetch_cutoff=refetch_cutoff,
                limit=limit,
            )
        )

    async def finish_forwards(
        self, outcomes: list[Outcome], stamp: str, held: str | None = None
    ) -> list[Outcome]:
        return await self.writer.run(
            partial(outbox.finish_forwards, outcomes=outcomes, stamp=stamp, held=held)
        )

    async def lease_forwards(self, ids: list[int], held: str, until: str) -> set[int]:
        if not ids:  # every round gives back what it did not send: mostly nothing
            return set()
        return await self.writer.run(
            partial(outbox.lease_forwards, ids=ids, held=held, until=until)
        )

    async def claim_refetches(
        self, *, now: str, lease_until: str, limit: int
    ) -> list[tuple[str, int]]:
        return await self.writer.run(
            partial(outbox.claim_refetches, now=now, lease_until=lease_until, limit=limit)
        )

    async def refetched(self, fields: dict[str, Any], stamp: str) -> str | None:
        """Store a refetched object; returns why it was not (outbox.lagging) instead."""
        return await self.writer.run(
            partial(outbox.refetched, fields=fields, forwarding=self.forwarding, stamp=stamp)
        )

    async def refetch_failed(
        self,
        evaluation_id: str,
        error: str,
        retry_at: str | None,
        stamp: str,
        *,
        held: str,
        attempt: bool = True,
    ) -> bool:
        return await self.writer.run(
            partial(
                outbox.refetch_failed,
                evaluation_id=evaluation_id,
                error=error,
                retry_at=retry_at,
                stamp=stamp,
                held=held,
                attempt=attempt,
            )
        )

    async def claim_polls(self, *, now: str, lease_until: str, limit: int) -> list[tuple[str, int]]:
        return await self.writer.run(
            partial(outbox.claim_polls, now=now, lease_until=lease_until, limit=limit)
        )

    async def poll_answered(self, delivery: Delivery) -> str | None:
        """Ingest a poll's answer; returns why it was not (outbox.lagging) instead."""
        return await self.writer.run(
            partial(outbox.poll_answered, delivery=delivery, forwarding=self.forwarding)
        )

    async def polled(
        self, evaluation_id: str, error: str | None, next_at: str | None, stamp: str
    ) -> None:
        await self.writer.run(
            partial(
                outbox.polled,
                evaluation_id=evaluation_id,
                error=error,
                next_at=next_at,
                stamp=stamp,
            )
        )

    async def record(self, fields: dict[str, Any], source: str, stamp: str) -> None:
        """Store an evaluation object Runflow answered (submit, feedback) as its state."""
        await self.writer.run(
            partial(
                apply_evaluation,
                fields=fields,
                source=source,
                stamp=stamp,
                forwarding=self.forwarding,
            )
        )

    async def request_refetch(self, evaluation_id: str, stamp: str) -> None:
        await self.writer.run(
            partial(outbox.request_refetch, evaluation_id=evaluation_id, stamp=stamp)
        )

    async def retry_forward(self, outbox_id: int, stamp: str) -> dict[str, Any]:
        return await self.writer.run(
            partial(outbox.retry_forward, outbox_id=outbox_id, stamp=stamp, sinks=self._sinks())
        )

    async def retry_dead(self, stamp: str, sink: str | None = None) -> int:
        return await self.writer.run(
            partial(outbox.retry_dead, stamp=stamp, sinks=self._sinks(), sink=sink)
        )

    def _sinks(self) -> frozenset[str]:
        """The names of the configured sinks: the only ones a worker sends to."""
        return frozenset(spec.name for spec in self.forwarding.sinks)

    async def replay_delivery(self, delivery_id: int, stamp: str) -> int:
        await self.acatch_up()  # the delivery may have been acknowledged a moment ago
        return await self.writer.run(
            partial(
                outbox.replay_delivery,
                delivery_id=delivery_id,
                forwarding=self.forwarding,
                stamp=stamp,
            )
        )

    async def prune(self, cutoff: str, batch: int = 2000) -> dict[str, int]:
        """Retention in short transactions, so ingest keeps flowing between them."""
        totals = {"evaluations": 0, "deliveries": 0, "forwards": 0, "quarantine": 0}
        while True:
            counts = await self.writer.run(
                partial(maintenance.prune_batch, cutoff=cutoff, limit=batch)
            )
            for key, value in counts.items():
                totals[key] += value
            if counts["evaluations"] < batch:
                break
        for key, value in (
            await self.writer.run(partial(maintenance.prune_loose, cutoff=cutoff))
        ).items():
            totals[key] += value
        return totals

    def prune_counts(self, cutoff: str) -> dict[str, int]:
        """What `prune(cutoff)` would delete now; deletes nothing. No catch_up: as prune, it
        leaves a callback waiting to be applied (and its evaluation) alone."""
        with self.read() as conn:
            return maintenance.prune_counts(conn, cutoff)

    async def probe(self) -> None:
        """Raise StoreUnavailable unless a write transaction can commit now. It writes the
        header field `application_id` back unchanged, so the commit really appends a page to
        the WAL and fsyncs it: an empty transaction writes nothing, and passes on a full or
        read-only disk."""
        if self.postgres:
            from .pg_backend import probe

            await self.writer.run(probe)
            return
        await self.writer.run(_rewrite_header)

    # reads

    @contextlib.contextmanager
    def read(self, wait: float | None = None) -> Iterator[sqlite3.Connection]:
        """A connection to read with (this thread's SQLite reader, or one from the pool), in
        one read transaction: the writer commits between any two statements, and a read of
        several (an evaluation, then its issues) must show one state, not a mix of two.
        `wait`: seconds to wait for a pooled connection, if not the pool's own timeout."""
        with self._connection(wait) as conn:
            conn.execute(SNAPSHOT_POSTGRES if self.postgres else "BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")  # it wrote nothing

    @contextlib.contextmanager
    def _connection(self, wait: float | None = None) -> Iterator[sqlite3.Connection]:
        if self._pool is None:
            yield self.reader()
            return
        with self._pool.connection(wait) as conn:
            yield cast(sqlite3.Connection, conn)  # the adapter has sqlite3's surface

    def reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def list_evaluations(
        self,
        where: EvaluationFilter,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = True,
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.catch_up()
        with self.read() as conn:
            return list_evaluations(conn, where, limit, cursor, newest_first)

    def list_changes(
        self,
        where: EvaluationFilter,
        limit: int = 50,
        cursor: str | None = None,
        flag: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.catch_up()
        with self.read() as conn:
            return list_changes(conn, where, limit, cursor, flag=flag)

    def has_evaluation(self, evaluation_id: str) -> bool:
        with self.read() as conn:
            return has_evaluation(conn, evaluation_id)

    def get_evaluation(self, evaluation_id: str) -> dict[str, Any] | None:
        self.catch_up()
        with self.read() as conn:
            return get_evaluation(conn, evaluation_id)

    def get_client_ref(self, client_ref: str) -> dict[str, Any] | None:
        self.catch_up()
        with self.read() as conn:
            return get_client_ref(conn, client_ref)

    def stats(self, where: EvaluationFilter) -> dict[str, Any]:
        self.catch_up()
        with self.read() as conn:
            return stats(conn, where)

    def lineage(self, evaluation_id: str) -> list[dict[str, Any]]:
        self.catch_up()
        with self.read() as conn:
            return lineage(conn, evaluation_id)

    def list_forwards(
        self, *, state: str | None, sink: str | None, limit: int, after: int | None = None
    ) -> list[dict[str, Any]]:
        self.catch_up()
        with self.read() as conn:
            return outbox.list_forwards(conn, state=state, sink=sink, limit=limit, after=after)

    def service_forwarding(self) -> str | None:
        """What the service forwards (store/service.py), as it recorded at its last start."""
        with self.read() as conn:
            return service.recorded(conn)

    def outbox_depth(self, wait: float | None = None) -> dict[str, dict[str, int]]:
        """Forwards per sink and state. /metrics waits at most GLANCE_WAIT for a connection;
        the dashboard, as every page, the pool's own timeout (a busy pool is not a fault)."""
        with self.read(wait) as conn:
            return outbox.outbox_depth(conn)

    def apply_backlog(self) -> int:
        """How many acknowledged callbacks wait to be applied (without applying them); for
        /metrics, so it waits at most GLANCE_WAIT for a connection."""
        with self.read(GLANCE_WAIT) as conn:
            (count,) = conn.execute("SELECT count(*) FROM apply_queue").fetchone()
        return int(count)

    async def polls_due(self, now: str) -> bool:
        return await self._glance(partial(outbox.polls_due, now=now))

    async def has_due(self, sink: str, now: str) -> bool:
        """A cheap read-only look before taking the write lock to claim."""
        return await self._glance(partial(outbox.has_due, sink=sink, now=now))

    async def _glance(self, look: Callable[[sqlite3.Connection], bool]) -> bool:
        """The worker's looks, from the event loop: on SQLite at once (a local read of a few
        pages), on PostgreSQL in a thread, so a database down (a connection waited for) or
        hung (a query that never ends) holds the worker, not the server's event loop, whose
        callbacks are answered 503 meanwhile."""

        def read() -> bool:
            with self.read() as conn:
                return look(conn)

        return await asyncio.to_thread(read) if self.postgres else read()
