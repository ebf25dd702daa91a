"""Accepted callbacks are applied after the ack: when (the policy, with a fake clock and CPU
meter) and what the store guarantees meanwhile (reads catch up, restarts carry on, backpressure,
a delivery that cannot be applied stays queued)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import Any

import psycopg
import pytest

from receiver.errors import StoreUnavailable
from receiver.store import Store
from receiver.store.apply import Applied, apply_queued
from receiver.store.backlog import (
    BUSY,
    CHUNK,
    GATHER,
    IDLE,
    LINGER,
    LOOK,
    MAX_CHUNK,
    PAUSE,
    PRESSURE,
    QUIET_CHUNK,
    WINDOW,
    Backlog,
)

from .database import POSTGRES, connect, database_for, waiting_for_a_lock
from .postgres import PostgresService
from .test_store import delivery

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Meter:
    """A clock and a CPU meter the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 0.0

    def spend(self, seconds: float, busy: float) -> None:
        self.now += seconds
        self.cpu += seconds * busy


def policy(meter: Meter, limit: int = 100, pending: int = 0) -> Backlog:
    backlog = Backlog(
        lambda conn, most, through, skip, isolate: Applied(0, False),
        limit,
        clock=lambda: meter.now,
        cpu=lambda: meter.cpu,
    )
    if not pending:  # the queue was just found empty
        backlog.apply(sqlite3.connect(":memory:"))
    backlog.pending = pending
    return backlog


def primed(meter: Meter, backlog: Backlog, busy: float, batch: int, since: float) -> None:
    """A WINDOW of `busy` CPU with batches of `batch` operations, the last `since` ago."""
    meter.spend(2 * WINDOW - since, busy)
    for _ in range(50):
        backlog.took(batch)
    meter.spend(since, busy)
    backlog.due()


@pytest.mark.parametrize(
    ("pending", "busy", "batch", "since_operation", "expected"),
    [
        (0, 0.0, 1, 0.0, LOOK - 2 * WINDOW),  # nothing queued: an operation, or the next look
        (0, 1.0, 30, 1.0, LOOK - 2 * WINDOW),
        (5, 0.1, 30, 0.0, 0.0),  # CPU to spare: apply as soon as no operation waits
        (5, 1.0, 2, 0.0, 0.0),  # busy, but nobody queues up for the writer: the same
        (5, 1.0, PRESSURE - 1, 0.0, 0.0),
        (5, BUSY + 0.05, PRESSURE + 1, 0.0, IDLE),  # a burst: only in a pause between them
        (5, 1.0, 30, IDLE / 2, IDLE / 2),
        (5, 1.0, 30, IDLE, 0.0),
        (100, 1.0, 30, 0.0, 0.0),  # at the limit: apply now, even in a burst
    ],
)
def test_when_to_apply(
    pending: int, busy: float, batch: int, since_operation: float, expected: float | None
) -> None:
    meter = Meter()
    backlog = policy(meter, limit=100, pending=pending)
    primed(meter, backlog, busy, batch, since_operation)
    assert backlog.due() == pytest.approx(expected)
    assert backlog.forced() == (pending >= 100)


@pytest.mark.parametrize(
    ("queued", "waited", "busy", "batch", "expected"),
    [
        (1, 0.0, 0.1, 1, LINGER),  # one callback: wait for more to come with it …
        (GATHER - 1, LINGER / 4, 0.1, 1, LINGER * 3 / 4),
        (1, LINGER, 0.1, 1, 0.0),  # … for LINGER at most
        (GATHER, 0.0, 0.1, 1, 0.0),  # enough for a chunk: at once
        (1, 0.0, 1.0, 30, IDLE),  # a burst: its pause decides, as before
    ],
)
def test_deliveries_gather_before_a_chunk(
    queued: int, waited: float, busy: float, batch: int, expected: float
) -> None:
    """A chunk costs less per callback the more it holds (each commit writes the same index
    pages again), so the queue gathers for up to LINGER, or until GATHER are queued."""
    meter = Meter()
    backlog = policy(meter)
    primed(meter, backlog, busy, batch, 0.0)
    for _ in range(queued):
        backlog.added()
    meter.spend(waited, busy)
    assert backlog.due() == pytest.approx(expected)


