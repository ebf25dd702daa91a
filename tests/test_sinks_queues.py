"""The queue sinks (Redis, RabbitMQ, NATS) against real servers: what arrives and how it is
addressed, whole batches, JetStream dedupe, and one sink object surviving a server outage.

Every test reads the messages back with the server's own client library, the way a consumer
would; each test uses its own stream, exchange or subject, so one server serves the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import httpx
import nats
import pytest
from anyio import to_thread
from redis.asyncio import Redis

from receiver.events import build_event
from receiver.sinks import Sink, SinkError, build_sink
from receiver.sinks._queues import DEDUPE_SECONDS, reason, where
from receiver.sinks.nats import NatsSink, stream_name
from receiver.sinkspec import SinkSpec

from .helpers import fixture
from .servers import free_port
from .services import Service

pytestmark = pytest.mark.anyio

EVALUATION: dict[str, Any] = json.loads(fixture("get-evaluation-embedded.json"))
KINDS = ("redis", "rabbitmq", "nats")
# What tells an AMQP or NATS consumer the body is a whole CloudEvent (structured mode), as the
# CloudEvents bindings say; without it a NATS message with headers reads as binary mode.
STRUCTURED = "application/cloudevents+json; charset=utf-8"
READ_TIMEOUT = 15.0  # seconds a read-back may wait for messages that should already be there
RECONNECT_TIMEOUT = 60.0  # seconds a restarted server and a reconnecting client may take


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_event(verdict: str = "completed", evaluation_id: str | None = None) -> dict[str, Any]:
    fields = {**EVALUATION, "id": evaluation_id or EVALUATION["id"]}
    return build_event(
        fields, f"evaluation.{verdict}", refetched=True, received_at="2026-11-20T09:15:00Z"
    )


@dataclass(frozen=True)
class Received:
    """One message as a consumer sees it."""

    key: str  # redis field `type` · AMQP routing key · NATS subject
    msg_id: str  # redis field `id` · AMQP message_id · `Nats-Msg-Id` header
    event: dict[str, Any]  # the body, parsed
    meta: dict[str, Any]  # transport details worth checking


class Harness:
    """A unique destination on one server, how to point a sink at it, and how to read it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.unique = uuid.uuid4().hex[:12]

    @property
    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def spec(self) -> SinkSpec:
        raise NotImplementedError

    def key(self, event: dict[str, Any]) -> str:
        return str(event["type"])

    async def prepare(self) -> None:
        """Whatever a consumer sets up before events are published."""

    async def read(self, count: int) -> list[Received]:
        """Everything at the destination; waits (bounded) if fewer than `count` are visible."""
        raise NotImplementedError


class RedisHarness(Harness):
    @property
    def stream(self) -> str:
        return f"test:{self.unique}"

    @property
    def meta(self) -> dict[str, Any]:
        return {"fields": ["event", "id", "type"]}

    def spec(self) -> SinkSpec:
        options = {"stream": self.stream, "maxlen": 100000}
        return SinkSpec(name="pipeline", type="redis", url=self.service.url, options=options)

    async def read(self, count: int) -> list[Received]:
        client = Redis.from_url(self.service.url, decode_responses=True)
        try:
            # decode_responses: ids and fields come back as str
            entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(self.stream))
        finally:
            await client.aclose()
        return [
            Received(f["type"], f["id"], json.loads(f["event"]), {"fields": sorted(f)})
            for _, f in entries
        ]


class RabbitMQHarness(Harness):
    @property
    def meta(self) -> dict[str, Any]:
        return {"content_type": STRUCTURED, "delivery_mode": aio_pika.DeliveryMode.PERSISTENT}

    def spec(self) -> SinkSpec:
        options = {"exchange": f"test.{self.unique}"}
        return SinkSpec(name="events", type="rabbitmq", url=self.service.url, options=options)

    async def prepare(self) -> None:
        # A durable queue bound with `#` gets every routing key and outlives a broker restart.
        async with await aio_pika.connect(self.service.url) as connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                f"test.{self.unique}", aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(f"test-{self.unique}", durable=True)
            await queue.bind(exchange, "#")

    async def read(self, count: int) -> list[Received]:
        received: list[Received] = []
        async with await aio_pika.connect(self.service.url) as connection:
            queue = await (await connection.channel()).get_queue(f"test-{self.unique}")
            async with asyncio.timeout(READ_TIMEOUT):
                while True:
                    message = await queue.get(no_ack=True, fail=False)
                    if message is None:
                        if len(received) >= count:
                            return received
                        await asyncio.sleep(0.05)
                        continue
                    meta = {
                        "content_type": message.content_type,
                        "delivery_mode": message.delivery_mode,
                    }
                    event = json.loads(message.body)
                    received.append(
                        Received(message.routing_key or "", message.message_id or "", event, meta)
                    )


