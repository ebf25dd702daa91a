"""End to end: `receiver serve` as a real process, a fake Runflow API for refetch, fake Slack,
Discord and HTTP consumers, and a real Redis: outages, 429s and dead letters, and every event
arrives exactly once per sink (by event id)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from receiver.events import event_id
from receiver.fakes.chat import FakeDiscord, FakeSlack
from receiver.fakes.recorder import Recorder
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign

from .database import connect
from .helpers import SECRET_A, TOKEN, fixture
from .servers import ReceiverProcess
from .services import RedisService

API_KEY = "rf_pipeline_key"
HTTP_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Destinations:
    def __init__(self, redis_server: RedisService) -> None:
        self.redis = redis_server
        self.slack = FakeSlack()
        self.discord = FakeDiscord()
        self.http = Recorder()
        self.runflow = FakeRunflow(API_KEY)

    def toml(self, slack: str, discord: str, http: str, http_attempts: int = 50) -> str:
        return f"""
[[sinks]]
name = "slack"
type = "slack"
url = "{slack}"

[[sinks]]
name = "discord"
type = "discord"
url = "{discord}"

[[sinks]]
name = "consumer"
type = "http"
url = "{http}/hooks"
secret = "{HTTP_SECRET}"
max_attempts = {http_attempts}

[[sinks]]
name = "pipeline"
type = "redis"
url = "{self.redis.url}"
stream = "test:evaluations"
"""


@pytest.fixture
def destinations(redis_server: RedisService) -> Iterator[tuple[Destinations, dict[str, str]]]:
    found = Destinations(redis_server)
    client = redis.Redis.from_url(redis_server.url)
    client.delete("test:evaluations", *client.keys("test:evaluations:dedupe:*"))
    client.close()
    with (
        serve_in_thread(found.slack.app) as slack,
        serve_in_thread(found.discord.app) as discord,
        serve_in_thread(found.http.app) as http,
        serve_in_thread(found.runflow.app) as runflow,
    ):
        yield found, {"slack": slack, "discord": discord, "http": http, "runflow": runflow}


def receiver(
    tmp_path: Path, found: Destinations, urls: dict[str, str], **toml: Any
) -> ReceiverProcess:
    config = tmp_path / "receiver.toml"
    config.write_text(
        found.toml(
            found.slack.url(urls["slack"]), found.discord.url(urls["discord"]), urls["http"], **toml
        )
    )
    return ReceiverProcess(
        tmp_path,
        RECEIVER_CONFIG=str(config),
        RUNFLOW_API_KEY=API_KEY,
        RUNFLOW_API_BASE=urls["runflow"],
        RECEIVER_RETRY_BASE="0.05",
        RECEIVER_RETRY_MAX="0.3",
        RECEIVER_MAX_ATTEMPTS="1000",  # retries outlast any outage here; dead letters per sink
        RECEIVER_PUBLIC_URL="https://receiver.example.com",
    )


def callback(number: int) -> tuple[str, bytes]:
    evaluation_id = f"0193a7c2-0000-7000-8000-{number:012d}"
    body = json.loads(fixture("evaluation-completed-envelope.json"))
    body.update(evaluation_id=evaluation_id, client_ref=f"job-{number}")
    return evaluation_id, json.dumps(body).encode()


def post(url: str, body: bytes) -> None:
    response = httpx.post(
        f"{url}/webhooks/runflow", content=body, headers={"runflow-signature": sign(body, SECRET_A)}
    )
    assert response.status_code == 200, response.text


def outbox_state(database: Path) -> list[tuple[Any, ...]]:
    conn = connect(database)
    try:
        return conn.execute(
            "SELECT sink, state, count(*), max(attempts), max(last_error) FROM outbox GROUP BY 1, 2"
        ).fetchall()
    finally:
        conn.close()


def wait_until(check: Any, timeout: float = 60.0, database: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            state = outbox_state(database) if database else ""
            raise TimeoutError(f"the pipeline did not settle in time; outbox: {state}")
        time.sleep(0.1)


def test_every_verdict_arrives_once_per_sink_through_outages_and_429s(
    tmp_path: Path, destinations: tuple[Destinations, dict[str, str]]
) -> None:
    found, urls = destinations
    ids = [callback(n)[0] for n in range(20)]
    for evaluation_id in ids:
        found.runflow.add(evaluation_id)
    found.runflow.fail_next(429, count=2, retry_after=0.1)
    found.runflow.fail_next(500)
    found.slack.fail_next(429, count=2, retry_after=0.2)
    found.slack.fail_next(500, count=2)
    found.discord.fail_next(429, retry_after=0.1)
    found.http.fail_next(503, count=3)
    with receiver(tmp_path, found, urls) as server:
        for n in range(10):
            post(server.url, callback(n)[1])
        found.redis.stop()  # the queue goes down mid-run
        for n in range(10, 20):
            post(server.url, callback(n)[1])
            post(server.url, callback(n)[1])  # Runflow retried: a duplicate
        time.sleep(1.0)
        found.redis.start()
        expected = {event_id(i, "evaluation.completed") for i in ids}
        wait_until(
            lambda: (
                len(found.redis.stream_ids("test:evaluations")) >= 20
                and len(found.slack.received) >= 20
                and len(found.discord.received) >= 20
                and len(found.http.received) >= 20
            ),
            database=tmp_path / "receiver.db",
        )
        time.sleep(0.5)  # anything doubled would arrive now
    assert sorted(found.redis.stream_ids("test:evaluations")) == sorted(expected)
    for sink in (found.slack, found.discord, found.http):
        assert len(sink.received) == 20
    consumed = [json.loads(item.body) for item in found.http.received]
    assert {event["id"] for event in consumed} == expected
    assert all(event["data"]["refetched"] for event in consumed)
    assert {item.headers["webhook-id"] for item in found.http.received} == expected


def test_a_dead_letter_replayed_arrives_exactly_once(
    tmp_path: Path, destinations: tuple[Destinations, dict[str, str]]
) -> None:
    found, urls = destinations
    evaluation_id, body = callback(99)
    found.runflow.add(evaluation_id)
    found.http.fail_next(500)
    auth = {"authorization": f"Bearer {TOKEN}"}
    with receiver(tmp_path, found, urls, http_attempts=1) as server:
        post(server.url, body)

        def dead() -> list[dict[str, Any]]:
            response = httpx.get(
                f"{server.url}/api/forwards", params={"state": "dead"}, headers=auth
            )
            items: list[dict[str, Any]] = response.json()["items"]
            return items

        wait_until(lambda: bool(dead()))
        (letter,) = dead()
        assert letter["sink"] == "consumer"
        retried = httpx.post(f"{server.url}/api/forwards/{letter['id']}/retry", headers=auth)
        assert retried.json() == {"ok": True, "forward": {"id": letter["id"], "state": "pending"}}
        found.http.wait_for(1)
        time.sleep(0.5)
        assert dead() == []
    assert [json.loads(item.body)["id"] for item in found.http.received] == [
        event_id(evaluation_id, "evaluation.completed")
    ]