def test_gathering_starts_again_once_the_queue_is_applied() -> None:
    meter = Meter()
    backlog = Backlog(
        lambda conn, most, through, skip, isolate: Applied(2, False),
        100,
        clock=lambda: meter.now,
        cpu=lambda: meter.cpu,
    )
    assert backlog.due() == 0.0  # at start it is not known what is queued: look at once
    backlog.apply(sqlite3.connect(":memory:"))
    assert backlog.due() == pytest.approx(LOOK)
    meter.spend(1.0, 0.0)
    backlog.added()
    backlog.added()
    assert backlog.due() == pytest.approx(LINGER)
    meter.spend(LINGER, 0.0)
    assert backlog.due() == 0.0
    backlog.apply(sqlite3.connect(":memory:"))
    backlog.added()
    assert backlog.due() == pytest.approx(LINGER)  # the next one waits from its own arrival


def test_an_empty_queue_is_looked_at_again_after_a_while() -> None:
    """Another process on the database may acknowledge callbacks and die before it applies
    them: they waited here until this process acknowledged one of its own."""
    meter = Meter()
    backlog = policy(meter)  # the queue just found empty
    assert not backlog.ready()
    meter.spend(LOOK / 2, 0.0)
    assert backlog.due() == pytest.approx(LOOK / 2)
    meter.spend(LOOK / 2, 0.0)
    assert backlog.due() == 0.0
    assert backlog.ready()
    backlog.apply(sqlite3.connect(":memory:"))
    assert backlog.due() == pytest.approx(LOOK)


@pytest.mark.parametrize(
    ("cpu", "writer", "expected"),
    [
        (0.3, 0.9, IDLE),  # PostgreSQL: the writer waits on round trips, saturated; CPU is not
        (0.3, 0.5, 0.0),  # neither saturated: apply as soon as no operation waits
        (0.9, 0.2, IDLE),  # SQLite: the CPU is saturated
    ],
)
def test_a_saturated_writer_is_busy_too(cpu: float, writer: float, expected: float) -> None:
    meter = Meter()
    backlog = policy(meter, limit=100, pending=5)
    meter.spend(2 * WINDOW, cpu)
    for _ in range(50):
        backlog.took(30)
    backlog.worked(2 * WINDOW * writer)
    assert backlog.due() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pending", "limit", "batch", "since_operation", "chunk"),
    [
        (1, 100, 30, 0.0, CHUNK),  # operations arriving (a burst or not): what has gathered
        (20, 100, 30, 0.0, 20),
        (99, 100, 30, 0.0, GATHER),  # … and no more, so that no ack waits long behind it
        (3, 100, 2, 0.0, CHUNK),
        (500, 1000, 2, 0.0, GATHER),
        (50, 100, 30, IDLE, CHUNK),  # a pause: chunks start small again …
        (150, 100, 30, 0.0, 51),  # forced: enough to get back under the limit
        (100_000, 10, 30, 0.0, MAX_CHUNK),
    ],
)
def test_chunk_sizes(
    pending: int, limit: int, batch: int, since_operation: float, chunk: int
) -> None:
    asked: list[int] = []

    def apply(conn: Any, most: int, through: Any, skip: Any, isolate: bool) -> Applied:
        asked.append(most)
        return Applied(most, True)

    meter = Meter()
    backlog = Backlog(apply, limit, clock=lambda: meter.now, cpu=lambda: meter.cpu)
    backlog.pending = pending
    primed(meter, backlog, 1.0, batch, since_operation)
    backlog.operation(sqlite3.connect(":memory:"))
    assert asked == [chunk]
    assert backlog.pending == max(pending - chunk, 1)


def test_chunks_double_while_no_operation_comes_and_shrink_when_one_does() -> None:
    """… and grow only while nothing arrives, so an ack that comes in a pause of a burst
    waits for a chunk about as long as the pause had lasted, never QUIET_CHUNK's ~30 ms."""
    asked: list[int] = []

    def apply(conn: Any, most: int, through: Any, skip: Any, isolate: bool) -> Applied:
        asked.append(most)
        return Applied(most, True)

    meter = Meter()
    backlog = Backlog(apply, 1_000_000, clock=lambda: meter.now, cpu=lambda: meter.cpu)
    backlog.pending = 100_000
    primed(meter, backlog, 1.0, 30, IDLE)
    conn = sqlite3.connect(":memory:")
    for _ in range(6):
        backlog.operation(conn)
    backlog.took(1)
    backlog.operation(conn)
    meter.spend(IDLE, 1.0)
    backlog.operation(conn)
    assert asked == [
        CHUNK,
        2 * CHUNK,
        4 * CHUNK,
        8 * CHUNK,
        QUIET_CHUNK,
        QUIET_CHUNK,
        GATHER,
        CHUNK,
    ]


