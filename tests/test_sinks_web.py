"""Slack, Discord and http sinks against the fakes served for real: what arrives, and how
each answer maps to delivered / retry / dead."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from receiver.fakes.chat import FakeDiscord, FakeSlack
from receiver.fakes.common import FakeEndpoint
from receiver.fakes.recorder import Recorder
from receiver.messages import discord_message, slack_message
from receiver.sinks import Deferred, SinkError, build_sink
from receiver.sinks.web import parse_retry_after, response_error
from receiver.sinkspec import SinkSpec

from .sinkhelpers import closed_port, deliver, make_event, served

NOW = datetime(2026, 11, 20, 9, 15, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def slack_server() -> Iterator[tuple[FakeSlack, str]]:
    yield from served(FakeSlack())


@pytest.fixture(scope="module")
def discord_server() -> Iterator[tuple[FakeDiscord, str]]:
    yield from served(FakeDiscord())


@pytest.fixture(scope="module")
def recorder_server() -> Iterator[tuple[Recorder, str]]:
    yield from served(Recorder())


@pytest.fixture
def slack(slack_server: tuple[FakeSlack, str]) -> FakeSlack:
    slack_server[0].reset()
    slack_server[0].reject_images = False
    return slack_server[0]


@pytest.fixture
def discord(discord_server: tuple[FakeDiscord, str]) -> FakeDiscord:
    discord_server[0].reset()
    return discord_server[0]


@pytest.fixture
def recorder(recorder_server: tuple[Recorder, str]) -> Recorder:
    recorder_server[0].reset()
    return recorder_server[0]


@pytest.fixture
def urls(
    slack_server: tuple[FakeSlack, str],
    discord_server: tuple[FakeDiscord, str],
    recorder_server: tuple[Recorder, str],
) -> dict[str, str]:
    return {
        "slack": slack_server[0].url(slack_server[1]),
        "discord": discord_server[0].url(discord_server[1]),
        "http": f"{recorder_server[1]}/hooks/evaluations?token=recorder-query-secret",
    }


@pytest.mark.anyio
async def test_slack_receives_the_block_kit_message(slack: FakeSlack, urls: dict[str, str]) -> None:
    assert await deliver("slack", urls["slack"]) is None
    assert slack.payloads() == [slack_message(make_event())]
    assert slack.received[0].headers["content-type"].startswith("application/json")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "sent"),
    [
        ("", {"wait": "true"}),
        ("?thread_id=987", {"thread_id": "987", "wait": "true"}),  # a thread's, kept
        ("?wait=false", {"wait": "true"}),
    ],
)
async def test_discord_receives_the_embed_and_waits_for_it(
    discord: FakeDiscord, urls: dict[str, str], query: str, sent: dict[str, str]
) -> None:
    assert await deliver("discord", urls["discord"] + query) is None
    assert discord.payloads() == [discord_message(make_event())]
    assert discord.received[0].query == sent


@pytest.mark.anyio
async def test_slack_resends_without_the_image_it_could_not_fetch(
    slack: FakeSlack, urls: dict[str, str]
) -> None:
    slack.reject_images = True
    assert await deliver("slack", urls["slack"]) is None
    assert slack.attempts == 2
    assert slack.payloads() == [slack_message(make_event(), image=False)]


FAULTS = [
    # (sink, fail_next arguments, permanent, retry_after)
    ("slack", {"status": 429, "retry_after": 3}, False, 3.0),
    ("slack", {"status": 429}, False, None),
    ("slack", {"status": 429, "retry_after": 2, "header": False}, False, None),
    ("slack", {"status": 500}, False, None),
    ("slack", {"status": 503, "retry_after": 7}, False, 7.0),
    ("slack", {"status": 408}, False, None),
    ("slack", {"status": 400, "body": "invalid_payload"}, True, None),
    ("slack", {"status": 403, "body": "action_prohibited"}, True, None),
    ("slack", {"status": 404, "body": "no_service"}, True, None),
    ("slack", {"status": 410, "body": "channel_is_archived"}, True, None),
    ("discord", {"status": 429, "retry_after": 0.25}, False, 0.25),
    ("discord", {"status": 429, "retry_after": 2.5, "header": False}, False, 2.5),
    ("discord", {"status": 500}, False, None),
    ("discord", {"status": 502}, False, None),
    ("discord", {"status": 400}, True, None),
    ("discord", {"status": 404}, True, None),
    ("http", {"status": 500}, False, None),
    ("http", {"status": 503, "retry_after": 4}, False, 4.0),
    ("http", {"status": 429, "retry_after": 1}, False, 1.0),
    ("http", {"status": 425}, False, None),
    ("http", {"status": 400}, True, None),
    ("http", {"status": 401}, True, None),
    ("http", {"status": 410}, True, None),
    ("http", {"status": 301}, True, None),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "fault", "permanent", "retry_after"), FAULTS)
async def test_an_answer_maps_to_retry_or_dead(
    slack: FakeSlack,
    discord: FakeDiscord,
    recorder: Recorder,
    urls: dict[str, str],
    kind: str,
    fault: dict[str, Any],
    permanent: bool,
    retry_after: float | None,
) -> None:
    fake: FakeEndpoint = {"slack": slack, "discord": discord, "http": recorder}[kind]
    fake.fail_next(**fault)
    error = await deliver(kind, urls[kind])
    assert error is not None
    assert f"HTTP {fault['status']}" in str(error)
    assert (error.permanent, error.retry_after) == (permanent, retry_after)
    assert fake.payloads() == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("version", "header"),
    [("", True), ("", False), ("v6/", True), ("v8/", False), ("v10/", True)],
)
async def test_discord_rate_limits_are_read_in_seconds_whatever_version_the_url_names(
    discord: FakeDiscord, discord_server: tuple[FakeDiscord, str], version: str, header: bool
) -> None:
    """A webhook URL as Discord shows it names no API version, and the default one answers
    429 in milliseconds: 0.25 s must not be read as 250 s."""
    url = f"{discord_server[1]}/api/{version}webhooks/{discord.webhook_id}/{discord.token}"
    discord.fail_next(429, retry_after=0.25, header=header)
    error = await deliver("discord", url)
    assert error is not None
    assert error.retry_after == 0.25
    assert await deliver("discord", url) is None
    assert [got.path for got in discord.received] == [
        f"/api/v10/webhooks/{discord.webhook_id}/{discord.token}"
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["slack", "discord", "http"])
async def test_a_rate_limit_passes_and_the_message_arrives_once(
    slack: FakeSlack, discord: FakeDiscord, recorder: Recorder, urls: dict[str, str], kind: str
) -> None:
    fake: FakeEndpoint = {"slack": slack, "discord": discord, "http": recorder}[kind]
    fake.fail_next(429, count=2, retry_after=0.2)
    results = [await deliver(kind, urls[kind]) for _ in range(3)]
    assert [r is None for r in results] == [False, False, True]
    assert (fake.attempts, len(fake.payloads())) == (3, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["slack", "discord"])
async def test_after_a_429_nothing_more_is_posted_until_its_retry_after(
    slack: FakeSlack, discord: FakeDiscord, urls: dict[str, str], kind: str
) -> None:
    """The rest of the batch, and the next batch, are given back for later (Deferred, not
    an attempt) instead of being posted, refused again and counted against the sender."""
    fake: FakeEndpoint = {"slack": slack, "discord": discord}[kind]
    fake.fail_next(429, retry_after=30)
    events = [{**make_event(), "id": f"event-{n}"} for n in range(3)]
    async with httpx.AsyncClient() as http:
        sink = build_sink(SinkSpec(name=f"my-{kind}", type=kind, url=urls[kind]), http)
        first = await sink.deliver(events)
        second = await sink.deliver(events[1:])
    assert fake.attempts == 1
    assert first[0] is not None
    assert (type(first[0]), first[0].retry_after) == (SinkError, 30.0)
    for result in [*first[1:], *second]:
        assert isinstance(result, Deferred)
        assert 0 < result.retry_after <= 30


@pytest.mark.anyio
async def test_discord_waits_for_its_bucket_to_refill_instead_of_running_into_a_429(
    discord: FakeDiscord, urls: dict[str, str]
) -> None:
    """Discord tells in X-RateLimit-* headers when a webhook's bucket is used up; a request
    sent anyway gets a 429 and counts against the sender."""
    discord.bucket = (2, 30.0)
    events = [{**make_event(), "id": f"event-{n}"} for n in range(4)]
    async with httpx.AsyncClient() as http:
        sink = build_sink(SinkSpec(name="my-discord", type="discord", url=urls["discord"]), http)
        results = await sink.deliver(events)
    assert discord.attempts == 2
    assert results[:2] == [None, None]
    for result in results[2:]:
        assert isinstance(result, Deferred)
        assert 0 < result.retry_after <= 30


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "path", "status"),
    [
        ("slack", "/services/T0FAKE000/B0FAKE000/wrongTokenForSlack", 404),
        ("discord", "/api/webhooks/112233445566778899/wrongTokenForDiscord", 401),
        ("discord", "/api/webhooks/999999999999999999/fakeDiscordToken42", 404),
    ],
)
async def test_an_unknown_webhook_is_dead_at_once_and_not_named(
    slack_server: tuple[FakeSlack, str],
    discord_server: tuple[FakeDiscord, str],
    kind: str,
    path: str,
    status: int,
) -> None:
    base = {"slack": slack_server[1], "discord": discord_server[1]}[kind]
    error = await deliver(kind, base + path)
    assert error is not None
    assert error.permanent
    assert f"HTTP {status}" in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["slack", "discord", "http"])
async def test_a_refused_connection_is_retryable(kind: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}/services/T0AAAA/B0BBBB/closedPortToken"
    error = await deliver(kind, url)
    assert error is not None
    assert (error.permanent, error.retry_after) == (False, None)
    assert "ConnectError" in str(error)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        ("0", 0.0),
        (" 1.5 ", 1.5),
        ("Fri, 20 Nov 2026 09:15:30 GMT", 30.0),
        ("Fri, 20 Nov 2026 09:14:00 GMT", 0.0),
        ("-1", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        *[(s, "ok") for s in (200, 201, 202, 204)],
        *[(s, "retry") for s in (408, 425, 429, 500, 502, 503, 504)],
        *[(s, "dead") for s in (301, 302, 400, 401, 403, 404, 405, 410, 413, 422)],
    ],
)
def test_status_codes_map_to_ok_retry_or_dead(status: int, outcome: str) -> None:
    spec = SinkSpec(name="hook", type="http", url="https://example.invalid/x")
    response = httpx.Response(status, headers={"retry-after": "Fri, 20 Nov 2026 09:16:00 GMT"})
    error = response_error(spec, response, now=NOW)
    if outcome == "ok":
        assert error is None
        return
    assert error is not None
    assert str(error).startswith(f"sink 'hook': HTTP {status}")
    assert error.permanent == (outcome == "dead")
    assert error.retry_after == (60.0 if outcome == "retry" else None)


def test_a_discord_error_body_gives_its_message() -> None:
    spec = SinkSpec(name="qa", type="discord", url="https://discord.example/api/webhooks/1/tok")
    body = json.dumps({"message": "Invalid Form Body", "code": 50035}).encode()
    error = response_error(spec, httpx.Response(400, content=body))
    assert error is not None
    assert str(error) == "sink 'qa': HTTP 400: Invalid Form Body"
