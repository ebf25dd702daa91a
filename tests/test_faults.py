"""Faults around a real receiver: a destination down and back, Slack answering 429 and 500,
the Runflow API answering 429, 500 or too slowly, the database unwritable (full disk, read-only
files), and SIGTERM under load. The receiver runs as `receiver serve` (tests/servers.py), or
in-process behind real uvicorn when the test needs a short HTTP client timeout; destinations are
the fakes in receiver/fakes served on loopback, and a real Redis (tests/services.py).

Also covered elsewhere: Redis stopped and started mid-run with Slack, Discord and HTTP
consumers failing on top (test_pipeline.py); each refetch fault on its own against the worker
(test_worker.py); kill -9 under load (test_crash.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.app import create_app
from receiver.errors import StoreUnavailable
from receiver.events import event_id
from receiver.fakes.chat import FakeSlack
from receiver.fakes.recorder import Recorder
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign
from receiver.sinkspec import SinkSpec
from receiver.store.writer import Writer
from receiver.times import now, shift

from .database import POSTGRES, connect, sqlite_only
from .helpers import SECRET_A, fixture, make_settings
from .servers import ReceiverProcess
from .services import RedisService

API_KEY = "rf_faults_key"
FAST_RETRIES = {
    "RECEIVER_RETRY_BASE": "0.05",
    "RECEIVER_RETRY_MAX": "0.5",
    "RECEIVER_MAX_ATTEMPTS": "1000",
}


def callback(number: int) -> tuple[str, bytes]:
    evaluation_id = f"0193a7c2-0000-7000-8000-{number:012d}"
    body = json.loads(fixture("evaluation-completed-envelope.json"))
    body.update(evaluation_id=evaluation_id, client_ref=f"fault-{number}")
    return evaluation_id, json.dumps(body).encode()


def signed(body: bytes) -> dict[str, str]:
    return {"content-type": "application/json", "runflow-signature": sign(body, SECRET_A)}


def post(url: str, number: int) -> httpx.Response:
    body = callback(number)[1]
    return httpx.post(f"{url}/webhooks/runflow", content=body, headers=signed(body), timeout=15)


def wait_until(check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


def rows(database: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = connect(database)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def sinks_toml(*sinks: dict[str, str]) -> str:
    return "".join(
        "[[sinks]]\n" + "".join(f'{key} = "{value}"\n' for key, value in sink.items())
        for sink in sinks
    )


def receiver(tmp_path: Path, *sinks: dict[str, str], **env: str) -> ReceiverProcess:
    config = tmp_path / "receiver.toml"
    config.write_text(sinks_toml(*sinks))
    return ReceiverProcess(tmp_path, RECEIVER_CONFIG=str(config), **{**FAST_RETRIES, **env})


def event_ids(received: list[Any]) -> list[str]:
    return [json.loads(item.body)["id"] for item in received]


# -- a destination down, then back ------------------------------------------------------------


def test_destinations_down_for_a_while_neither_slow_ingestion_nor_the_others(
    tmp_path: Path, redis_server: RedisService, stream: str
) -> None:
    """The HTTP consumer's server gone (connection refused) and Redis stopped, while Slack is
    fine: callbacks still get their 200 and /readyz stays 200, Slack gets every verdict at
    once, and the other two get each exactly once when they are back."""
    consumer, slack = Recorder(), FakeSlack()
    ids = [callback(n)[0] for n in range(12)]
    expected = {event_id(i, "evaluation.completed") for i in ids}
    with serve_in_thread(slack.app) as slack_url, contextlib.ExitStack() as stack:
        consumer_url = stack.enter_context(serve_in_thread(consumer.app))
        server = receiver(
            tmp_path,
            {"name": "slack", "type": "slack", "url": slack.url(slack_url)},
            {"name": "consumer", "type": "http", "url": f"{consumer_url}/hooks"},
            {"name": "pipeline", "type": "redis", "url": redis_server.url, "stream": stream},
        )
        with server:
            for n in range(4):
                assert post(server.url, n).status_code == 200
            consumer.wait_for(4)
            wait_until(lambda: len(redis_server.stream_ids(stream)) == 4, "redis")
            stack.close()  # the consumer's server is gone: connections are refused
            redis_server.stop()
            try:
                for n in range(4, 12):
                    assert post(server.url, n).status_code == 200
                assert httpx.get(f"{server.url}/readyz").status_code == 200
                slack.wait_for(12)
                database = tmp_path / "receiver.db"
                wait_until(
                    lambda: (
                        rows(
                            database,
                            "SELECT count(*) FROM outbox WHERE state = 'pending'"
                            " AND attempts > 0 AND last_error IS NOT NULL",
                        )[0][0]
                        == 16
                    ),
                    "both dead destinations retried",
                )
            finally:
                redis_server.start()
            port = urlsplit(consumer_url).port
            assert port is not None
            with serve_in_thread(consumer.app, port=port):  # back, on the same address
                consumer.wait_for(12)
                wait_until(lambda: len(redis_server.stream_ids(stream)) >= 12, "redis")
                time.sleep(0.5)  # anything doubled would arrive now
    assert sorted(event_ids(consumer.received)) == sorted(expected)
    assert len(slack.received) == 12  # Slack messages are Block Kit, not events
    assert sorted(redis_server.stream_ids(stream)) == sorted(expected)


# -- Slack: 429 with Retry-After, then 500s ---------------------------------------------------


class Arrivals:
    """ASGI middleware: the moment each request reaches the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.times: list[float] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.times.append(time.monotonic())
        await self.app(scope, receive, send)


