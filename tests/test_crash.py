"""Crash safety, for real: `receiver serve` killed with SIGKILL at random moments while a load
generator posts signed callbacks (and sends some again, as Runflow retries), restarted on the
same database each time. Afterwards every callback that got a 200 is stored, every stored
verdict is in the Redis stream, and no event id is in it twice. And `receiver worker` killed
mid-batch while it forwards to Redis, NATS JetStream and RabbitMQ: every verdict arrives at
each, under the id a consumer dedupes on.

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
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import httpx
import nats
import nats.js.errors
import pytest
import redis
import redis.asyncio

from receiver.events import CONTENT_TYPE, build_event, event_id
from receiver.signing import sign
from receiver.sinks import SinkError
from receiver.sinks._queues import DEDUPE_SECONDS
from receiver.sinks.redis import RedisSink
from receiver.sinkspec import SinkSpec
from receiver.times import format_time

from .database import connect
from .helpers import SECRET_A, fixture
from .servers import ReceiverProcess, WorkerProcess
from .services import NatsService, RabbitMQService, RedisService

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


# `receiver worker` killed mid-batch, against every queue sink.

QUEUED = 1200  # verdicts waiting in the outbox: six batches per sink
WORKER_LIVES = 12  # at most this many workers are killed before the last one drains the rest
CAUGHT = 2  # kills that must land between a send and its record (else the test proves nothing)
LEASE = "2"  # seconds: a killed worker's rows are due again soon after (RECEIVER_LEASE)


@dataclass
class Queues:
    """A unique destination on each queue server, read the way a consumer reads it."""

    redis: RedisService
    stream: str
    nats: NatsService
    rabbitmq: RabbitMQService
    unique: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def subject(self) -> str:
        return f"crash.{self.unique}"

    @property
    def nats_stream(self) -> str:
        return f"CRASH_{self.unique.upper()}"  # the name the sink derives from the subject

    @property
    def exchange(self) -> str:
        return f"crash.{self.unique}"

    def config(self) -> str:
        return (
            f'[[sinks]]\nname = "redis"\ntype = "redis"\nurl = "{self.redis.url}"\n'
            f'stream = "{self.stream}"\n\n'
            f'[[sinks]]\nname = "nats"\ntype = "nats"\nurl = "{self.nats.url}"\n'
            f'subject = "{self.subject}"\n\n'
            f'[[sinks]]\nname = "rabbitmq"\ntype = "rabbitmq"\nurl = "{self.rabbitmq.url}"\n'
            f'exchange = "{self.exchange}"\n'
        )

    async def bind(self) -> None:
        """The consumer's durable queue, bound before anything is published."""
        async with await aio_pika.connect(self.rabbitmq.url) as connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(self.exchange, durable=True)
            await queue.bind(exchange, "#")

    async def stored(self) -> dict[str, int]:
        """Messages at each destination now, duplicates included (Redis and JetStream drop
        theirs, so there these are the distinct events that went out)."""
        client = redis.asyncio.Redis.from_url(self.redis.url)
        try:
            in_redis = await client.xlen(self.stream)
        finally:
            await client.aclose()
        nc = await nats.connect(self.nats.url)
        try:
            try:
                in_nats = (await nc.jetstream().stream_info(self.nats_stream)).state.messages
            except nats.js.errors.NotFoundError:  # the first worker has not made it yet
                in_nats = 0
        finally:
            await nc.close()
        async with await aio_pika.connect(self.rabbitmq.url) as connection:
            queue = await (await connection.channel()).declare_queue(self.exchange, passive=True)
            in_rabbitmq = queue.declaration_result.message_count or 0
        return {"redis": in_redis, "nats": in_nats, "rabbitmq": in_rabbitmq}

    async def consume(self) -> dict[str, list[tuple[str, dict[str, Any], str | None]]]:
        """(dedupe key, event, content type) of every message at each destination."""
        client = redis.asyncio.Redis.from_url(self.redis.url)
        try:
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(self.stream))
        finally:
            await client.aclose()
        in_redis = [(f[b"id"].decode(), json.loads(f[b"event"]), None) for _, f in entries]
        nc = await nats.connect(self.nats.url)
        try:
            js = nc.jetstream()
            count = (await js.stream_info(self.nats_stream)).state.messages
            subscription = await js.pull_subscribe(f"{self.subject}.>", stream=self.nats_stream)
            messages: list[Any] = []
            while len(messages) < count:  # acked as read: a consumer holds 1000 unacked
                fetched = await subscription.fetch(min(count - len(messages), 200), timeout=5)
                for message in fetched:
                    await message.ack()
                messages += fetched
            await subscription.unsubscribe()
            await js.delete_stream(self.nats_stream)
        finally:
            await nc.close()
        in_nats = [
            (m.headers["Nats-Msg-Id"], json.loads(m.data), m.headers.get("Content-Type"))
            for m in messages
        ]
        in_rabbitmq = []
        async with await aio_pika.connect(self.rabbitmq.url) as connection:
            channel = await connection.channel()
            queue = await channel.get_queue(self.exchange)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                event = json.loads(message.body)
                in_rabbitmq.append((message.message_id or "", event, message.content_type))
            await queue.delete()
            await channel.exchange_delete(self.exchange)
        return {"redis": in_redis, "nats": in_nats, "rabbitmq": in_rabbitmq}