def test_a_failed_chunk_is_applied_again_isolated_and_then_pauses() -> None:
    """Chunks run without a savepoint per callback; one that fails is rolled back and run
    again at once with them (which finds and skips the delivery at fault). Only a chunk that
    fails even so (the store itself) pauses before the next look."""
    meter = Meter()
    isolated: list[bool] = []

    def apply(conn: Any, most: int, through: Any, skip: Any, isolate: bool) -> Applied:
        isolated.append(isolate)
        return Applied(1, True)

    backlog = Backlog(apply, 100, clock=lambda: meter.now, cpu=lambda: meter.cpu)
    backlog.pending = 3
    conn = sqlite3.connect(":memory:")
    failed: Future[Applied] = Future()
    failed.set_exception(StoreUnavailable("disk full"))
    backlog.operation(conn)
    backlog.settled(failed)  # the first, optimistic chunk failed …
    assert backlog.ready()  # … so no pause:
    backlog.operation(conn)  # the next runs isolated
    backlog.settled(failed)  # and fails too: pause
    assert not backlog.ready()
    assert backlog.due() == pytest.approx(PAUSE)
    meter.spend(PAUSE, 0.0)
    assert backlog.ready()
    backlog.operation(conn)  # still isolated, until one succeeds
    done: Future[Applied] = Future()
    done.set_result(Applied(1, True))
    backlog.settled(done)
    backlog.operation(conn)
    assert isolated == [False, True, True, False]


def test_counting_off_and_skipping_what_failed() -> None:
    answers = [Applied(2, False, failed=(7,)), Applied(0, False)]
    skips: list[frozenset[int]] = []

    def apply(conn: Any, most: int, through: Any, skip: frozenset[int], isolate: bool) -> Applied:
        skips.append(skip)
        return answers.pop(0)

    backlog = Backlog(apply, 100)
    backlog.pending = 3
    backlog.operation(sqlite3.connect(":memory:"))
    assert backlog.pending == 0  # the queue said nothing more
    backlog.added()
    backlog.apply(sqlite3.connect(":memory:"), through=9)
    assert backlog.pending == 1  # a catch-up up to an id: newer ones may wait, look again
    assert skips == [frozenset(), frozenset({7})]


# -- the store -----------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> str:
    return database_for(tmp_path / "receiver.db")


def opened(path: str, hold: bool = False, **options: Any) -> Store:
    """A store; with `hold`, its writer never applies in the background (only reads do)."""
    store = Store(path, **options)
    if hold:
        store.backlog.due = lambda: None  # type: ignore[method-assign]
    store.open()
    return store


@pytest.fixture
def held(path: str) -> Iterator[Store]:
    store = opened(path, hold=True)
    try:
        yield store
    finally:
        store.close()


def raw(path: str, sql: str) -> Any:
    """Straight from the database, without waiting for the queue (tests/database.connect
    would)."""
    if path.startswith("postgresql"):
        import psycopg

        with psycopg.connect(path) as conn:
            row = conn.execute(sql).fetchone()
            return row[0] if row else None
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def body(number: int) -> dict[str, Any]:
    return {
        "id": f"0193a7c2-0000-7000-8000-{number:012d}",
        "status": "completed",
        "client_ref": f"ref-{number % 3}",
        "passed": number % 2 == 0,
        "task_type": "headshot",
    }


async def test_accept_stores_and_queues_then_a_read_applies(held: Store, path: str) -> None:
    receipt = await held.accept(delivery(body(1)))
    assert (receipt.outcome, receipt.evaluation_id) == ("stored", body(1)["id"])
    assert raw(path, "SELECT count(*) FROM deliveries") == 1
    assert raw(path, "SELECT count(*) FROM apply_queue") == 1
    assert raw(path, "SELECT count(*) FROM evaluations") == 0
    assert held.apply_backlog() == 1  # the /metrics gauge: counting does not apply
    found = held.get_evaluation(body(1)["id"])  # reads catch up first
    assert found is not None
    assert found["evaluation"]["status"] == "completed"
    assert raw(path, "SELECT count(*) FROM apply_queue") == 0
    assert held.apply_backlog() == 0
    assert raw(path, "SELECT received_at FROM evaluations") == raw(
        path, "SELECT received_at FROM deliveries"
    )