def test_slack_429_waits_for_retry_after_and_500s_are_retried(tmp_path: Path) -> None:
    slack = FakeSlack()
    slack.fail_next(429, retry_after=1.5)
    slack.fail_next(500, count=2)
    arrivals = Arrivals(slack.app)
    with serve_in_thread(arrivals) as slack_url:
        sink = {"name": "slack", "type": "slack", "url": slack.url(slack_url)}
        # The backoff alone would try again within 0.05 s; the 429 asks for 1.5 s.
        with receiver(tmp_path, sink, RECEIVER_RETRY_MAX="5") as server:
            assert post(server.url, 1).status_code == 200
            slack.wait_for(1)
            time.sleep(0.5)  # a second copy would arrive now
    assert len(slack.received) == 1
    assert slack.attempts == len(arrivals.times) == 4  # 429, 500, 500, ok
    assert arrivals.times[1] - arrivals.times[0] >= 1.5  # not before Retry-After
    # The 429 asked to wait: no failed attempt (a rate limit never makes a dead letter).
    assert rows(tmp_path / "receiver.db", "SELECT state, attempts, last_error FROM outbox") == [
        ("done", 3, None)
    ]


# -- the Runflow API: 429, 500, too slow -----------------------------------------------------


@pytest.fixture
def runflow() -> Iterator[tuple[FakeRunflow, str]]:
    fake = FakeRunflow(API_KEY)
    with serve_in_thread(fake.app) as url:
        yield fake, url


CLIENT_TIMEOUT = 0.5  # seconds; the "slow" answers below take longer


@contextlib.contextmanager
def in_process_receiver(
    tmp_path: Path, runflow_url: str, consumer_url: str, budget: float
) -> Iterator[str]:
    """The app behind real uvicorn in this process, so its HTTP client can have a timeout
    short enough for a test (a served process has 10 s)."""
    settings = make_settings(
        tmp_path,
        runflow_api_key=API_KEY,
        runflow_api_base=runflow_url,
        refetch_budget=budget,
        sinks=(SinkSpec(name="consumer", type="http", url=f"{consumer_url}/hooks"),),
        retry_base=0.05,
        retry_max=0.3,
        max_attempts=50,
        reconcile_interval=0,
    )
    http = httpx.AsyncClient(timeout=CLIENT_TIMEOUT, follow_redirects=False)
    with serve_in_thread(create_app(settings, http=http)) as url:
        yield url


