"""Crash safety, for real: `receiver serve` killed with SIGKILL at random moments while a load
generator posts signed callbacks (and sends some again, as Runflow retries), restarted on the
same database each time. Afterwards every callback that got a 200 is stored, every stored
verdict is in the Redis stream, and no event id is in it twice.

The kill moments come from a seeded random generator: RECEIVER_CRASH_SEED=<n> replays a run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from receiver.events import build_event, event_id
from receiver.signing import sign
from receiver.sinks import SinkError
from receiver.sinks._queues import DEDUPE_SECONDS
from receiver.sinks.redis import RedisSink
from receiver.sinkspec import SinkSpec
from receiver.times import format_time

from .helpers import SECRET_A, fixture
from .servers import ReceiverProcess
from .services import RedisService

SEED = int(os.environ.get("RECEIVER_CRASH_SEED", "20261123"))
CALLBACKS = 300  # unique evaluations
CONNECTIONS = 16  # concurrent senders
PACE = 0.4  # seconds a sender waits between callbacks (about 40 callbacks a second in all)
RESEND = 0.15  # chance that a sender also sends an acknowledged callback again
KILLS = 6
RUN_LIMIT = 40.0  # seconds for the load and the kills; the test fails if it is not done by then
SETTLE_LIMIT = 20.0  # seconds for the worker to drain the outbox afterwards


def callback(number: int) -> tuple[str, bytes]:
    evaluation_id = f"0193a7c2-0000-7000-8000-{number:012d}"
    body = json.loads(fixture("evaluation-completed-envelope.json"))
    body.update(evaluation_id=evaluation_id, client_ref=f"crash-{number}")
    return evaluation_id, json.dumps(body).encode()


@dataclass
class Load:
    """What the senders saw."""

    acked: set[str] = field(default_factory=set)  # evaluation ids that got a 200
    statuses: Counter[int] = field(default_factory=Counter)
    unanswered: int = 0  # refused, reset or cut off: the server was down or died mid-request
    resent: int = 0  # acknowledged callbacks sent again


async def send(client: httpx.AsyncClient, load: Load, item: tuple[str, bytes], end: float) -> bool:
    """Post until a 200, like Runflow retrying (bounded by `end`)."""
    evaluation_id, body = item
    headers = {"content-type": "application/json", "runflow-signature": sign(body, SECRET_A)}
    while time.monotonic() < end:
        try:
            response = await client.post("/webhooks/runflow", content=body, headers=headers)
        except httpx.TransportError:
            load.unanswered += 1
            await asyncio.sleep(0.05)
            continue
        load.statuses[response.status_code] += 1
        if response.status_code == 200:
            load.acked.add(evaluation_id)
            return True
        await asyncio.sleep(0.05)
    return False


async def generate(url: str, killing: asyncio.Event, end: float) -> Load:
    """CONNECTIONS senders: every callback once (paced), some again; once all are sent, they
    keep sending acknowledged ones again until the killer is done, so every kill hits load."""
    load = Load()
    fresh = [callback(n) for n in range(CALLBACKS)]
    fresh.reverse()
    done: list[tuple[str, bytes]] = []
    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, timeout=5.0, limits=limits) as client:

        async def sender(number: int) -> None:
            rng = random.Random(SEED * 100 + number)
            while time.monotonic() < end:
                if fresh:
                    item = fresh.pop()
                    if await send(client, load, item, end):
                        done.append(item)
                elif killing.is_set() and done:
                    load.resent += 1
                    await send(client, load, rng.choice(done), end)
                elif not killing.is_set():
                    return
                if done and rng.random() < RESEND:
                    load.resent += 1
                    await send(client, load, rng.choice(done), end)
                await asyncio.sleep(PACE * rng.uniform(0.5, 1.5))

        await asyncio.gather(*(sender(n) for n in range(CONNECTIONS)))
    return load


def after_a_crash(database: Path) -> None:
    """While the server is down: the database is intact, and the leases the killed process
    held (300 s) have run out, as they would have by the time a supervisor restarts it after
    a while. Nothing else runs on the file now, so this is the only writer."""
    conn = sqlite3.connect(database)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        now = format_time(datetime.now(UTC))
        with conn:
            conn.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE state = 'pending'"
                " AND next_attempt_at > ?",
                (now, now),
            )
    finally:
        conn.close()


async def kill_at_random(
    server: ReceiverProcess, killing: asyncio.Event, rng: random.Random
) -> int:
    kills = 0
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.2, 1.2))
            assert server.process is not None
            server.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(server.process.wait, 10)
            kills += 1
            after_a_crash(server.workdir / "receiver.db")
            await asyncio.to_thread(server.start)
    finally:
        killing.clear()
    return kills


async def crash_run(server: ReceiverProcess) -> tuple[Load, int]:
    killing = asyncio.Event()
    killing.set()
    end = time.monotonic() + RUN_LIMIT
    rng = random.Random(SEED)
    kills, load = await asyncio.gather(
        kill_at_random(server, killing, rng), generate(server.url, killing, end)
    )
    return load, kills


def rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(database)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_kill_9_under_load_loses_nothing_and_forwards_each_verdict_once(
    tmp_path: Path, redis_server: RedisService, stream: str
) -> None:
    config = tmp_path / "receiver.toml"
    config.write_text(
        f'[[sinks]]\nname = "pipeline"\ntype = "redis"\nurl = "{redis_server.url}"\n'
        f'stream = "{stream}"\n'
    )
    database = tmp_path / "receiver.db"
    server = ReceiverProcess(
        tmp_path,
        RECEIVER_CONFIG=str(config),
        RECEIVER_RETRY_BASE="0.05",
        RECEIVER_RETRY_MAX="0.5",
        RECEIVER_MAX_ATTEMPTS="1000",
    )
    with server:
        load, kills = asyncio.run(crash_run(server))
        verdicts = {
            row[0]
            for row in rows(database, "SELECT id FROM evaluations WHERE status = 'completed'")
        }
        expected = {event_id(evaluation_id, "evaluation.completed") for evaluation_id in verdicts}
        deadline = time.monotonic() + SETTLE_LIMIT
        while set(redis_server.stream_ids(stream)) != expected or rows(
            database, "SELECT 1 FROM outbox WHERE state != 'done'"
        ):
            assert time.monotonic() < deadline, rows(
                database, "SELECT state, count(*), max(last_error) FROM outbox GROUP BY 1"
            )
            time.sleep(0.1)
        time.sleep(0.5)  # a doubled forward would arrive now
        assert server.stop() == 0
    seen = redis_server.stream_ids(stream)
    summary = (
        f"seed {SEED}: {kills} kills, {len(load.acked)} acknowledged, {load.resent} sent again,"
        f" {load.unanswered} unanswered, statuses {dict(load.statuses)}"
    )
    assert kills == KILLS, summary
    assert load.unanswered > 0, summary  # the kills did cut requests off
    assert set(load.statuses) == {200}, summary  # never a 4xx or 5xx, only no answer at all
    # Every callback eventually got its 200, and every 200 is stored, byte for byte.
    assert load.acked == {callback(n)[0] for n in range(CALLBACKS)}, summary
    stored = {row[0] for row in rows(database, "SELECT evaluation_id FROM deliveries")}
    assert load.acked <= stored
    assert load.acked <= verdicts
    bodies = dict(rows(database, "SELECT evaluation_id, body FROM deliveries"))
    assert all(
        bodies[evaluation_id] == callback(int(evaluation_id[-12:]))[1]
        for evaluation_id in load.acked
    )
    # Every stored verdict reached Redis, exactly once.
    duplicates = [event for event, times in Counter(seen).items() if times > 1]
    assert duplicates == [], summary
    assert set(seen) == expected
    assert rows(database, "SELECT state, count(*) FROM outbox GROUP BY state") == [
        ("done", len(verdicts))
    ]
    assert rows(database, "PRAGMA integrity_check") == [("ok",)]


def make_event(number: int) -> dict[str, Any]:
    fields = json.loads(fixture("get-evaluation-embedded.json"))
    fields["id"] = f"0193a7c2-0000-7000-8000-{number:012d}"
    return build_event(
        fields, "evaluation.completed", refetched=True, received_at="2026-11-20T09:15:00Z"
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_redis_sink_adds_an_event_id_once_and_never_loses_one(
    redis_server: RedisService, stream: str
) -> None:
    """The redelivery a crash between XADD and `done` causes is not added again; an XADD that
    fails leaves no dedupe mark behind, so the retry still adds it."""
    first, second = make_event(1), make_event(2)
    sink = RedisSink(
        SinkSpec(
            name="pipeline",
            type="redis",
            url=redis_server.url,
            options={"stream": stream, "maxlen": 1000},
        )
    )
    client = redis.Redis.from_url(redis_server.url)
    await sink.start()
    try:
        assert await sink.deliver([first]) == [None]
        assert await sink.deliver([first, first]) == [None, None]  # redelivered: acknowledged
        client.set(stream, "not a stream")  # XADD fails with WRONGTYPE
        [failed] = await sink.deliver([second])
        assert isinstance(failed, SinkError)
        assert "WRONGTYPE" in str(failed)
        client.delete(stream)
        assert await sink.deliver([second, first]) == [None, None]
        ttl = client.ttl(f"{stream}:dedupe:{second['id']}")
    finally:
        await sink.close()
        client.close()
    assert redis_server.stream_ids(stream) == [second["id"]]  # `first` went with the delete
    assert 0 < ttl <= DEDUPE_SECONDS