async def test_any_number_of_skipped_deliveries_leaves_the_rest_applied(
    held: Store, path: str
) -> None:
    """Deliveries that failed to apply are skipped until a restart; however many there are,
    the others apply (a parameter each failed every chunk past SQLite's limit, 32,766 in
    stock builds, so reads silently missed what was acknowledged)."""
    failed = await held.accept(delivery(body(1)))
    held.backlog._skip = frozenset({failed.delivery_id, *range(10**6, 10**6 + 250_001)})
    receipt = await held.accept(delivery(body(2)))
    assert held.get_evaluation(body(2)["id"]) is not None
    assert raw(path, "SELECT min(delivery_id) FROM apply_queue") == failed.delivery_id
    assert receipt.delivery_id != failed.delivery_id


async def test_duplicates_and_run_callbacks_are_never_queued(held: Store, path: str) -> None:
    await held.accept(delivery(body(1)))
    again = await held.accept(delivery(body(1)))
    run = await held.accept(delivery({"event": "run.completed", "id": "run_1"}))
    assert (again.outcome, run.outcome) == ("duplicate", "ignored")
    assert raw(path, "SELECT count(*) FROM apply_queue") == 1


async def test_the_writer_applies_on_its_own_and_says_so(path: str) -> None:
    applied = threading.Event()
    store = opened(path)
    store.on_applied(applied.set)
    try:
        await store.accept(delivery(body(1)))
        assert applied.wait(5)
        assert raw(path, "SELECT count(*) FROM evaluations") == 1
        assert raw(path, "SELECT count(*) FROM apply_queue") == 0
        assert store.backlog.pending == 0
    finally:
        store.close()


async def test_a_restart_applies_what_was_left_queued(path: str) -> None:
    store = opened(path, hold=True)
    for number in range(5):
        await store.accept(delivery(body(number)))
    store.close()
    assert raw(path, "SELECT count(*) FROM apply_queue") == 5
    again = opened(path)
    try:
        connect(path).close()  # waits for the queue to empty
        assert raw(path, "SELECT count(*) FROM evaluations") == 5
        assert raw(path, "SELECT count(*) FROM client_refs") == 3
    finally:
        again.close()