class NatsHarness(Harness):
    def __init__(self, service: Service, stream: str | None = None) -> None:
        super().__init__(service)
        self.subject = f"test.{self.unique}"
        self.stream_option = stream
        self.stream = stream or f"TEST_{self.unique.upper()}"  # derived: dots → _, upper

    @property
    def meta(self) -> dict[str, Any]:
        return {"stream": self.stream, "content_type": STRUCTURED}

    def spec(self) -> SinkSpec:
        options = {"subject": self.subject, "stream": self.stream_option}
        return SinkSpec(name="events", type="nats", url=self.service.url, options=options)

    def key(self, event: dict[str, Any]) -> str:
        return f"{self.subject}.{event['type'].rsplit('.', 1)[-1]}"

    async def read(self, count: int) -> list[Received]:
        client = await nats.connect(self.service.url)
        try:
            js = client.jetstream()
            stored = (await js.stream_info(self.stream)).state.messages
            assert stored >= count
            subscription = await js.pull_subscribe(f"{self.subject}.>", stream=self.stream)
            messages: list[Any] = []
            async with asyncio.timeout(READ_TIMEOUT):
                while len(messages) < stored:
                    messages += await subscription.fetch(stored - len(messages), timeout=5)
            await subscription.unsubscribe()
        finally:
            await client.close()
        received = []
        for m in messages:
            headers = m.headers or {}
            meta = {"stream": m.metadata.stream, "content_type": headers.get("Content-Type")}
            received.append(
                Received(m.subject, headers.get("Nats-Msg-Id", ""), json.loads(m.data), meta)
            )
        return received


HARNESSES = {"redis": RedisHarness, "rabbitmq": RabbitMQHarness, "nats": NatsHarness}


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest) -> Harness:
    service: Service = request.getfixturevalue(f"{request.param}_server")
    return HARNESSES[request.param](service)


@contextlib.asynccontextmanager
async def running_sink(harness: Harness) -> AsyncIterator[Sink]:
    await harness.prepare()
    async with httpx.AsyncClient() as http:
        sink = build_sink(harness.spec(), http)  # through the factory, as the worker does
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


@contextlib.asynccontextmanager
async def outage(service: Service) -> AsyncIterator[None]:
    """The server down for the body, back on the same port and data afterwards. Stopping in a
    thread keeps the event loop running, so clients see the disconnect as they would live."""
    await to_thread.run_sync(service.stop)
    try:
        yield
    finally:
        await to_thread.run_sync(service.start)


def assert_arrived(harness: Harness, got: Received, sent: dict[str, Any]) -> None:
    assert got == Received(harness.key(sent), sent["id"], sent, harness.meta)


@pytest.mark.parametrize("verdict", ["completed", "failed"])
async def test_event_arrives_with_documented_fields(harness: Harness, verdict: str) -> None:
    event = make_event(verdict)
    async with running_sink(harness) as sink:
        assert await sink.deliver([event]) == [None]
    [got] = await harness.read(1)
    assert_arrived(harness, got, event)
    assert got.key.endswith(verdict)


async def test_batch_of_200_arrives_complete_from_one_deliver(harness: Harness) -> None:
    events = [make_event("failed" if i % 3 else "completed", f"eval-{i:03d}") for i in range(200)]
    async with running_sink(harness) as sink:
        assert await sink.deliver([]) == []
        assert await sink.deliver(events) == [None] * 200
    received = await harness.read(200)
    assert Counter(r.msg_id for r in received) == Counter(e["id"] for e in events)
    by_id = {e["id"]: e for e in events}
    for got in received:
        assert_arrived(harness, got, by_id[got.msg_id])


async def test_outage_gives_sink_errors_and_the_same_sink_recovers(harness: Harness) -> None:
    before, during, after = (make_event(evaluation_id=f"eval-{n}") for n in range(3))
    async with running_sink(harness) as sink:
        assert await sink.deliver([before]) == [None]
        async with outage(harness.service):
            results = await sink.deliver([during, during])
            assert len(results) == 2
            assert all(isinstance(r, SinkError) and str(r) for r in results), results
        async with asyncio.timeout(RECONNECT_TIMEOUT):
            while await sink.deliver([after]) != [None]:
                await asyncio.sleep(0.2)
    ids = {r.msg_id for r in await harness.read(2)}
    assert ids == {before["id"], after["id"]}  # the restart kept the data; nothing replayed