def test_refetch_through_429_500_and_a_timeout_then_the_event_goes_out_once_complete(
    tmp_path: Path, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, runflow_url = runflow
    evaluation_id = callback(1)[0]
    fake.add(evaluation_id)
    fake.fail_next(429, retry_after=0.2)
    fake.fail_next(500)
    fake.fail_next(None, delay=CLIENT_TIMEOUT * 3)  # answers, but after the client gave up
    consumer = Recorder()
    with (
        serve_in_thread(consumer.app) as consumer_url,
        in_process_receiver(tmp_path, runflow_url, consumer_url, budget=30) as url,
    ):
        assert post(url, 1).status_code == 200
        consumer.wait_for(1)
        time.sleep(0.5)
    [event] = [json.loads(item.body) for item in consumer.received]
    assert event["id"] == event_id(evaluation_id, "evaluation.completed")
    assert event["data"]["refetched"] is True  # it waited for the refetch, within the budget
    assert event["data"]["action"]["improved_prompt"]
    gets = [r for r in fake.requests if r["path"] == f"/v1/evaluations/{evaluation_id}"]
    assert len(gets) == 4
    assert rows(  # the 500 and the timeout: a 429 is a wait, not an attempt
        tmp_path / "receiver.db", "SELECT refetch_state, refetch_attempts FROM evaluations"
    ) == [("done", 2)]


def test_past_the_refetch_budget_the_event_goes_out_without_embeds_and_only_once(
    tmp_path: Path, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, runflow_url = runflow
    evaluation_id = callback(2)[0]
    fake.add(evaluation_id)
    fake.fail_next(None, count=3, delay=CLIENT_TIMEOUT * 2)  # slow for longer than the budget
    consumer = Recorder()
    database = tmp_path / "receiver.db"
    with (
        serve_in_thread(consumer.app) as consumer_url,
        in_process_receiver(tmp_path, runflow_url, consumer_url, budget=1) as url,
    ):
        assert post(url, 2).status_code == 200
        consumer.wait_for(1)
        wait_until(
            lambda: rows(database, "SELECT refetch_state FROM evaluations") == [("done",)],
            "the refetch goes on after the event went out, and succeeds",
        )
        time.sleep(0.5)
    [event] = [json.loads(item.body) for item in consumer.received]
    assert event["data"]["refetched"] is False
    assert event["id"] == event_id(evaluation_id, "evaluation.completed")
    assert rows(database, "SELECT refetched, refetch_attempts FROM evaluations") == [(1, 3)]


# -- the database unwritable: a full disk, read-only files ------------------------------------


class Unwritable:
    """A way to make the database unwritable under a running server, and writable again."""

    def __init__(self, tmp_path: Path) -> None:
        self.database = tmp_path / "receiver.db"

    def break_(self, pid: int) -> None:
        raise NotImplementedError

    def heal(self, pid: int) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Whatever must be undone even when the test failed."""


class FileSizeLimit(Unwritable):
    """RLIMIT_FSIZE 0 on the server process (prlimit(2), no privilege needed for our own
    child): every write to a file is refused by the kernel with EFBIG, as on a full disk
    (Python ignores the SIGXFSZ that comes with it)."""

    def break_(self, pid: int) -> None:
        self.before = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, self.before[1]))

    def heal(self, pid: int) -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, self.before)


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


class FullTmpfs(Unwritable):
    """The database on a 4 MB tmpfs, filled up by another file: real ENOSPC. Needs the right
    to mount (root); skipped where that is missing."""

    def __init__(self, tmp_path: Path) -> None:
        self.mount = tmp_path / "disk"
        self.mount.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount(8) here")
        mounted = run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(self.mount))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self.database = self.mount / "receiver.db"
        self.filler = self.mount / "filler"

    def break_(self, pid: int) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    os.write(fd, bytes(4096))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    return  # the disk is full
        finally:
            os.close(fd)

    def heal(self, pid: int) -> None:
        self.filler.unlink()

    def cleanup(self) -> None:
        if run("umount", str(self.mount)).returncode != 0:
            run("umount", "-l", str(self.mount))


class Immutable(Unwritable):
    """`chattr +i` on the database and its WAL: the kernel refuses writes even through the
    server's open descriptors (EPERM), like a read-only filesystem, and root cannot override
    it. Needs CAP_LINUX_IMMUTABLE and a filesystem with the flag; skipped elsewhere."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        probe = tmp_path / "immutable-probe"
        probe.touch()
        if shutil.which("chattr") is None:
            pytest.skip("no chattr(1) here")
        tried = run("chattr", "+i", str(probe))
        run("chattr", "-i", str(probe))
        if tried.returncode != 0:
            pytest.skip(f"cannot make a file immutable here: {tried.stderr.strip()}")
        # Not the -shm file: SQLite writes it through mmap, and a refused page fault is SIGBUS.
        self.files = [str(self.database), f"{self.database}-wal"]

    def break_(self, pid: int) -> None:
        assert run("chattr", "+i", *self.files).returncode == 0

    def heal(self, pid: int) -> None:
        assert run("chattr", "-i", *self.files).returncode == 0

    def cleanup(self) -> None:
        run("chattr", "-i", *self.files)  # or the files could not be deleted


UNWRITABLE: dict[str, type[Unwritable]] = {
    "disk-full-rlimit": FileSizeLimit,
    "disk-full-tmpfs": FullTmpfs,
    "read-only-immutable": Immutable,
}


@sqlite_only
@pytest.mark.parametrize("kind", UNWRITABLE)
def test_an_unwritable_database_answers_503_never_a_false_200_and_recovers(
    tmp_path: Path, kind: str
) -> None:
    fault = UNWRITABLE[kind](tmp_path)
    consumer = Recorder()
    try:
        with serve_in_thread(consumer.app) as consumer_url:
            sink = {"name": "consumer", "type": "http", "url": f"{consumer_url}/hooks"}
            with receiver(tmp_path, sink, RECEIVER_DATABASE=str(fault.database)) as server:
                assert server.process is not None
                pid = server.process.pid
                assert post(server.url, 0).status_code == 200
                consumer.wait_for(1)
                wait_until(
                    lambda: rows(fault.database, "SELECT state FROM outbox") == [("done",)],
                    "the first forward finished",
                )
                fault.break_(pid)
                try:
                    refused = [post(server.url, n) for n in range(1, 6)]
                    ready = httpx.get(f"{server.url}/readyz", timeout=15)
                finally:
                    fault.heal(pid)
                assert [r.status_code for r in refused] == [503] * 5
                for response in refused:  # the real reason, not a follow-on error
                    assert response.json()["error"].startswith("the store cannot write: ")
                    assert "savepoint" not in response.json()["error"]
                assert ready.status_code == 503
                assert "cannot write" in ready.json()["error"]
                # Writable again: Runflow's retries and new callbacks are stored, with no restart.
                assert [post(server.url, n).status_code for n in range(1, 8)] == [200] * 7
                assert httpx.get(f"{server.url}/readyz").status_code == 200
                consumer.wait_for(8)
                time.sleep(0.3)
                assert server.stop() == 0
        stored = rows(fault.database, "SELECT evaluation_id, outcome FROM deliveries ORDER BY id")
        assert stored == [(callback(n)[0], "stored") for n in range(8)]
        assert rows(fault.database, "PRAGMA integrity_check") == [("ok",)]
    finally:
        fault.cleanup()
    assert sorted(event_ids(consumer.received)) == sorted(
        event_id(callback(n)[0], "evaluation.completed") for n in range(8)
    )


@pytest.mark.skipif(not POSTGRES, reason="a PostgreSQL read that hangs")
def test_a_read_of_the_worker_that_hangs_holds_the_worker_not_the_webhook(
    tmp_path: Path,
) -> None:
    """The worker's looks for due work (one per sink loop) read on the event loop: a read that
    hangs (PostgreSQL hung, a lock held, a connection waited for while it is down: 10 s a
    look) held every callback unanswered. Now they look from a thread, and a callback is
    answered (its ack writes no table the read waits on) while the read waits."""
    consumer = Recorder()
    with serve_in_thread(consumer.app) as consumer_url:
        sink = {"name": "consumer", "type": "http", "url": f"{consumer_url}/hooks"}
        with receiver(tmp_path, sink) as server:
            assert post(server.url, 0).status_code == 200
            consumer.wait_for(1)
            with psycopg.connect(server.env["RECEIVER_DATABASE"]) as holder:
                holder.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
                time.sleep(1)  # the sink loop looks again, and waits
                body = callback(1)[1]
                answered = httpx.post(
                    f"{server.url}/webhooks/runflow", content=body, headers=signed(body), timeout=8
                )
                holder.rollback()
            assert answered.status_code == 200
            consumer.wait_for(2)
            assert server.stop() == 0


@pytest.mark.skipif(not POSTGRES, reason="another PostgreSQL session's lock")
def test_applying_that_waits_on_a_lock_does_not_hold_the_acks(tmp_path: Path) -> None:
    """A replica stalled mid-transaction holds what another's apply chunk needs (a queue row,
    an evaluation, a rollup): the chunk waited the writer's lock_timeout (10 s), and the acks
    queued behind it on the same writer got 503s after their 5 s. Now applying gives up
    after a second and tries again later: every callback gets its 200 meanwhile, and is
    applied once the lock is gone."""
    with receiver(tmp_path) as server:
        assert post(server.url, 0).status_code == 200
        with psycopg.connect(server.env["RECEIVER_DATABASE"]) as holder:
            holder.execute("LOCK TABLE evaluations IN SHARE MODE")  # no apply can write
            answered = [post(server.url, n).status_code for n in range(1, 5)]
            holder.rollback()
        assert answered == [200] * 4
        with psycopg.connect(server.env["RECEIVER_DATABASE"], autocommit=True) as reader:
            count = "SELECT count(*) FROM evaluations"
            wait_until(lambda: reader.execute(count).fetchall() == [(5,)], "all applied")
        assert server.stop() == 0


def test_the_writer_survives_a_failure_of_its_own_and_fails_only_that_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong inside the one writer thread fails the batch it was committing
    (503 to those callers) instead of killing the thread, which would leave every later
    request waiting forever."""
    writer = Writer(str(tmp_path / "writer.db"))
    commit = Writer._commit
    calls = 0

    def broken_once(self: Writer, conn: sqlite3.Connection, batch: Any, durable: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("something unforeseen")
        commit(self, conn, batch, durable)

    monkeypatch.setattr(Writer, "_commit", broken_once)
    writer.start()
    try:
        with pytest.raises(StoreUnavailable, match="something unforeseen"):
            writer.submit(lambda conn: 1).result(timeout=5)
        assert writer.submit(lambda conn: 2).result(timeout=5) == 2
    finally:
        writer.close()


# -- SIGTERM under load -----------------------------------------------------------------------


async def half_sent(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A callback whose headers and first bytes are sent, the rest still to come: a request
    in flight."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in signed(body).items())
    writer.write(
        f"POST /webhooks/runflow HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{head}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body[:100]
    )
    await writer.drain()
    return reader, writer


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


class Load:
    """Senders posting callbacks until they see the server go away."""

    def __init__(self, url: str, numbers: range) -> None:
        self.url = url
        self.todo = list(reversed(numbers))
        self.acked: list[int] = []
        self.unanswered: list[int] = []
        self.statuses: list[int] = []

    async def run(self, senders: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as client:
            await asyncio.gather(*(self._sender(client) for _ in range(senders)))

    async def _sender(self, client: httpx.AsyncClient) -> None:
        while self.todo:
            number = self.todo.pop()
            body = callback(number)[1]
            try:
                response = await client.post(
                    "/webhooks/runflow", content=body, headers=signed(body)
                )
            except httpx.TransportError:  # refused, or closed under a request not yet read
                self.unanswered.append(number)
                return
            self.statuses.append(response.status_code)
            (self.acked if response.status_code == 200 else self.unanswered).append(number)
            await asyncio.sleep(0.01)


def test_sigterm_under_load_finishes_what_is_in_flight_and_leaves_nothing_half_done(
    tmp_path: Path,
) -> None:
    consumer = Recorder()
    consumer.fail_next(200, delay=3.0)  # the first delivery is in flight for 3 s
    database = tmp_path / "receiver.db"
    total = 100
    with serve_in_thread(consumer.app) as consumer_url:
        sink = {"name": "consumer", "type": "http", "url": f"{consumer_url}/hooks"}
        server = receiver(tmp_path, sink)
        server.start()
        assert server.process is not None
        assert post(server.url, 0).status_code == 200
        wait_until(lambda: consumer.attempts == 1, "the first delivery started")
        load = Load(server.url, range(2, total))

        async def scenario() -> tuple[bytes, bool, int]:
            assert server.process is not None
            sending = asyncio.create_task(load.run(senders=8))
            reader, writer = await half_sent(server.port, callback(1)[1])
            while len(load.acked) < 10:
                await asyncio.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            delivered_before = len(consumer.received)
            await sending
            async with asyncio.timeout(10):
                while not await refused(server.port):  # the listener closes first
                    await asyncio.sleep(0.05)
            alive = server.process.poll() is None  # held open by the request in flight
            writer.write(callback(1)[1][100:])
            await writer.drain()
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            return answer, alive, delivered_before

        answer, alive, delivered_before = asyncio.run(scenario())
        status = server.process.wait(timeout=30)
        log = server.log.read_text()
        # The request in flight got its 200, and the delivery in flight finished.
        assert alive
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b'"outcome":"stored"' in answer
        assert delivered_before == 0
        assert event_ids(consumer.received) == [event_id(callback(0)[0], "evaluation.completed")]
        assert status == 0, log[-3000:]
        assert "Traceback" not in log
        assert "worker round failed" not in log
        # Never a 5xx: each callback has a 200 or no answer at all (Runflow will send it again).
        assert set(load.statuses) == {200}
        assert load.unanswered or load.todo
        # Nothing half-done: every claimed forward was finished (none waits out a lease).
        soon = shift(now(), 60)
        assert rows(database, "SELECT count(*) FROM outbox WHERE state = 'done'") == [(1,)]
        leased = rows(
            database,
            "SELECT id, next_attempt_at FROM outbox WHERE state = 'pending'"
            " AND next_attempt_at > ?",
            soon,
        )
        assert leased == []
        acked = {0, 1, *load.acked}
        stored = {row[0] for row in rows(database, "SELECT evaluation_id FROM deliveries")}
        assert {callback(n)[0] for n in acked} <= stored
        # Back up: Runflow sends what got no answer; each verdict goes out exactly once.
        with server:
            for number in sorted(set(range(total)) - acked):
                assert post(server.url, number).status_code == 200
            consumer.wait_for(total, timeout=30)
            time.sleep(0.5)
            assert server.stop() == 0
    assert sorted(event_ids(consumer.received)) == sorted(
        event_id(callback(n)[0], "evaluation.completed") for n in range(total)
    )
    assert rows(database, "SELECT state, count(*) FROM outbox GROUP BY state") == [("done", total)]