async def test_what_another_process_left_queued_is_applied_without_a_restart(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers on one database: one acknowledged callbacks and was killed before it
    applied them; the other, idle, left them unapplied (and unforwarded) until it
    acknowledged one of its own."""
    monkeypatch.setattr(import_module("receiver.store.backlog"), "LOOK", 0.05)
    running = opened(path)
    try:
        deadline = time.monotonic() + 10
        while running.backlog.pending:  # its look at start is done
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        killed = opened(path, hold=True)
        for number in range(3):
            await killed.accept(delivery(body(number)))
        killed.close()
        while raw(path, "SELECT count(*) FROM evaluations") < 3:
            assert time.monotonic() < deadline, "left queued"
            await asyncio.sleep(0.02)
        assert raw(path, "SELECT count(*) FROM apply_queue") == 0
    finally:
        running.close()


async def test_past_the_limit_acks_wait_for_applying(path: str) -> None:
    store = opened(path, max_backlog=3)
    store.backlog.due = lambda: 0.0 if store.backlog.forced() else None  # type: ignore[method-assign]
    try:
        for number in range(12):
            await store.accept(delivery(body(number)))
            assert raw(path, "SELECT count(*) FROM apply_queue") <= 3
        assert raw(path, "SELECT count(*) FROM evaluations") >= 9
    finally:
        store.close()


async def test_a_delivery_that_cannot_be_applied_stays_queued_and_is_skipped(
    held: Store, path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real: Callable[..., None] = import_module("receiver.store.apply").apply_evaluation

    def broken(conn: Any, fields: dict[str, Any], **options: Any) -> None:
        if fields["id"] == body(2)["id"]:
            raise RuntimeError("a bug")
        real(conn, fields, **options)

    monkeypatch.setattr(import_module("receiver.store.apply"), "apply_evaluation", broken)
    for number in range(4):
        await held.accept(delivery(body(number)))
    with caplog.at_level(logging.ERROR, "receiver.store"):
        assert [item["id"] for item in held.list_evaluations(where_all())[0]] == sorted(
            (body(n)["id"] for n in (0, 1, 3)), reverse=True
        )
    assert caplog.text.count("could not be applied; it stays queued") == 1
    assert raw(path, "SELECT count(*) FROM apply_queue") == 1
    held.list_evaluations(where_all())
    assert caplog.text.count("could not be applied") == 1  # skipped now, not retried


async def test_in_the_background_a_bad_delivery_fails_its_chunk_alone(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's own chunks run without a savepoint per callback: the one that meets the
    bad delivery is rolled back and run again isolated, which applies the others."""
    real: Callable[..., None] = import_module("receiver.store.apply").apply_evaluation

    def broken(conn: Any, fields: dict[str, Any], **options: Any) -> None:
        if fields["id"] == body(2)["id"]:
            raise RuntimeError("a bug")
        real(conn, fields, **options)

    monkeypatch.setattr(import_module("receiver.store.apply"), "apply_evaluation", broken)
    store = opened(path)
    try:
        with caplog.at_level(logging.ERROR, "receiver.store"):
            for number in range(4):
                await store.accept(delivery(body(number)))
            deadline = time.monotonic() + 10
            while raw(path, "SELECT count(*) FROM evaluations") < 3:
                assert time.monotonic() < deadline, "the good ones were not applied"
                await asyncio.sleep(0.02)
    finally:
        store.close()
    assert raw(path, "SELECT count(*) FROM apply_queue") == 1
    assert caplog.text.count("could not be applied; it stays queued") == 1
    assert "retrying in" not in caplog.text  # no pause: the isolated chunk went through


PARENT, CHILD, TWICE = (body(n)["id"] for n in (7, 8, 9))
IN_ONE_CHUNK = [  # arrival order: an evaluation twice, an attempt before the one it supersedes
    {"id": TWICE, "status": "running", "client_ref": "ref-a"},
    {"id": TWICE, "status": "completed", "overall_passed": True, "client_ref": "ref-a"},
    {
        "id": CHILD,
        "status": "completed",
        "overall_passed": True,
        "client_ref": "ref-p",
        "parent_evaluation_id": PARENT,
        "attempt_number": 2,
    },
    {"id": PARENT, "status": "completed", "overall_passed": False, "client_ref": "ref-p"},
]


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "one-transaction"])
async def test_a_chunk_applies_each_callback_as_if_alone(
    held: Store, path: str, isolate: bool
) -> None:
    """Unisolated, PostgreSQL reads a chunk's stored rows at once (apply.read_stored): a
    callback must still see what the chunk's earlier ones wrote."""
    for fields in IN_ONE_CHUNK:
        await held.accept(delivery(fields))
    chunk = partial(apply_queued, most=10, isolate=isolate)
    assert held.writer.submit(chunk).result(timeout=10).count == 4
    conn = connect(path)
    try:
        rows = conn.execute(
            "SELECT id, status, passed, superseded FROM evaluations ORDER BY id"
        ).fetchall()
        refs = conn.execute(
            "SELECT client_ref, current_evaluation_id, evaluations FROM client_refs"
            " ORDER BY client_ref"
        ).fetchall()
    finally:
        conn.close()
    assert [tuple(row) for row in rows] == [
        (PARENT, "completed", 0, 1),
        (CHILD, "completed", 1, 0),
        (TWICE, "completed", 1, 0),
    ]
    assert [tuple(row) for row in refs] == [("ref-a", TWICE, 1), ("ref-p", CHILD, 2)]


def where_all() -> Any:
    from receiver.store import EvaluationFilter

    return EvaluationFilter()


async def test_a_read_waits_at_most_its_timeout(held: Store, path: str) -> None:
    await held.accept(delivery(body(1)))
    slow = threading.Event()
    held.writer.submit(lambda conn: slow.wait(10))
    held.catch_up(timeout=0.2)
    assert not slow.is_set()  # it returned while the writer was still held up
    slow.set()
    assert raw(path, "SELECT count(*) FROM apply_queue") == 1  # so it read what was there