@pytest.mark.parametrize("custom", [False, True], ids=["derived-name", "configured-name"])
async def test_nats_creates_its_stream_over_the_subject(nats_server: Service, custom: bool) -> None:
    harness = NatsHarness(nats_server, f"CUSTOM_{uuid.uuid4().hex[:8]}" if custom else None)
    async with running_sink(harness):
        pass
    client = await nats.connect(nats_server.url)
    try:
        info = await client.jetstream().stream_info(harness.stream)  # NotFoundError if absent
    finally:
        await client.close()
    assert info.config.subjects == [f"{harness.subject}.>"]
    # it drops a second copy for as long as Redis does (JetStream's default is 2 minutes;
    # a crashed worker's events come again only after their lease, 5 minutes)
    assert info.config.duplicate_window == DEDUPE_SECONDS


async def test_nats_makes_its_stream_again_when_the_server_lost_it(nats_server: Service) -> None:
    """A server restarted without its JetStream data: the publish finds no stream; the sink
    makes it again and the event arrives, instead of every forward going dead."""
    harness = NatsHarness(nats_server)
    first, second = make_event(evaluation_id="eval-1"), make_event(evaluation_id="eval-2")
    async with running_sink(harness) as sink:
        assert await sink.deliver([first]) == [None]
        client = await nats.connect(nats_server.url)
        try:
            await client.jetstream().delete_stream(harness.stream)
        finally:
            await client.close()
        assert await sink.deliver([second, second]) == [None, None]
    [got] = await harness.read(1)
    assert_arrived(harness, got, second)


@pytest.mark.parametrize(
    ("subject", "stream"),
    [
        ("runflow.evaluations", "RUNFLOW_EVALUATIONS"),
        ("acme.qa.runflow-events", "ACME_QA_RUNFLOW-EVENTS"),
    ],
)
def test_nats_stream_name_derived_from_subject(subject: str, stream: str) -> None:
    assert stream_name(subject) == stream


async def test_nats_dedupes_the_same_event_by_msg_id(nats_server: Service) -> None:
    harness = NatsHarness(nats_server)
    event = make_event()
    async with running_sink(harness) as sink:
        assert await sink.deliver([event]) == [None]
        assert await sink.deliver([event, event]) == [None, None]  # a retry: acked as duplicate
    [got] = await harness.read(1)
    assert_arrived(harness, got, event)


async def test_rabbitmq_unroutable_event_is_a_sink_error(rabbitmq_server: Service) -> None:
    harness = RabbitMQHarness(rabbitmq_server)  # no prepare(): no queue is bound
    async with httpx.AsyncClient() as http:
        sink = build_sink(harness.spec(), http)
    await sink.start()
    try:
        [result] = await sink.deliver([make_event()])
    finally:
        await sink.close()
    assert isinstance(result, SinkError)
    assert "no queue bound" in str(result)


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("redis", "redis://:s3cret@127.0.0.1:{port}/0"),
        ("rabbitmq", "amqp://guest:s3cret@127.0.0.1:{port}/"),
        ("nats", "nats://user:s3cret@127.0.0.1:{port}"),
    ],
)
async def test_start_fails_with_one_line_without_the_password(kind: str, url: str) -> None:
    spec = SinkSpec(name="down", type=kind, url=url.format(port=free_port()))
    async with httpx.AsyncClient() as http:
        sink = build_sink(spec, http)
    if isinstance(sink, NatsSink):
        sink.connect_timeout = 1.0  # NATS keeps trying until then; the others fail at once
    with pytest.raises(SinkError, match="is unreachable") as caught:
        await sink.start()
    assert "s3cret" not in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "amqp://guest:pa%40ss@mq.internal:5672/vhost?heartbeat=30",
            "amqp://mq.internal:5672/vhost",
        ),
        ("redis://:secret@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("nats://token@[::1]:4222", "nats://[::1]:4222"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_where_hides_credentials_and_query(url: str, shown: str) -> None:
    assert where(url) == shown


def test_reason_blanks_an_echoed_password() -> None:
    url = "amqp://guest:pa%40ss@127.0.0.1/"
    text = reason(RuntimeError("login pa@ss refused for pa%40ss"), url)
    assert text == "RuntimeError: login *** refused for ***"