async def post_all(url: str, numbers: range) -> None:
    """Every callback once, acknowledged (CONNECTIONS at a time)."""
    end, load = time.monotonic() + RUN_LIMIT, Load()
    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        gate = asyncio.Semaphore(CONNECTIONS)

        async def post(number: int) -> bool:
            async with gate:
                return await send(client, load, callback(number), end)

        assert all(await asyncio.gather(*(post(n) for n in numbers))), load


def recorded(database: str) -> dict[str, int]:
    """Forwards each sink's outbox rows say went out."""
    conn = connect(database)
    try:
        found = conn.execute(
            "SELECT sink, count(*) FROM outbox WHERE state = 'done' GROUP BY sink"
        ).fetchall()
    finally:
        conn.close()
    return {"redis": 0, "nats": 0, "rabbitmq": 0, **{sink: count for sink, count in found}}


class Probe:
    """Cheap looks at the Redis stream and the outbox, over connections kept open: reading
    every queue server takes long enough on a loaded machine for a worker to finish the
    batches in reach meanwhile, so that kills timed from it never landed mid-batch."""

    def __init__(self, server: RedisService, stream: str, database: str) -> None:
        self.stream = stream
        self.redis = redis.Redis.from_url(server.url)
        self.outbox = connect(database)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.close()
        self.outbox.close()

    def progress(self) -> tuple[int, list[tuple[str, int]]]:
        """Entries in the stream, and forwards recorded as sent by sink."""
        rows = self.outbox.execute(
            "SELECT sink, count(*) FROM outbox WHERE state = 'done' GROUP BY sink ORDER BY sink"
        ).fetchall()
        return self.redis.xlen(self.stream), rows

    def window(self, until: float) -> None:
        """Return once the stream holds events the outbox has not recorded, or at `until`."""
        while time.monotonic() < until:
            entries, rows = self.progress()
            if entries > dict(rows).get("redis", 0):
                return


def test_a_worker_killed_mid_batch_forwards_every_verdict_to_every_queue_with_its_id(
    tmp_path: Path,
    redis_server: RedisService,
    stream: str,
    nats_server: NatsService,
    rabbitmq_server: RabbitMQService,
) -> None:
    """`receiver worker` SIGKILLed again and again while it drains a backlog into Redis,
    JetStream and RabbitMQ, each kill checked to land between events going out and the outbox
    recording them (some must). Every verdict reaches every queue with its event id where the
    sink documents it; Redis and JetStream keep one copy (their dedupe keys), and the copies
    RabbitMQ keeps (it has no dedupe) carry the same message_id, for the consumer to drop."""
    queues = Queues(redis_server, stream, nats_server, rabbitmq_server)
    asyncio.run(queues.bind())
    config = tmp_path / "receiver.toml"
    config.write_text(queues.config())
    env = {"RECEIVER_CONFIG": str(config), "RECEIVER_LEASE": LEASE, "RECEIVER_WORKER": "false"}
    server = ReceiverProcess(tmp_path, **env)
    database = server.env["RECEIVER_DATABASE"]
    with server:
        asyncio.run(post_all(server.url, range(QUEUED)))
    expected = {event_id(callback(n)[0], "evaluation.completed") for n in range(QUEUED)}
    rng = random.Random(SEED)
    kills = caught = 0
    with Probe(redis_server, stream, database) as probe:
        for life in range(WORKER_LIVES):
            if caught >= CAUGHT or set(recorded(database).values()) == {QUEUED}:
                break
            (tmp_path / f"worker-{life}").mkdir()
            worker = WorkerProcess(tmp_path / f"worker-{life}", server.env).start()
            before, deadline = probe.progress(), time.monotonic() + SETTLE_LIMIT
            while probe.progress() == before:  # it is at work: kill it in a while
                assert time.monotonic() < deadline, worker.log.read_text()
            if life % 2:  # a moment of the seed's choosing
                time.sleep(rng.uniform(0, 0.05))
            else:  # the moment Redis has a batch the outbox does not record yet, if one comes
                probe.window(time.monotonic() + rng.uniform(0.05, 0.5))
            worker.stop(signal.SIGKILL)
            kills += 1
            sent, done = asyncio.run(queues.stored()), recorded(database)
            caught += any(sent[sink] > done[sink] for sink in ("redis", "nats"))
    assert caught >= CAUGHT, f"{kills} kills, none between a send and its record"
    (tmp_path / "worker-last").mkdir()
    with WorkerProcess(tmp_path / "worker-last", server.env):
        deadline = time.monotonic() + SETTLE_LIMIT + 2 * float(LEASE)
        while set(recorded(database).values()) != {QUEUED}:
            assert time.monotonic() < deadline, recorded(database)
            time.sleep(0.1)
    got = asyncio.run(queues.consume())
    summary = (
        f"seed {SEED}: {kills} kills, {caught} between a send and its record;"
        f" RabbitMQ kept {len(got['rabbitmq']) - QUEUED} second copies"
    )
    for sink in ("redis", "nats"):
        keys = [key for key, _, _ in got[sink]]
        assert len(keys) == len(set(keys)) == QUEUED, (sink, summary)  # deduped by the sink
    for sink, messages in got.items():
        assert {key for key, _, _ in messages} == expected, (sink, summary)  # each, no other
        assert all(key == event["id"] for key, event, _ in messages), (sink, summary)
    assert {kind for _, _, kind in got["nats"] + got["rabbitmq"]} == {CONTENT_TYPE}
    conn = connect(database)
    try:
        states = conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
    finally:
        conn.close()
    assert [tuple(row) for row in states] == [("done", 3 * QUEUED)]