def test_a_deadlock_while_applying_one_by_one_is_retried_not_skipped(
    postgres_server: PostgresService,
) -> None:
    """PostgreSQL, another replica holding evaluation B's lock and then waiting for A's, while a
    read's catch-up applies A then B one by one (isolated): the deadlock aborts the writer's
    transaction. That is a conflict between transactions, which the writer retries, not a
    delivery that cannot be applied: B was once skipped until the next restart, acknowledged
    but missing from every read and never forwarded."""
    url = postgres_server.create()
    name = url.rsplit("/", 1)[1]
    # The writer looks for a deadlock after 1 s of waiting, the other replica not at all: the
    # writer is the one PostgreSQL aborts, whatever the timing.
    postgres_server.admin(f"ALTER DATABASE {name} SET deadlock_timeout = '1s'")
    first, second = body(1), body(2)
    store = opened(url, hold=True)
    other = psycopg.connect(url)
    try:
        asyncio.run(store.accept(delivery(first)))
        asyncio.run(store.accept(delivery(second)))
        other.execute("SET deadlock_timeout = '60s'")
        lock = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
        other.execute(lock, (f"evaluation:{second['id']}",))
        read: Future[Any] = Future()
        threading.Thread(
            target=lambda: read.set_result(store.get_evaluation(second["id"])), daemon=True
        ).start()
        with psycopg.connect(url, autocommit=True) as watch:
            deadline = time.monotonic() + 10
            while not watch.execute(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone():  # the writer holds A's lock and waits for B's
                assert time.monotonic() < deadline, "the writer never waited for B"
                time.sleep(0.01)
        other.execute(lock, (f"evaluation:{first['id']}",))  # the cycle: the writer is aborted
        other.rollback()
        found = read.result(timeout=10)
        assert found is not None, "an acknowledged callback was skipped after a deadlock"
        assert store.get_evaluation(first["id"]) is not None
        assert raw(url, "SELECT count(*) FROM apply_queue") == 0
    finally:
        other.close()
        store.close()
        postgres_server.drop(url)


@pytest.mark.skipif(
    not POSTGRES,
    reason="SQLite applies in one write transaction at a time: no two chunks overlap",
)
def test_two_servers_never_apply_one_queued_callback_twice(path: str) -> None:
    """Servers A and B (`serve --workers 2`) both apply the one apply_queue. A applies a
    `failed` callback; B's chunk reads the queue meanwhile, sees it still queued and waits for
    the evaluation's lock; the `completed` callback for it is acknowledged after and A applies
    it too. B must not apply the `failed` one a second time on top: envelope bodies carry no
    updated_at, so the later arrival wins a tie, and the evaluation went back to failed (its
    client_ref with nothing current), which no order of the two callbacks gives."""
    from receiver.store.ingest import accept
    from receiver.store.pg_connection import connect as pg_connect

    Store(path).migrate()
    feeder, server_a, server_b = (pg_connect(path) for _ in range(3))
    evaluation_id = "0193a7c2-5b1e-7c3d-9f10-000000000042"
    envelope = {"evaluation_id": evaluation_id, "client_ref": "job-9", "task_type": "headshot"}
    failed = {
        **envelope,
        "event": "evaluation.failed",
        "status": "failed",
        "failure_code": "timed_out",
    }
    completed = {
        **envelope,
        "event": "evaluation.completed",
        "status": "completed",
        "overall_passed": True,
        "weighted_pass_rate": 0.9,
    }
    try:
        accept(feeder, delivery(failed))
        server_a.execute("BEGIN")
        assert apply_queued(server_a, 8, isolate=False).count == 1

        def server_b_chunk() -> None:
            server_b.execute("BEGIN")
            apply_queued(server_b, 8, isolate=False)
            server_b.execute("COMMIT")

        chunk_b = threading.Thread(target=server_b_chunk)
        chunk_b.start()
        waiting_for_a_lock(server_b)
        accept(feeder, delivery(completed))
        assert apply_queued(server_a, 8, isolate=False).count == 1
        server_a.execute("COMMIT")
        chunk_b.join(timeout=30)
        assert not chunk_b.is_alive()
        conn = connect(path)
        try:
            row = conn.execute(
                "SELECT status, passed, failure_code FROM evaluations WHERE id = ?",
                (evaluation_id,),
            ).fetchone()
            ref = conn.execute(
                "SELECT current_evaluation_id, latest_status FROM client_refs"
            ).fetchone()
            queued = conn.execute("SELECT count(*) FROM apply_queue").fetchone()
        finally:
            conn.close()
        assert tuple(row) == ("completed", 1, None)
        assert tuple(ref) == (evaluation_id, "completed")
        assert tuple(queued) == (0,)
    finally:
        for conn in (feeder, server_a, server_b):
            conn.close()
