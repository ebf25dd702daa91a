"""store/deadlines.py: a callback the store does not commit within the bound is answered 503
with Retry-After, on both paths (the endpoint, and the HTTP protocol's own), whatever holds
the writer: another process's turn (the writers' flock), another connection's SQLite write
lock, a PostgreSQL session's LOCK TABLE, a stopped PostgreSQL. Sent again once the hold is
gone, it is stored: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from receiver.config import Settings
from receiver.errors import StoreTimeout
from receiver.logs import WEBHOOK_PATH
from receiver.protocol import WebhookProtocol
from receiver.store import Store
from receiver.store.deadlines import Deadlines

from .database import POSTGRES, sqlite_only
from .helpers import count
from .test_protocol import callback, serve, signed

BOUND = 0.5  # seconds: the injected ack timeout
ANSWERED = 30.0  # seconds: a generous bound on getting any answer at all (the old code: none)
REASON = (
    "the store did not commit within 0.5 s (another process holds the writers' turn or a lock,"
    " or the database hangs); retry"
)


@contextmanager
def writers_turn(database: str) -> Iterator[None]:
    """Another process's write (a CLI command) holding the writers' flock."""
    turns = os.open(f"{database}-writer.lock", os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(turns, fcntl.LOCK_EX)
        yield
    finally:
        os.close(turns)


@contextmanager
def sqlite_write_lock(database: str) -> Iterator[None]:
    """An sqlite3 shell in BEGIN IMMEDIATE."""
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@contextmanager
def table_lock(database: str) -> Iterator[None]:
    """A PostgreSQL session holding `LOCK TABLE deliveries` (a script, a manual fix)."""
    import psycopg

    with psycopg.connect(database) as conn:  # leaving it rolls the transaction back
        conn.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        yield


@contextmanager
def stopped_server(database: str) -> Iterator[None]:
    """The database's server processes stopped (SIGSTOP): connections stay open, and nothing
    answers on them, not even an error."""
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        pids = [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


Hold = Callable[[str], AbstractContextManager[None]]
on_postgres = pytest.mark.skipif(not POSTGRES, reason="a PostgreSQL lock")
# hold, whether a callback that got its 503 may still be stored (its transaction had begun)
HOLDS = [
    pytest.param(writers_turn, False, id="writers-flock", marks=sqlite_only),
    pytest.param(sqlite_write_lock, False, id="begin-immediate", marks=sqlite_only),
    pytest.param(table_lock, True, id="lock-table", marks=on_postgres),
    pytest.param(stopped_server, True, id="sigstop", marks=on_postgres),
]


@pytest.mark.parametrize("http", ["httptools", WebhookProtocol], ids=["endpoint", "protocol"])
@pytest.mark.parametrize(("hold", "may_commit"), HOLDS)
def test_a_held_store_answers_503_in_time_and_a_retry_stores_it_once(
    tmp_path: Path, http: str | type[asyncio.Protocol], hold: Hold, may_commit: bool
) -> None:
    """Every callback waited for as long as the hold lasted, and the sender saw nothing."""

    def store(settings: Settings) -> Store:
        return Store(settings.database, ack_timeout=BOUND)

    bodies = [callback(number) for number in (1, 2, 3)]
    with ExitStack() as stack:
        server = serve(stack, tmp_path / "server", http, store)
        database = server.settings.database
        with httpx.Client(base_url=server.url, timeout=ANSWERED) as client:
            first = callback(0)  # the writer has its connection before the hold
            assert client.post(WEBHOOK_PATH, content=first, headers=signed(first)).is_success
            with hold(database):
                refused = [
                    client.post(WEBHOOK_PATH, content=body, headers=signed(body)) for body in bodies
                ]
            for response in refused:
                assert response.status_code == 503
                assert response.json() == {"ok": False, "error": REASON}
                assert response.headers["retry-after"] == "1"
            again = [
                client.post(WEBHOOK_PATH, content=body, headers=signed(body)).json()
                for body in bodies
            ]
    outcomes = {answer["outcome"] for answer in again}
    # Given up before its transaction began: never stored, so the retry is what stores it.
    assert outcomes <= ({"stored", "duplicate"} if may_commit else {"stored"})
    assert count(server.settings, "deliveries") == 1 + len(bodies)


def test_every_waiter_past_the_bound_fails_and_the_rest_keep_their_answer() -> None:
    """One FIFO and one timer: those answered in time keep their result, each of the others
    gets StoreTimeout, in the order they came."""

    async def run() -> list[object]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(0.05)
        futures = [deadlines.watch(loop.create_future()) for _ in range(5)]
        futures[1].set_result("stored")
        futures[3].set_result("duplicate")
        answers: list[object] = []
        for future in futures:
            try:
                answers.append(await future)
            except StoreTimeout as exc:
                answers.append((str(exc).split(" (")[0], exc.retry_after))
        return answers

    late = ("the store did not commit within 0.05 s", 1)
    assert asyncio.run(run()) == [late, "stored", late, "duplicate", late]


def test_a_store_used_from_a_new_event_loop_is_bounded_there_too() -> None:
    """The app's loop ends (a test client, a restart in one process): the next loop's
    waiters still get their timer."""
    deadlines = Deadlines(0.05)

    async def one() -> str:
        try:
            await deadlines.watch(asyncio.get_running_loop().create_future())
        except StoreTimeout:
            return "timed out"
        return "answered"

    async def left_pending() -> None:
        deadlines.watch(asyncio.get_running_loop().create_future())

    asyncio.run(left_pending())  # its loop closes with the timer still set
    assert asyncio.run(one()) == "timed out"


def test_settled_waiters_leave_as_new_ones_come() -> None:
    """Acks settle about in the order they came: the FIFO holds about what is in flight, not
    every ack of the last bound's worth of seconds (at full load ~30,000 of them, and a sweep
    over them all in one loop turn)."""

    async def run() -> int:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(60.0)
        in_flight: list[asyncio.Future[str]] = []
        for _ in range(1000):
            in_flight.append(deadlines.watch(loop.create_future()))
            if len(in_flight) == 32:
                in_flight.pop(0).set_result("stored")
        return len(deadlines._pending)

    assert asyncio.run(run()) <= 33
