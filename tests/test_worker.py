"""The worker against a real store, a real fake Runflow API over HTTP, and recording sinks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.config import Settings
from receiver.errors import StoreUnavailable
from receiver.events import event_id
from receiver.fakes.chat import FakeSlack
from receiver.fakes.emulator import Verdict, finished, template
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.normalize import VERDICT_ONLY, normalize, parse_body
from receiver.runflow import RunflowClient
from receiver.sinks import Deferred, Event, OneByOne, SinkError, build_sink
from receiver.sinkspec import SinkSpec
from receiver.store import Delivery, EvaluationFilter, Forwarding, Store
from receiver.store.stats import stats as scan_stats
from receiver.times import format_time
from receiver.worker import Worker, utcnow

from .database import connect, sqlite_only
from .helpers import RecordingSink, fixture, make_settings

pytestmark = pytest.mark.anyio
T = TypeVar("T")
EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
API_KEY = "rf_test_key"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(name: str, **filters: Any) -> SinkSpec:
    return SinkSpec(name=name, type="http", url="http://127.0.0.1:9/", **filters)


@pytest.fixture(scope="module")
def runflow() -> Iterator[tuple[FakeRunflow, str]]:
    fake = FakeRunflow(API_KEY)
    with serve_in_thread(fake.app) as url:
        yield fake, url


def numbered(n: int) -> str:
    """The n-th of a run of evaluation ids (UUIDs, in order)."""
    return f"0193a7c2-0000-7000-8000-{n:012d}"


class Rig:
    """Store + worker + sinks on one temp database."""

    def __init__(self, settings: Settings, sinks: list[RecordingSink], http: httpx.AsyncClient):
        self.settings = settings
        self.sinks = {sink.spec.name: sink for sink in sinks}
        forwarding = Forwarding(
            tuple(s.spec for s in sinks), settings.refetch, settings.reconcile_after
        )
        self.store = Store(settings.database, forwarding=forwarding)
        client = RunflowClient(http, base=settings.runflow_api_base, api_key=API_KEY)
        self.worker = Worker(settings, self.store, sinks, client)

    async def post(self, name_or_body: str | bytes, **fields: Any) -> None:
        body = fixture(name_or_body) if isinstance(name_or_body, str) else name_or_body
        if fields:
            body = json.dumps({**json.loads(body), **fields}).encode()
        await self.store.ingest(Delivery(body, normalize(parse_body(body))))

    async def post_verdicts(self, count: int) -> None:
        """`count` completed verdicts of as many evaluations, ids in order."""
        for n in range(count):
            await self.post("evaluation-completed.json", id=numbered(n))

    async def drain(self, rounds: int = 50) -> None:
        """Run rounds until nothing is due (bounded)."""
        for _ in range(rounds):
            if not await self.worker.run_once():
                return

    async def settle(self, rounds: int = 200) -> None:
        """Drain, waiting out refetch retries, until no refetch is pending (bounded)."""
        for _ in range(rounds):
            await self.drain()
            if not self.rows("SELECT 1 FROM evaluations WHERE refetch_state = 'pending'"):
                return
            await asyncio.sleep(0.005)

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        conn = connect(self.settings.database)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield client


def rig_for(tmp_path: Path, http: httpx.AsyncClient, sinks: list[RecordingSink], **kw: Any) -> Rig:
    settings = make_settings(tmp_path, **{"retry_base": 0.001, "retry_max": 0.01, **kw})
    rig = Rig(settings, sinks, http)
    rig.store.open()
    return rig


FILTERS = [
    ({}, {"evaluation-completed.json", "evaluation-failed.json"}),
    ({"only_failures": True}, {"evaluation-completed.json", "evaluation-failed.json"}),
    ({"events": frozenset({"evaluation.failed"})}, {"evaluation-failed.json"}),
    ({"task_types": frozenset({"portrait"})}, set()),
    ({"client_ref_prefix": "customer-job-124"}, {"evaluation-failed.json"}),
]


@pytest.mark.parametrize(("filters", "expected"), FILTERS)
async def test_one_forward_per_matching_sink(
    tmp_path: Path, http: httpx.AsyncClient, filters: dict[str, Any], expected: set[str]
) -> None:
    sink = RecordingSink(spec("s", **filters))
    rig = rig_for(tmp_path, http, [sink])
    try:
        for name in ("evaluation-completed.json", "evaluation-failed.json"):
            await rig.post(name)
        await rig.drain()
    finally:
        rig.store.close()
    ids = {"evaluation-completed.json": EVALUATION_ID, "evaluation-failed.json": FAILED}
    assert {e["subject"] for e in sink.received} == {ids[name] for name in expected}


FAILED = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e22"


async def test_a_verdict_seen_again_is_forwarded_once(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink])
    try:
        for name in (
            "evaluation-completed-envelope.json",
            "evaluation-completed.json",
            "evaluation-completed.json",
            "get-evaluation-embedded.json",
        ):
            await rig.post(name)
            await rig.drain()
    finally:
        rig.store.close()
    assert [e["id"] for e in sink.received] == [event_id(EVALUATION_ID, "evaluation.completed")]
    assert sink.received[0]["type"] == "io.runflow.evaluation.completed"


async def test_a_failing_sink_retries_then_dies_without_delaying_others(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    broken = RecordingSink(spec("broken"))
    broken.failures = [SinkError("boom")] * 3
    healthy = RecordingSink(spec("healthy"))
    rig = rig_for(tmp_path, http, [broken, healthy], max_attempts=3)
    try:
        await rig.post("evaluation-completed.json")
        await rig.worker.run_once()
        assert len(healthy.received) == 1  # on the first round, whatever the other sink does
        for _ in range(20):
            await asyncio.sleep(0.02)
            await rig.worker.run_once()
        states = dict(rig.rows("SELECT sink, state || ':' || attempts FROM outbox"))
    finally:
        rig.store.close()
    assert states == {"broken": "dead:3", "healthy": "done:1"}
    assert broken.received == []


async def test_permanent_errors_die_at_once_and_retry_after_is_honoured(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    gone = RecordingSink(spec("gone"))
    gone.failures = [SinkError("404", permanent=True)]
    limited = RecordingSink(spec("limited"))
    limited.failures = [SinkError("429", retry_after=3600)]
    rig = rig_for(tmp_path, http, [gone, limited], retry_max=7200)
    try:
        await rig.post("evaluation-completed.json")
        await rig.worker.run_once()
        rows = dict(rig.rows("SELECT sink, state FROM outbox"))
        (next_at,) = rig.rows("SELECT next_attempt_at FROM outbox WHERE sink = 'limited'")[0]
        (created,) = rig.rows("SELECT created_at FROM outbox WHERE sink = 'limited'")[0]
    finally:
        rig.store.close()
    assert rows == {"gone": "dead", "limited": "pending"}
    assert next_at[:13] > created[:13]  # an hour later, not within the same hour


async def test_a_sinks_own_max_attempts_and_retry_after_within_retry_max(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """`max_attempts` in a sink's table wins over RECEIVER_MAX_ATTEMPTS; a Retry-After of a
    day from an http or queue sink waits RECEIVER_RETRY_MAX at most."""
    brief = RecordingSink(spec("brief", max_attempts=2))
    brief.failures = [SinkError("boom")] * 5
    limited = RecordingSink(spec("limited"))
    limited.failures = [SinkError("429", retry_after=86_400)]
    rig = rig_for(tmp_path, http, [brief, limited], max_attempts=10, retry_base=0.01, retry_max=60)
    try:
        await rig.post("evaluation-completed.json")
        for _ in range(10):
            await rig.worker.run_once()
            await asyncio.sleep(0.02)
        states = dict(rig.rows("SELECT sink, state || ':' || attempts FROM outbox"))
        (next_at,) = rig.rows("SELECT next_attempt_at FROM outbox WHERE sink = 'limited'")[0]
        latest = format_time(rig.worker.clock() + timedelta(seconds=61))
    finally:
        rig.store.close()
    assert states == {"brief": "dead:2", "limited": "pending:1"}
    assert next_at < latest


async def test_dead_letters_and_replays_arrive_again_with_the_same_id(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sink = RecordingSink(spec("s"))
    sink.failures = [SinkError("down", permanent=True)]
    rig = rig_for(tmp_path, http, [sink])
    try:
        await rig.post("evaluation-completed.json")
        await rig.drain()
        ((forward_id, state),) = rig.rows("SELECT id, state FROM outbox")
        assert state == "dead"
        await rig.store.retry_forward(forward_id, "2000-01-01T00:00:00.000000Z")
        await rig.drain()
        assert len(sink.received) == 1
        assert await rig.store.replay_delivery(1, "2000-01-01T00:00:00.000000Z") == 1
        await rig.drain()
    finally:
        rig.store.close()
    assert [e["id"] for e in sink.received] == [event_id(EVALUATION_ID, "evaluation.completed")] * 2


async def test_refetch_fills_the_event_and_becomes_the_stored_state(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.add(EVALUATION_ID)
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post("evaluation-completed-envelope.json")
        await rig.drain()
        found = rig.store.get_evaluation(EVALUATION_ID)
    finally:
        rig.store.close()
    (event,) = sink.received
    assert event["data"]["refetched"] is True
    assert event["data"]["action"]["improved_prompt"].endswith("hands out of frame")
    assert {i["category"] for i in event["data"]["issues"]} == {"anatomy", "garment"}
    assert found is not None
    assert found["evaluation"]["refetched"] is True
    assert len(found["issues"]) == 2
    request = fake.requests[-1]
    assert request["path"] == f"/v1/evaluations/{EVALUATION_ID}"
    assert request["query"] == {"embed": "judges,action,gate_failures"}
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"


REFETCH_FAULTS = {  # the fault, and the attempts it costs (a 429 is no attempt: a wait)
    "429-retry-after": ({"status": 429, "retry_after": 0.01}, 0),
    "429-bare": ({"status": 429}, 0),
    "500": ({"status": 500}, 1),
    "503-twice": ({"status": 503, "count": 2}, 2),
    "slow": ({"status": None, "delay": 3.0}, 1),
}


@pytest.mark.parametrize(
    ("fault", "attempts_made"), REFETCH_FAULTS.values(), ids=REFETCH_FAULTS.keys()
)
async def test_refetch_faults_are_retried(
    tmp_path: Path,
    http: httpx.AsyncClient,
    runflow: tuple[FakeRunflow, str],
    fault: dict[str, Any],
    attempts_made: int,
) -> None:
    fake, url = runflow
    fake.add(EVALUATION_ID)
    fake.faults.clear()
    fake.fail_next(**fault)
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post("evaluation-completed-envelope.json")
        for _ in range(40):
            await rig.worker.run_once()
            if sink.received:
                break
            await asyncio.sleep(0.02)
        ((refetch_state, attempts),) = rig.rows(
            "SELECT refetch_state, refetch_attempts FROM evaluations"
        )
    finally:
        rig.store.close()
    assert refetch_state == "done"
    assert attempts == attempts_made
    assert sink.received[0]["data"]["refetched"] is True


async def test_a_429_holds_every_refetch_and_poll_for_its_retry_after(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Runflow's rate limit is the API key's: after a 429 asking to wait a minute, the next
    rounds ask nothing (they asked for 16 more evaluations each, into the limit), and the
    refused refetches wait without losing an attempt."""
    fake, url = runflow
    fake.faults.clear()
    rig = rig_for(
        tmp_path,
        http,
        [RecordingSink(spec("s"))],
        runflow_api_key=API_KEY,
        runflow_api_base=url,
        retry_max=3600,
    )
    try:
        for n in range(48):
            fake.add(numbered(n))
        await rig.post_verdicts(48)
        fake.fail_next(429, count=1000, retry_after=60)
        first = await rig.worker._refetch_round(None)
        asked = len(fake.requests)
        later = [await rig.worker._refetch_round(None) for _ in range(3)]
        polls = await rig.worker.reconcile()
        attempts = rig.rows("SELECT DISTINCT refetch_attempts FROM evaluations")
    finally:
        fake.faults.clear()
        rig.store.close()
    assert first == 16
    assert (later, len(fake.requests)) == ([0, 0, 0], asked)
    assert polls["polled"] == 0
    assert attempts == [(0,)]


@pytest.mark.parametrize("case", ["unauthorized", "not-found", "not-a-uuid"])
async def test_refetch_refusals_are_not_retried_and_the_event_still_goes_out(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str], case: str
) -> None:
    fake, url = runflow
    fake.faults.clear()
    fake.evaluations.pop(EVALUATION_ID, None)
    body = fixture("evaluation-completed-envelope.json")
    if case == "not-a-uuid":
        body = body.replace(EVALUATION_ID.encode(), b"../../admin")
    key = "wrong" if case == "unauthorized" else API_KEY
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=key, runflow_api_base=url)
    rig.worker.runflow = RunflowClient(http, base=url, api_key=key)
    requests_before = len(fake.requests)
    try:
        await rig.post(body)
        await rig.drain()
        ((refetch_state, attempts),) = rig.rows(
            "SELECT refetch_state, refetch_attempts FROM evaluations"
        )
    finally:
        rig.store.close()
    assert (refetch_state, attempts) == ("failed", 1)
    assert sink.received[0]["data"]["refetched"] is False
    assert len(fake.requests) - requests_before == (0 if case == "not-a-uuid" else 1)


async def test_past_the_budget_the_event_goes_out_and_the_refetch_goes_on(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.add(EVALUATION_ID)
    fake.faults.clear()
    fake.fail_next(500, count=3)
    sink = RecordingSink(spec("s"))
    rig = rig_for(
        tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url, refetch_budget=0
    )
    try:
        await rig.post("evaluation-completed-envelope.json")
        await rig.worker.run_once()
        assert sink.received[0]["data"]["refetched"] is False
        for _ in range(40):
            await asyncio.sleep(0.02)
            await rig.worker.run_once()
        ((refetch_state, refetched),) = rig.rows("SELECT refetch_state, refetched FROM evaluations")
    finally:
        rig.store.close()
    assert (refetch_state, refetched) == ("done", 1)
    assert len(sink.received) == 1


async def test_a_sink_that_wants_no_such_task_type_skips_after_refetch(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.add(EVALUATION_ID)
    fake.faults.clear()
    sink = RecordingSink(spec("portraits", task_types=frozenset({"portrait"})))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post("evaluation-completed-envelope.json")  # no task_type in the envelope
        await rig.drain()
        states = rig.rows("SELECT state FROM outbox")
    finally:
        rig.store.close()
    assert states == [("skipped",)]
    assert sink.received == []


async def test_two_workers_on_one_database_never_deliver_a_row_twice(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sinks = [RecordingSink(spec("s")), RecordingSink(spec("s"))]
    settings = make_settings(tmp_path)
    rigs = [Rig(settings, [sink], http) for sink in sinks]
    for rig in rigs:
        rig.store.open()
        rig.worker.batch_size = 7
    try:
        for n in range(120):
            await rigs[n % 2].post("evaluation-completed.json", id=numbered(n))
        for _ in range(40):
            done = await asyncio.gather(*(rig.worker.run_once() for rig in rigs))
            if not any(done):
                break
    finally:
        for rig in rigs:
            rig.store.close()
    ids = [e["id"] for sink in sinks for e in sink.received]
    assert len(ids) == len(set(ids)) == 120
    assert all(sink.received for sink in sinks)


async def test_the_worker_loop_wakes_on_notify_and_stops_cleanly(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink])
    rig.worker.poll_interval = 30  # only notify() can wake it within the test's wait
    await rig.worker.start()
    try:
        await asyncio.sleep(0.05)
        await rig.post("evaluation-completed.json")
        rig.worker.notify()
        for _ in range(200):
            if sink.received:
                break
            await asyncio.sleep(0.01)
        assert rig.worker.running
    finally:
        await rig.worker.stop()
        rig.store.close()
    assert len(sink.received) == 1
    assert not rig.worker.running


def test_settings_replace_keeps_refetch_off_without_key(tmp_path: Path) -> None:
    settings = replace(make_settings(tmp_path), refetch_embeds=("judges",))
    assert settings.refetch is False


async def test_reconcile_recovers_a_verdict_whose_callbacks_were_lost(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.faults.clear()
    fake.add(EVALUATION_ID)  # completed at Runflow; only a "running" callback ever arrived
    sink = RecordingSink(spec("s"))
    rig = rig_for(
        tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url, reconcile_after=0
    )
    try:
        await rig.post("evaluation-completed.json", status_code="running", completed_at=None)
        await rig.drain()
        assert sink.received == []
        first = await rig.worker.reconcile()
        again = await rig.worker.reconcile()
        await rig.drain()
        sources = rig.rows("SELECT source, outcome FROM deliveries ORDER BY id")
        ((status, next_poll, refetched),) = rig.rows(
            "SELECT status, next_poll_at, refetched FROM evaluations"
        )
        await rig.post("evaluation-completed.json")  # the lost callback turns up after all
        await rig.drain()
    finally:
        rig.store.close()
    assert first == {"polled": 1, "verdicts": 1, "pending": 0, "errors": 0}
    assert again["polled"] == 0
    assert sources == [("webhook", "stored"), ("poll", "stored")]
    assert (status, next_poll, refetched) == ("completed", None, 1)
    assert [e["id"] for e in sink.received] == [event_id(EVALUATION_ID, "evaluation.completed")]
    assert sink.received[0]["data"]["refetched"] is True


async def test_a_poll_while_running_leaves_the_verdict_to_be_refetched(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """A poll answers with the embeds, but an evaluation still running has none yet: its
    verdict, when the callback brings it, is refetched before it is forwarded."""
    fake, url = runflow
    fake.faults.clear()
    fake.add(EVALUATION_ID, status_code="running", completed_at=None, overall_passed=None)
    sink = RecordingSink(spec("s"))
    rig = rig_for(
        tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url, reconcile_after=0
    )
    try:
        pending = dict(fake.evaluations[EVALUATION_ID], status_code="pending")
        await rig.store.record(pending, "submit", "2026-11-20T09:14:02.000000Z")  # receiver submit
        await rig.drain()
        polled = await rig.worker.reconcile()
        after_poll = rig.rows("SELECT status, refetched, refetch_state FROM evaluations")
        fake.add(EVALUATION_ID)  # completed at Runflow, which calls back
        asked = len(fake.requests)
        await rig.post("evaluation-completed-envelope.json")
        await rig.drain()
        refetches = len(fake.requests) - asked
    finally:
        rig.store.close()
    assert polled == {"polled": 1, "verdicts": 0, "pending": 1, "errors": 0}
    assert after_poll == [("running", 0, None)]
    assert refetches == 1
    (event,) = sink.received
    assert event["data"]["refetched"] is True
    assert event["data"]["issues"]


STUCK = [f"0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e{n:02d}" for n in (41, 42, 43)]


async def stuck_rig(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> tuple[Rig, FakeRunflow]:
    """Three evaluations completed at Runflow whose callbacks were lost after `running`."""
    fake, url = runflow
    fake.faults.clear()
    rig = rig_for(
        tmp_path, http, [], runflow_api_key=API_KEY, runflow_api_base=url, reconcile_after=0
    )
    for evaluation_id in STUCK:
        fake.add(evaluation_id)
        await rig.post(
            "evaluation-completed.json", id=evaluation_id, status_code="running", completed_at=None
        )
    return rig, fake


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_does_not_end_reconciliation(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str], status: int
) -> None:
    """A key rotated or short of a scope for a while: polling goes on as scheduled (only a
    404, or an answer that is not the evaluation, ends it)."""
    rig, fake = await stuck_rig(tmp_path, http, runflow)
    try:
        fake.fail_next(status, count=len(STUCK))
        refused = await rig.worker.reconcile()
        later = await rig.worker.reconcile()
        states = rig.rows("SELECT status, next_poll_at FROM evaluations ORDER BY id")
    finally:
        rig.store.close()
    assert refused == {"polled": 3, "verdicts": 0, "pending": 0, "errors": 3}
    assert later == {"polled": 3, "verdicts": 3, "pending": 0, "errors": 0}
    assert states == [("completed", None)] * 3


async def test_a_404_ends_reconciliation(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Runflow does not know them: asking again cannot help, so they are not polled again."""
    rig, fake = await stuck_rig(tmp_path, http, runflow)
    try:
        fake.fail_next(404, count=len(STUCK))
        counts = await rig.worker.reconcile()
        states = rig.rows("SELECT status, next_poll_at FROM evaluations ORDER BY id")
    finally:
        rig.store.close()
    assert counts == {"polled": 3, "verdicts": 0, "pending": 0, "errors": 3}
    assert states == [("running", None)] * 3


async def test_a_429_ends_the_pass_and_its_retry_after_is_honoured(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    rig, fake = await stuck_rig(tmp_path, http, runflow)
    try:
        fake.fail_next(429, retry_after=3600)
        asked = len(fake.requests)
        counts = await rig.worker.reconcile()
        sent = len(fake.requests) - asked
        ((next_poll,),) = rig.rows(
            "SELECT next_poll_at FROM evaluations WHERE poll_error IS NOT NULL"
        )
        hour_less_a_bit = format_time(rig.worker.clock() + timedelta(seconds=3500))
    finally:
        rig.store.close()
    assert counts == {"polled": 1, "verdicts": 0, "pending": 0, "errors": 1}
    assert sent == 1  # the others wait for their lease to run out
    assert next_poll > hour_less_a_bit


@pytest.mark.parametrize("answer", ["still-running", "rate-limited-for-a-week"])
async def test_a_poll_waits_a_day_at_most(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str], answer: str
) -> None:
    """The delay doubles with every poll and honours Retry-After, but never past a day: an
    evaluation stuck for weeks is still looked at daily."""
    fake, url = runflow
    fake.faults.clear()
    rig = rig_for(
        tmp_path, http, [], runflow_api_key=API_KEY, runflow_api_base=url, reconcile_after=1
    )
    try:
        for evaluation_id in STUCK:
            fake.add(evaluation_id, status_code="running", completed_at=None)
            await rig.post(
                "evaluation-completed.json",
                id=evaluation_id,
                status_code="running",
                completed_at=None,
            )
        if answer == "rate-limited-for-a-week":
            fake.fail_next(429, retry_after=7 * 86400, count=len(STUCK))
        conn = connect(rig.settings.database)  # 40 polls so far, the next one due
        with conn:
            conn.execute(
                "UPDATE evaluations SET poll_attempts = 40, next_poll_at = ?",
                (format_time(rig.worker.clock() - timedelta(seconds=1)),),
            )
        conn.close()
        await rig.worker.reconcile()
        polled = rig.rows("SELECT next_poll_at FROM evaluations WHERE poll_attempts = 41")
        a_day = format_time(rig.worker.clock() + timedelta(days=1))
    finally:
        rig.store.close()
    assert polled
    assert all(a_day > next_poll > format_time(rig.worker.clock()) for (next_poll,) in polled)


async def test_a_refetch_behind_the_callback_is_tried_again(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Runflow's GET can lag its callback: an answer still `running` is no verdict to store
    as refetched; the refetch is tried again, and the event carries the judges once it has
    them."""
    fake, url = runflow
    fake.faults.clear()
    fake.add(EVALUATION_ID, status_code="running", completed_at=None, overall_passed=None)
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post("evaluation-completed-envelope.json")
        await rig.worker.run_once()
        lagging = rig.rows("SELECT refetched, refetch_state, refetch_attempts FROM evaluations")
        fake.add(EVALUATION_ID)  # now Runflow's GET has the verdict
        await asyncio.sleep(0.01)  # past the retry's backoff
        await rig.drain()
    finally:
        rig.store.close()
    assert lagging == [(0, "pending", 1)]
    (event,) = sink.received
    assert event["data"]["refetched"] is True
    assert event["data"]["issues"]


async def test_a_refetched_lone_surrogate_is_cleaned_as_in_a_callback(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """An emoji cut in half (`\\ud83d`) in Runflow's answer is stored as U+FFFD, as it would be
    in a callback: not a refetch failing on every round, unseen."""
    body = json.loads(fixture("get-evaluation-embedded.json"))
    body["judges"][0]["reasoning"] = "six fingers \ud83d"
    answer = json.dumps(body).encode()

    async def get(request: Request) -> Response:
        return Response(answer, media_type="application/json")

    sink = RecordingSink(spec("s"))
    with serve_in_thread(Starlette(routes=[Route("/v1/evaluations/{id}", get)])) as url:
        rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
        try:
            await rig.post("evaluation-completed.json")
            await rig.drain()
            found = rig.store.get_evaluation(EVALUATION_ID)
        finally:
            rig.store.close()
    assert found is not None
    assert found["evaluation"]["refetched"] is True
    assert found["evaluation"]["runflow"]["judges"][0]["reasoning"] == "six fingers \ufffd"
    assert len(sink.received) == 1


class SlowSink(RecordingSink):
    """Takes `delay` seconds per batch, like a destination that hangs until its timeout."""

    delay = 1.0

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        await asyncio.sleep(self.delay)
        return await super().deliver(events)


async def test_a_slow_batch_keeps_its_lease(tmp_path: Path, http: httpx.AsyncClient) -> None:
    """A batch that takes longer than the lease (a chat sink posting one event at a time) is
    not claimed and sent again by another worker meanwhile."""
    slow, other = SlowSink(spec("s")), RecordingSink(spec("s"))
    settings = make_settings(tmp_path)
    first, second = Rig(settings, [slow], http), Rig(settings, [other], http)
    for rig in (first, second):
        rig.store.open()
        rig.worker.lease = timedelta(seconds=0.3)
    try:
        await first.post("evaluation-completed.json")

        async def later() -> int:
            await asyncio.sleep(0.5)  # past the first lease, while the batch is still sent
            return await second.worker.run_once()

        await asyncio.gather(first.worker.run_once(), later())
        states = first.rows("SELECT state, attempts FROM outbox")
    finally:
        for rig in (first, second):
            rig.store.close()
    assert len(slow.received) == 1
    assert other.received == []
    assert states == [("done", 1)]


async def test_a_slow_batch_records_its_skipped_forwards(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A forward skipped in a batch whose lease is renewed while the rest is sent (the sink
    does not want it, known only after the refetch) is recorded as skipped with the others,
    not left pending for another round."""
    slow = SlowSink(spec("s", task_types=frozenset({"portrait"})))
    rig = Rig(make_settings(tmp_path), [slow], http)
    rig.store.open()
    rig.worker.lease = timedelta(seconds=0.3)  # renewed while the batch takes 0.5 s
    try:
        await rig.post("evaluation-completed.json", task_type=None)  # queued: type unknown
        await rig.post("evaluation-completed.json", task_type="landscape")  # not wanted
        await rig.post("evaluation-completed.json", id=numbered(1), task_type="portrait")
        await rig.worker.run_once()
        states = rig.rows("SELECT state FROM outbox ORDER BY id")
    finally:
        rig.store.close()
    assert len(slow.received) == 1
    assert sorted(state for (state,) in states) == ["done", "skipped"]


class GatedSink(RecordingSink):
    """Holds each batch until `gate` opens; says when one has arrived (`entered`)."""

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        self.entered.set()
        await self.gate.wait()
        return await super().deliver(events)


def forwards_counted(rig: Rig, sink: str) -> dict[str, float]:
    """receiver_forwards_total of `sink` by result, as /metrics shows them (zeros left out)."""
    counted = {}
    for result in ("done", "retry", "dead", "skipped"):
        labels = {"sink": sink, "result": result}
        value = rig.worker.metrics.registry.get_sample_value("receiver_forwards_total", labels)
        if value:
            counted[result] = value
    return counted


STALLED_ANSWERS = {
    "delivered": None,
    "404": SinkError("404 Not Found", permanent=True),
    "503": SinkError("503 Service Unavailable"),
    "429": SinkError("429 Too Many Requests", retry_after=30, limited=True),
}


@pytest.mark.parametrize("answer", STALLED_ANSWERS.values(), ids=STALLED_ANSWERS.keys())
async def test_a_worker_that_lost_its_lease_does_not_overwrite_the_new_holder(
    tmp_path: Path, http: httpx.AsyncClient, answer: SinkError | None
) -> None:
    """Worker A stalls past its lease (a paused process) while sending; worker B claims the
    row when it runs out and delivers it. A's late answer comes before B's: it must not decide
    the row (a 404 would leave the forward B delivered dead, and `forwards --retry-all-dead`
    send it once more), nor be counted: receiver_forwards_total counted A's dropped outcome
    too, so a delivery B recorded showed as two (or as a retry or dead letter besides)."""
    stalled, holder = GatedSink(spec("s")), GatedSink(spec("s"))
    if answer is not None:
        stalled.failures.append(answer)
    settings = make_settings(tmp_path)
    first, second = Rig(settings, [stalled], http), Rig(settings, [holder], http)
    second.worker.clock = lambda: utcnow() + first.worker.lease + timedelta(seconds=1)
    for rig in (first, second):
        rig.store.open()
    try:
        await first.post("evaluation-completed.json")
        sending = asyncio.create_task(first.worker.run_once())
        await asyncio.wait_for(stalled.entered.wait(), 10)
        resending = asyncio.create_task(second.worker.run_once())
        await asyncio.wait_for(holder.entered.wait(), 10)  # A's lease ran out: B holds it
        stalled.gate.set()
        await sending  # A's answer first
        holder.gate.set()
        await resending
        states = first.rows("SELECT state, attempts, last_error FROM outbox")
    finally:
        for rig in (first, second):
            rig.store.close()
    assert len(holder.received) == 1
    assert states == [("done", 1, None)]
    assert forwards_counted(first, "s") == {}
    assert forwards_counted(second, "s") == {"done": 1}


class OneAtATime(OneByOne):
    """A chat sink: one post per event, `delay` seconds each; `hang_after` posts, it hangs."""

    concurrency = 1

    def __init__(self, spec: SinkSpec, delay: float, hang_after: int | None = None) -> None:
        super().__init__(spec)
        self.delay, self.hang_after = delay, hang_after
        self.received: list[str] = []

    async def send(self, event: Event) -> None:
        if self.hang_after is not None and len(self.received) >= self.hang_after:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        self.received.append(event["id"])


@pytest.mark.parametrize("hangs", [False, True], ids=["halted", "cancelled"])
async def test_a_stop_mid_batch_sends_nothing_twice(
    tmp_path: Path, http: httpx.AsyncClient, hangs: bool
) -> None:
    """Stopping (a deploy) while a chat backlog drains: what went out is recorded, the rest
    is given back at once, not an attempt, and the next process sends only that. Whether the
    post in flight finishes (halted) or hangs past stop's timeout (cancelled)."""
    chat = OneAtATime(spec("chat"), delay=0.02, hang_after=5 if hangs else None)
    rig = rig_for(tmp_path, http, [chat])  # type: ignore[list-item]
    try:
        await rig.post_verdicts(40)
        await rig.worker.start()
        while len(chat.received) < 5:
            await asyncio.sleep(0.01)
        await rig.worker.stop(timeout=0.3)
        first = list(chat.received)
        states = dict(rig.rows("SELECT state, count(*) FROM outbox GROUP BY state"))
        given_back = rig.rows("SELECT DISTINCT attempts FROM outbox WHERE state = 'pending'")
        chat.hang_after = None
        restarted = Worker(rig.settings, rig.store, [chat], None)  # the next process
        while await restarted.run_once():
            pass
    finally:
        rig.store.close()
    assert states == {"done": len(first), "pending": 40 - len(first)}
    assert given_back == [(0,)]
    assert len(chat.received) == len(set(chat.received)) == 40


async def test_a_chat_sink_claims_a_few_posts_at_a_time(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A batch is recorded when it ends, so a worker killed mid-batch has all of it sent
    again: a chat sink's batch is 8 posts (its concurrency, 1, eight times), not 200."""
    chat = OneAtATime(spec("chat"), delay=0)
    rig = rig_for(tmp_path, http, [chat])  # type: ignore[list-item]
    try:
        await rig.post_verdicts(20)
        await rig.worker.run_once()
        first = len(chat.received)
        await rig.drain()
    finally:
        rig.store.close()
    assert first == 8
    assert len(chat.received) == len(set(chat.received)) == 20


async def test_a_failing_sink_is_logged_once_and_again_when_it_delivers(
    tmp_path: Path, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Retried failures (a queue down, 500s) were never logged: only a dead letter was. Now
    one warning when a sink starts failing (not one per batch), one line when it delivers
    again; a rate limit is its own line, not a failure."""
    sink = RecordingSink(spec("hook"))
    sink.failures += [SinkError("503 Service Unavailable")] * 3
    rig = rig_for(tmp_path, http, [sink], retry_base=0.001, retry_max=0.001)
    try:
        await rig.post_verdicts(3)
        with caplog.at_level("INFO", logger="receiver.worker"):
            for _ in range(3):  # three batches of one failing forward each
                rig.worker.batch_size = 1
                await rig.worker.run_once()
                await asyncio.sleep(0.01)
            await rig.drain()
    finally:
        rig.store.close()
    said = [r.getMessage() for r in caplog.records if "'hook'" in r.getMessage()]
    assert said == [
        "sink 'hook' is failing (1 of 1 in a batch): 503 Service Unavailable;"
        " its forwards are tried again",
        "sink 'hook' delivers again",
    ]
    assert len(sink.received) == 3


@pytest.mark.parametrize(
    ("error", "rests"),
    [(SinkError("500 Internal Server Error"), True), (SinkError("404", permanent=True), False)],
    ids=["retried", "dead"],
)
async def test_a_sink_failing_whole_batches_rests(
    tmp_path: Path, http: httpx.AsyncClient, error: SinkError, rests: bool
) -> None:
    """Each forward backs off on its own, but a backlog's next ones were due: a destination
    answering 500s got them all at full speed. A batch that delivered nothing pauses the sink
    (RECEIVER_RETRY_BASE, doubling; one that delivered anything ends the pause); refusals for
    good are dead letters, and say nothing of the next events."""
    sink = RecordingSink(spec("hook"))
    sink.failures += [error] * 5
    rig = rig_for(tmp_path, http, [sink], retry_base=30, retry_max=60)
    rig.worker.batch_size = 5
    try:
        await rig.post_verdicts(10)
        await rig.worker.run_once()
        paused = await rig.worker.run_once()
        attempts = rig.rows("SELECT attempts, count(*) FROM outbox GROUP BY attempts")
    finally:
        rig.store.close()
    assert paused == (0 if rests else 5)  # the next five were due, never tried
    assert sorted(attempts) == ([(0, 5), (1, 5)] if rests else [(1, 10)])


class Stalling(OneAtATime):
    """Its first post stalls the whole process (a pause, SIGSTOP) past the lease, meanwhile
    another worker takes the batch's rows."""

    def __init__(self, spec: SinkSpec, database: str) -> None:
        super().__init__(spec, delay=0)
        self.database = database

    async def send(self, event: Event) -> None:
        if not self.received:
            time.sleep(0.5)  # the event loop itself stalls
            conn = connect(self.database)
            with conn:
                conn.execute("UPDATE outbox SET next_attempt_at = '2999-01-01T00:00:00.000000Z'")
            conn.close()
        await super().send(event)


async def test_a_batch_whose_lease_is_gone_sends_no_more(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A worker that resumes after its lease ran out, and another worker took the rows, posts
    none of the rest: the other one does (only the post in flight can go twice)."""
    settings = make_settings(tmp_path)
    chat = Stalling(spec("chat"), settings.database)
    rig = Rig(settings, [chat], http)  # type: ignore[list-item]
    rig.store.open()
    rig.worker.lease = timedelta(seconds=0.3)
    try:
        await rig.post_verdicts(5)
        await rig.worker.run_once()
    finally:
        rig.store.close()
    assert len(chat.received) == 1


class RefusedOnce(OneByOne):
    """A chat destination whose first post is refused with a 429 asking to wait."""

    concurrency = 1

    def __init__(self, spec: SinkSpec, retry_after: float | None) -> None:
        super().__init__(spec)
        self.retry_after = retry_after
        self.posts: list[str] = []

    async def send(self, event: Event) -> None:
        self.posts.append(event["id"])
        if len(self.posts) == 1:
            raise SinkError("HTTP 429: rate_limited", retry_after=self.retry_after, limited=True)


async def test_a_429_holds_back_the_rest_for_its_retry_after_without_an_attempt(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    chat = RefusedOnce(spec("chat"), retry_after=600)
    rig = rig_for(tmp_path, http, [chat], retry_max=3600)  # type: ignore[list-item]
    try:
        await rig.post_verdicts(3)
        before = format_time(utcnow() + timedelta(seconds=600))
        await rig.worker.run_once()
        await rig.worker.run_once()
        rows = rig.rows("SELECT state, attempts, next_attempt_at FROM outbox ORDER BY id")
    finally:
        rig.store.close()
    assert len(chat.posts) == 1
    assert [(state, attempts) for state, attempts, _ in rows] == [("pending", 0)] * 3
    assert all(next_at >= before for _, _, next_at in rows)


@pytest.mark.parametrize("retry_after", [None, 0.5], ids=["no-retry-after", "shorter"])
async def test_a_429_holds_a_chat_sink_at_least_retry_base(
    tmp_path: Path, http: httpx.AsyncClient, retry_after: float | None
) -> None:
    """After a 429 nothing more is posted there for at least RECEIVER_RETRY_BASE (README), as
    the refused event waits. Without a Retry-After (or with one shorter) the sink was not held
    (or held for less), so each round posted the next new verdict into the limit: another 429,
    counted against the sender."""
    chat = RefusedOnce(spec("chat"), retry_after=retry_after)
    rig = rig_for(tmp_path, http, [chat], retry_base=600, retry_max=3600)  # type: ignore[list-item]
    try:
        for n in range(2):
            await rig.post("evaluation-completed.json", id=numbered(n))
            await rig.worker.run_once()
            await asyncio.sleep(0.6)  # past the shorter Retry-After, far from RETRY_BASE
        rows = rig.rows("SELECT state, attempts FROM outbox ORDER BY id")
    finally:
        rig.store.close()
    assert len(chat.posts) == 1
    assert rows == [("pending", 0)] * 2


class RefusedWhileStopping(RefusedOnce):
    """Its first post is answered (a 429) only once `gate` opens: the test stops the worker
    meanwhile."""

    def __init__(self, spec: SinkSpec, retry_after: float) -> None:
        super().__init__(spec, retry_after)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def send(self, event: Event) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().send(event)


async def test_a_stop_during_a_429_gives_the_held_back_events_back_for_its_retry_after(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A deploy stops the worker while a chat post is answered 429 (Retry-After 600): the
    rest of the batch is held back, not merely unsent. It was given back due at once, so the
    next process posted it straight into the limit."""
    chat = RefusedWhileStopping(spec("chat"), retry_after=600)
    rig = rig_for(tmp_path, http, [chat], retry_max=3600)  # type: ignore[list-item]
    try:
        await rig.post_verdicts(3)
        before = format_time(utcnow() + timedelta(seconds=600))
        await rig.worker.start()
        await asyncio.wait_for(chat.entered.wait(), 10)
        stopping = asyncio.create_task(rig.worker.stop(timeout=10))
        await asyncio.sleep(0)  # stop() has begun: the worker is stopping
        chat.gate.set()
        await stopping
        rows = rig.rows("SELECT state, attempts, next_attempt_at FROM outbox ORDER BY id")
    finally:
        rig.store.close()
    assert len(chat.posts) == 1
    assert [(state, attempts) for state, attempts, _ in rows] == [("pending", 0)] * 3
    assert all(next_at >= before for _, _, next_at in rows)


async def test_a_429_holds_a_chat_sink_no_longer_than_retry_max(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """RECEIVER_RETRY_MAX caps a destination's Retry-After, also while it holds the sink."""
    chat = RefusedOnce(spec("chat"), retry_after=86400)
    rig = rig_for(tmp_path, http, [chat], retry_max=60)  # type: ignore[list-item]
    try:
        await rig.post("evaluation-completed.json")
        await rig.worker.run_once()
        (result,) = await chat.deliver([{"id": "next", "type": "io.runflow.evaluation.completed"}])
    finally:
        rig.store.close()
    assert chat.posts == [event_id(EVALUATION_ID, "evaluation.completed")]
    assert isinstance(result, Deferred)
    assert 0 < result.retry_after <= 60


async def test_a_slow_sink_never_delays_the_others(tmp_path: Path, http: httpx.AsyncClient) -> None:
    slow, fast = SlowSink(spec("slow")), RecordingSink(spec("fast"))
    rig = rig_for(tmp_path, http, [slow, fast])
    await rig.worker.start()
    try:
        await rig.post("evaluation-completed.json")
        rig.worker.notify()
        for _ in range(100):
            if fast.received:
                break
            await asyncio.sleep(0.005)
        assert fast.received
        assert not slow.received  # still in flight while the fast sink is done
    finally:
        await rig.worker.stop()
        rig.store.close()
    assert len(slow.received) == 1  # stop() let the in-flight delivery finish


class LockedAfterSending(RecordingSink):
    """Delivers, then the database is write-locked from outside for `outage` seconds (an
    sqlite3 shell or a script holding BEGIN IMMEDIATE) just as the worker records it."""

    outage = 0.6

    def __init__(self, spec: SinkSpec, database: str) -> None:
        super().__init__(spec)
        self.database = database
        self.locked = False

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        if not self.locked:
            self.locked = True
            holder = sqlite3.connect(self.database, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(self.outage, holder.close)
        return await super().deliver(events)


@sqlite_only
async def test_a_store_failing_for_a_moment_after_a_send_does_not_send_it_again(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The event went out, then recording it failed (the database locked past the busy
    timeout; PostgreSQL restarting would do the same): the worker still knows what was sent
    and records it once the store takes writes again. It used to drop the outcome, so the
    forward was sent a second time when its lease ran out."""
    settings = make_settings(tmp_path)
    sink = LockedAfterSending(spec("s"), settings.database)
    rig = Rig(settings, [sink], http)
    rig.store.writer._busy_timeout = 0.1  # type: ignore[union-attr]
    rig.store.open()
    rig.worker.lease = timedelta(seconds=1.5)
    await rig.worker.start()
    try:
        await rig.post("evaluation-completed.json")
        rig.worker.notify()
        for _ in range(400):
            if rig.rows("SELECT state FROM outbox") == [("done",)]:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.0)  # past the lease: a forward not recorded would go out again
        states = rig.rows("SELECT state, attempts FROM outbox")
    finally:
        await rig.worker.stop()
        rig.store.close()
    assert [event["id"] for event in sink.received] == [
        event_id(EVALUATION_ID, "evaluation.completed")
    ]
    assert states == [("done", 1)]


class SlackLimit:
    """Slack's webhook limit in front of the fake: one message per `window` seconds, 429 with
    Retry-After for any other (the fake records only the accepted ones)."""

    def __init__(self, app: ASGIApp, window: float) -> None:
        self.app, self.window, self.last = app, window, -window

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        now = asyncio.get_running_loop().time()
        if scope["type"] != "http" or now - self.last >= self.window:
            if scope["type"] == "http":
                self.last = now
            await self.app(scope, receive, send)
            return
        wait = {"retry-after": f"{self.window:g}"}
        await Response("rate_limited", 429, headers=wait)(scope, receive, send)


async def test_a_rate_limited_chat_sink_delivers_a_burst_and_dead_letters_none(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A burst of verdicts to a Slack webhook that takes one message per 0.1 s: a 429 asks to
    wait, it is no failed delivery. Every 429 used to cost an attempt, and the rest of the
    batch went on being posted into the limit (429 each, one attempt each), so after
    max_attempts rounds all but a few of the burst were dead letters."""
    slack = FakeSlack()
    with serve_in_thread(SlackLimit(slack.app, 0.1)) as url:
        chat = SinkSpec(name="chat", type="slack", url=slack.url(url))
        settings = make_settings(tmp_path, retry_base=0.01, retry_max=1.0, max_attempts=3)
        rig = Rig(settings, [], http)
        rig.store = Store(settings.database, forwarding=Forwarding((chat,)))
        rig.worker = Worker(settings, rig.store, [build_sink(chat, http)], None)
        rig.store.open()
        try:
            for n in range(10):
                await rig.post("evaluation-completed.json", id=numbered(n), client_ref=f"job-{n}")
            for _ in range(100):
                if not rig.rows("SELECT 1 FROM outbox WHERE state = 'pending'"):
                    break
                await rig.worker.run_once()
                await asyncio.sleep(0.05)
            states = dict(rig.rows("SELECT state, count(*) FROM outbox GROUP BY state"))
        finally:
            rig.store.close()
    assert states == {"done": 10}
    subjects = [payload["text"] for payload in slack.payloads()]
    assert len(subjects) == len(set(subjects)) == 10


class Cancelling(RecordingSink):
    """A client library that raises CancelledError of its own (nothing cancelled it)."""

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        raise asyncio.CancelledError


async def test_a_sink_loop_that_dies_says_which_and_why(
    tmp_path: Path, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Only Exception is caught per round: anything else ended the sink's loop without a
    line, and /readyz's 503 did not say which sink stopped forwarding."""
    rig = rig_for(tmp_path, http, [Cancelling(spec("chat"))])
    await rig.worker.start()
    try:
        await rig.post("evaluation-completed.json")
        rig.worker.notify()
        for _ in range(200):
            if not rig.worker.running:
                break
            await asyncio.sleep(0.01)
        assert not rig.worker.running
    finally:
        await rig.worker.stop()
        rig.store.close()
    assert "worker loop for sink 'chat' stopped: CancelledError()" in caplog.text


async def test_a_lease_renewal_the_store_refuses_for_a_moment_does_not_send_the_batch_again(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A slow batch's lease renewal meets the store failing for a moment (locked, PostgreSQL
    restarting): the batch goes on and is recorded. The failed renewal used to cancel the
    sending and drop what went out, so the events already posted were posted again once the
    lease ran out, the very case recording with retries (_until_stored) was made for."""
    chat = OneAtATime(spec("chat"), delay=0.07)
    rig = rig_for(tmp_path, http, [chat])  # type: ignore[list-item]
    rig.worker.lease = timedelta(seconds=0.3)  # renewed every 0.1 s; the batch takes 0.28 s
    lease_forwards = rig.store.lease_forwards
    refused: list[int] = []

    async def failing_once(ids: list[int], held: str, until: str) -> set[int]:
        if ids and not refused:
            refused.append(len(ids))
            raise StoreUnavailable("database is locked")
        return await lease_forwards(ids, held, until)

    rig.store.lease_forwards = failing_once  # type: ignore[method-assign]
    try:
        await rig.post_verdicts(4)
        for _ in range(100):  # bounded: rounds until every forward is recorded
            with contextlib.suppress(StoreUnavailable):
                await rig.worker.run_once()
            if rig.rows("SELECT count(*) FROM outbox WHERE state = 'pending'") == [(0,)]:
                break
            await asyncio.sleep(0.05)
        states = rig.rows("SELECT state, attempts FROM outbox")
    finally:
        rig.store.close()
    assert refused
    assert len(chat.received) == len(set(chat.received)) == 4
    assert states == [("done", 1)] * 4


async def test_a_round_that_sent_all_it_claimed_takes_two_turns_of_the_writer(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Claim, then record: giving back what was not sent, nothing here, took a third turn
    (a transaction, and a wake-up of the event loop) in every round."""
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink])
    turns: list[object] = []
    run = rig.store.writer.run

    async def counted(operation: Any) -> Any:
        turns.append(operation)
        return await run(operation)

    try:
        await rig.post_verdicts(3)
        rig.store.writer.run = counted  # type: ignore[method-assign]
        assert await rig.worker.run_once() == 3
    finally:
        rig.store.close()
    assert len(sink.received) == 3
    assert len(turns) == 2


# Two verdicts of one evaluation queued before the worker sent the first: each event describes
# its own verdict (its callback), not the newer state. The evaluation was first seen running,
# with what it was asked to do; the verdict envelopes carry only their own fields.
VERDICT_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e77"
ASKED = {
    "id": VERDICT_ID,
    "status_code": "running",
    "client_ref": "job-77",
    "task_type": "headshot",
    "generated_image_url": "https://cdn.example.com/renders/job-77.png",
    "attempt_number": 1,
}
FAILED_CALLBACK = {
    "event": "evaluation.failed",
    "evaluation_id": VERDICT_ID,
    "status": "failed",
    "failure_code": "timed_out",
    "completed_at": "2026-11-20T09:15:03.500000+00:00",
}
COMPLETED_CALLBACK = {
    "event": "evaluation.completed",
    "evaluation_id": VERDICT_ID,
    "status": "completed",
    "overall_passed": True,
    "weighted_pass_rate": 0.9,
    "top_issues": [],
    "completed_at": "2026-11-20T09:16:10.000000+00:00",
}
FAILED_DATA = {
    "status": "failed",
    "passed": None,
    "score": None,
    "failure_code": "timed_out",
    "completed_at": "2026-11-20T09:15:03.500000Z",
}
COMPLETED_DATA = {
    "status": "completed",
    "passed": True,
    "score": 0.9,
    "failure_code": None,
    "completed_at": "2026-11-20T09:16:10.000000Z",
}
ASKED_DATA = {
    "client_ref": "job-77",
    "task_type": "headshot",
    "image_url": "https://cdn.example.com/renders/job-77.png",
    "attempt_number": 1,
}
TWO_VERDICTS = {
    # sink filters → the events it gets, in order
    "all": ({}, ["failed", "completed"]),
    # The failed event used to look completed and passed: this sink skipped it.
    "only-failures": ({"only_failures": True}, ["failed"]),
    "failed-only": ({"events": frozenset({"evaluation.failed"})}, ["failed"]),
    "completed-only": ({"events": frozenset({"evaluation.completed"})}, ["completed"]),
    "task-type": ({"task_types": frozenset({"headshot"})}, ["failed", "completed"]),
}


@pytest.mark.parametrize(("filters", "expected"), TWO_VERDICTS.values(), ids=TWO_VERDICTS.keys())
async def test_each_verdict_is_forwarded_as_itself_when_a_newer_one_came_first(
    tmp_path: Path, http: httpx.AsyncClient, filters: dict[str, Any], expected: list[str]
) -> None:
    sink = RecordingSink(spec("s", **filters))
    rig = rig_for(tmp_path, http, [sink])
    try:
        for body in (ASKED, FAILED_CALLBACK, COMPLETED_CALLBACK):
            await rig.post(json.dumps(body).encode())
        await rig.drain()
        stored = rig.rows("SELECT status, passed, failure_code FROM evaluations")
    finally:
        rig.store.close()
    assert stored == [("completed", 1, None)]
    assert [e["type"] for e in sink.received] == [f"io.runflow.evaluation.{v}" for v in expected]
    own = {"failed": FAILED_DATA, "completed": COMPLETED_DATA}
    for verdict, event in zip(expected, sink.received, strict=True):
        assert event["id"] == event_id(VERDICT_ID, f"evaluation.{verdict}")
        assert event["time"] == own[verdict]["completed_at"]
        assert event["data"]["refetched"] is False
        wanted = {**own[verdict], **ASKED_DATA}
        assert {key: event["data"][key] for key in wanted} == wanted


async def test_a_refetch_that_finds_a_newer_verdict_forwards_both_as_themselves(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """The failed callback is refetched, and Runflow already answers completed (it tried
    again): the completed verdict is the refetched state, the failed one its callback."""
    fake, url = runflow
    fake.faults.clear()
    asked = {key: ASKED[key] for key in ASKED if key != "status_code"}
    fake.add(VERDICT_ID, **asked, completed_at=COMPLETED_CALLBACK["completed_at"])
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post(json.dumps(FAILED_CALLBACK).encode())
        await rig.drain()
        forwards = rig.rows("SELECT event_type, delivery_id IS NULL FROM outbox ORDER BY id")
    finally:
        rig.store.close()
    assert forwards == [("evaluation.failed", 0), ("evaluation.completed", 1)]
    failed, completed = sink.received
    assert failed["type"] == "io.runflow.evaluation.failed"
    assert {key: failed["data"][key] for key in FAILED_DATA} == FAILED_DATA
    assert failed["data"]["refetched"] is False
    assert failed["data"]["issues"] == []
    assert failed["data"]["client_ref"] == "job-77"
    assert completed["type"] == "io.runflow.evaluation.completed"
    assert completed["data"]["status"] == "completed"
    assert completed["data"]["refetched"] is True
    assert completed["data"]["issues"]


def at_runflow(callback: dict[str, Any]) -> dict[str, Any]:
    """VERDICT_ID as Runflow's GET answers once `callback`'s verdict is its state (the fake's
    own lifecycle): a failed one without embeds, a completed one with the judges, action and
    gate failures, and what the callback says."""
    own = {k: v for k, v in callback.items() if k not in ("event", "evaluation_id", "status")}
    asked = {key: ASKED[key] for key in ASKED if key != "status_code"}
    running = {**template(), **dict.fromkeys(VERDICT_ONLY["completed"]), **asked}
    verdict = Verdict(callback["status"], failure_code=callback.get("failure_code"))
    return {**finished(running, verdict, 1000), **own}


def answering_rig(
    tmp_path: Path,
    http: httpx.AsyncClient,
    runflow: tuple[FakeRunflow, str],
    callback: dict[str, Any],
    **kw: Any,
) -> tuple[Rig, FakeRunflow, RecordingSink]:
    """A rig with one sink, refetching from Runflow's fake, whose GET answers `callback`'s
    verdict (at_runflow)."""
    fake, url = runflow
    fake.faults.clear()
    fake.evaluations[VERDICT_ID] = at_runflow(callback)
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url, **kw)
    return rig, fake, sink


async def while_asking(
    rig: Rig, fake: FakeRunflow, work: Coroutine[Any, Any, T], *bodies: dict[str, Any]
) -> T:
    """Run `work` and, once its GET has reached Runflow's fake (held there by a queued fault's
    delay), post `bodies`; then its result."""
    asked = len(fake.requests)
    task = asyncio.create_task(work)
    while len(fake.requests) == asked:
        await asyncio.sleep(0.005)
    for body in bodies:
        await rig.post(json.dumps(body).encode())
    return await task


async def verdict_change_rig(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str], **kw: Any
) -> tuple[Rig, FakeRunflow, RecordingSink]:
    """The failed callback, refetched and forwarded; then Runflow tried again and calls back
    completed (an envelope without `updated_at`: a tie the later arrival wins), while its GET
    still answers failed."""
    rig, fake, sink = answering_rig(tmp_path, http, runflow, FAILED_CALLBACK, **kw)
    await rig.post(json.dumps(ASKED).encode())
    await rig.post(json.dumps(FAILED_CALLBACK).encode())
    await rig.drain()
    assert rig.rows("SELECT status, refetched, refetch_state FROM evaluations") == [
        ("failed", 1, "done")
    ]
    await rig.post(json.dumps(COMPLETED_CALLBACK).encode())
    return rig, fake, sink


REFETCH_STATE = "SELECT status, refetched, refetch_state, refetch_attempts, refetch_error"
LAGGING = "Runflow still answers failed, not yet the completed verdict that followed it"


def assert_own_fields(events: list[dict[str, Any]], *, completed_refetched: bool) -> None:
    """The failed event then the completed one, each with its own verdict's fields; only the
    completed one refetched has its judges' issues and suggested action."""
    failed, completed = events
    assert failed["type"] == "io.runflow.evaluation.failed"
    assert {key: failed["data"][key] for key in FAILED_DATA} == FAILED_DATA
    assert (failed["data"]["refetched"], failed["data"]["issues"]) == (True, [])
    assert completed["type"] == "io.runflow.evaluation.completed"
    assert {key: completed["data"][key] for key in COMPLETED_DATA} == COMPLETED_DATA
    assert completed["data"]["refetched"] is completed_refetched
    assert bool(completed["data"]["issues"]) is completed_refetched
    assert bool(completed["data"]["action"]["improved_prompt"]) is completed_refetched


async def test_a_verdict_that_follows_a_refetched_one_is_refetched_itself(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """The completed verdict after a refetched failed one is refetched in its turn: its event
    waits for it and gets its judges, issues and action. It used to keep `refetched` from the
    failed verdict, and went out at once saying refetched with none of them."""
    rig, fake, sink = await verdict_change_rig(tmp_path, http, runflow)
    try:
        queued = rig.rows(REFETCH_STATE + " FROM evaluations")
        fake.evaluations[VERDICT_ID] = at_runflow(COMPLETED_CALLBACK)
        await rig.settle()
        done = rig.rows(REFETCH_STATE + " FROM evaluations")
        issues = rig.rows("SELECT count(*) FROM issues")
    finally:
        rig.store.close()
    assert queued == [("completed", 0, "pending", 0, None)]
    assert done == [("completed", 1, "done", 0, None)]
    assert issues[0][0] > 0
    assert_own_fields(sink.received, completed_refetched=True)


async def test_a_get_that_lags_the_newer_verdict_is_asked_again_until_it_catches_up(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Runflow's GET still answers failed after the completed callback: stored, it would win
    the tie and turn the evaluation back to failed. It is tried again with backoff instead,
    the completed verdict stays, its event waits (within the budget), and the refetch is
    stored once the GET has caught up."""
    rig, fake, sink = await verdict_change_rig(tmp_path, http, runflow)
    try:
        for _ in range(3):
            await rig.worker.run_once()
            await asyncio.sleep(0.02)  # past the retry's backoff
        lagging = rig.rows(REFETCH_STATE + ", passed, failure_code FROM evaluations")
        sent_while_lagging = [event["type"] for event in sink.received]
        fake.evaluations[VERDICT_ID] = at_runflow(COMPLETED_CALLBACK)
        await rig.settle()
        caught_up = rig.rows(REFETCH_STATE + " FROM evaluations")
    finally:
        rig.store.close()
    assert lagging == [("completed", 0, "pending", 3, LAGGING, 1, None)]
    assert sent_while_lagging == ["io.runflow.evaluation.failed"]
    assert caught_up == [("completed", 1, "done", 3, None)]
    assert_own_fields(sink.received, completed_refetched=True)


async def test_a_get_that_never_catches_up_ends_as_a_refetch_error_keeping_the_verdict(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Past RECEIVER_MAX_ATTEMPTS the refetch is `failed` with why, the completed verdict is
    kept, and its event goes out from the callback alone (`refetched: false`). The API's
    evaluation (and with it the dashboard and `receiver show`) says where the refetch stands."""
    rig, _, sink = await verdict_change_rig(tmp_path, http, runflow, max_attempts=3)
    try:
        await rig.settle()
        given_up = rig.rows(REFETCH_STATE + ", passed, failure_code FROM evaluations")
        detail = rig.store.get_evaluation(VERDICT_ID)
    finally:
        rig.store.close()
    assert given_up == [("completed", 0, "failed", 3, LAGGING, 1, None)]
    assert detail is not None
    refetch = detail["evaluation"]["refetch"]
    assert (refetch["state"], refetch["attempts"], refetch["error"]) == ("failed", 3, LAGGING)
    assert_own_fields(sink.received, completed_refetched=False)


async def test_a_verdict_left_behind_does_not_wait_for_the_refetch_of_the_one_that_followed(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Failed then completed before either was sent, Runflow's GET lagging: the failed event is
    built from its own callback, which no refetch of the completed verdict changes, so it goes
    out at once. It used to wait for that refetch, up to RECEIVER_REFETCH_BUDGET."""
    rig, _, sink = answering_rig(
        tmp_path, http, runflow, FAILED_CALLBACK, refetch_budget=3600, retry_base=60, retry_max=60
    )
    try:
        for body in (ASKED, FAILED_CALLBACK, COMPLETED_CALLBACK):
            await rig.post(json.dumps(body).encode())
        await rig.drain()
        waiting = rig.rows(
            "SELECT status, refetched, refetch_state, refetch_error FROM evaluations"
        )
        forwards = rig.rows("SELECT event_type, state FROM outbox ORDER BY id")
    finally:
        rig.store.close()
    assert waiting == [("completed", 0, "pending", LAGGING)]
    assert forwards == [("evaluation.failed", "done"), ("evaluation.completed", "pending")]
    (failed,) = sink.received
    assert {key: failed["data"][key] for key in FAILED_DATA} == FAILED_DATA
    assert failed["data"]["refetched"] is False


async def test_a_refetch_of_the_verdict_left_behind_failing_in_flight_leaves_the_new_one_due(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """The failed verdict's refetch is leased and its GET on the way when the completed callback
    starts the refetch over; the GET then fails, its last try. It used to be written over the
    new verdict's refetch: `failed` after no try of its own, so the completed event went out
    without its judges. Only the lease's holder records a failure now."""
    rig, fake, sink = answering_rig(tmp_path, http, runflow, COMPLETED_CALLBACK, max_attempts=1)
    try:
        await rig.post(json.dumps(ASKED).encode())
        await rig.post(json.dumps(FAILED_CALLBACK).encode())
        fake.fail_next(500, delay=0.5)
        await while_asking(rig, fake, rig.worker.run_once(), COMPLETED_CALLBACK)
        due = rig.rows(REFETCH_STATE + " FROM evaluations")
        await rig.settle()
        done = rig.rows(REFETCH_STATE + " FROM evaluations")
    finally:
        rig.store.close()
    assert due == [("completed", 0, "pending", 0, None)]
    assert done == [("completed", 1, "done", 0, None)]
    failed, completed = sink.received
    assert (failed["type"], failed["data"]["refetched"]) == ("io.runflow.evaluation.failed", False)
    assert completed["type"] == "io.runflow.evaluation.completed"
    assert completed["data"]["refetched"] is True
    assert completed["data"]["issues"]


async def test_a_get_older_than_the_callback_by_updated_at_is_not_its_refetch(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """The completed callback says when Runflow wrote it; a GET answering an older failed state
    (whose callback never came) loses to it under the state rules. It used to be stored all
    the same as the completed verdict's refetch: `refetched` with no judges."""
    fake, url = runflow
    fake.faults.clear()
    stale = {**at_runflow(FAILED_CALLBACK), "updated_at": "2026-11-20T09:15:03+00:00"}
    fake.evaluations[VERDICT_ID] = stale
    sink = RecordingSink(spec("s"))
    rig = rig_for(
        tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url, max_attempts=2
    )
    try:
        newer = {**COMPLETED_CALLBACK, "updated_at": "2026-11-20T09:16:10+00:00"}
        await rig.post(json.dumps(newer).encode())
        await rig.settle()
        given_up = rig.rows(REFETCH_STATE + " FROM evaluations")
    finally:
        rig.store.close()
    assert given_up == [("completed", 0, "failed", 2, LAGGING)]
    (event,) = sink.received
    assert (event["data"]["status"], event["data"]["refetched"]) == ("completed", False)


async def test_a_polled_verdict_followed_by_a_callback_is_forwarded_from_the_poll(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """Reconciliation found the failed verdict (a GET with the embeds); the completed callback
    came before the worker sent it: the failed event is the polled object, refetched."""
    fake, url = runflow
    fake.faults.clear()
    fake.add(
        VERDICT_ID,
        **{key: ASKED[key] for key in ASKED if key != "status_code"},
        status_code="failed",
        failure_code="timed_out",
        overall_passed=None,
        weighted_pass_rate=None,
        completed_at=FAILED_CALLBACK["completed_at"],
    )
    sink = RecordingSink(spec("s"))
    rig = rig_for(
        tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url, reconcile_after=0
    )
    try:
        await rig.post(json.dumps(ASKED).encode())
        assert (await rig.worker.reconcile())["verdicts"] == 1
        await rig.post(json.dumps(COMPLETED_CALLBACK).encode())
        fake.evaluations[VERDICT_ID] = at_runflow(COMPLETED_CALLBACK)  # its GET, refetched
        await rig.settle()
    finally:
        rig.store.close()
    failed, completed = sink.received
    assert failed["type"] == "io.runflow.evaluation.failed"
    assert {key: failed["data"][key] for key in FAILED_DATA} == FAILED_DATA
    assert failed["data"]["refetched"] is True
    assert completed["type"] == "io.runflow.evaluation.completed"
    assert completed["data"]["passed"] is True


async def test_a_poll_answering_the_verdict_left_behind_does_not_turn_it_back(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    """A poll claimed while the evaluation ran; its GET, slow and lagging, answers failed after
    the failed and then the completed callback came. Stored, it won the tie (no `updated_at`,
    the later arrival) and turned the evaluation back to failed, and marked it refetched. It is
    not stored, as a lagging refetch is not; the poll records why, and the completed verdict's
    own refetch goes on."""
    rig, fake, sink = answering_rig(tmp_path, http, runflow, FAILED_CALLBACK, reconcile_after=0)
    try:
        await rig.post(json.dumps(ASKED).encode())
        fake.fail_next(None, delay=0.5)  # the poll's GET answers late
        work = rig.worker.reconcile()
        counts = await while_asking(rig, fake, work, FAILED_CALLBACK, COMPLETED_CALLBACK)
        polled = rig.rows(
            REFETCH_STATE + ", passed, failure_code, next_poll_at, poll_error FROM evaluations"
        )
        sources = rig.rows("SELECT source, event FROM deliveries ORDER BY id")
        fake.evaluations[VERDICT_ID] = at_runflow(COMPLETED_CALLBACK)
        await rig.settle()
    finally:
        rig.store.close()
    assert polled == [("completed", 0, "pending", 0, None, 1, None, None, LAGGING)]
    assert counts == {"polled": 1, "verdicts": 0, "pending": 0, "errors": 1}
    assert [source for source, _ in sources] == ["webhook"] * 3
    failed, completed = sink.received
    assert (failed["type"], failed["data"]["refetched"]) == ("io.runflow.evaluation.failed", False)
    assert completed["type"] == "io.runflow.evaluation.completed"
    assert (completed["data"]["passed"], completed["data"]["refetched"]) == (True, True)


async def test_a_superseded_verdict_with_no_callback_of_its_own_is_skipped(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A verdict only a refetch saw (no delivery) and that a newer one followed before it was
    sent: nothing stored describes it any more, and the newer state is not sent under its
    type. It is skipped, saying why; the current verdict goes out."""
    sink = RecordingSink(spec("s"))
    rig = rig_for(tmp_path, http, [sink])
    try:
        await rig.post(json.dumps(FAILED_CALLBACK).encode())
        refetched = {**ASKED, **COMPLETED_CALLBACK, "status_code": "completed"}
        del refetched["status"], refetched["event"], refetched["evaluation_id"]
        refetched["updated_at"] = "2026-11-20T09:16:10.000000+00:00"
        await rig.store.refetched(refetched, format_time(utcnow()))
        later = {**FAILED_CALLBACK, "updated_at": "2026-11-20T09:17:00.000000+00:00"}
        await rig.post(json.dumps(later).encode())  # a later failed verdict is current again
        await rig.drain()
        forwards = rig.rows(
            "SELECT event_type, delivery_id IS NULL, state, last_error FROM outbox ORDER BY id"
        )
    finally:
        rig.store.close()
    assert forwards == [
        ("evaluation.failed", 0, "done", None),
        (
            "evaluation.completed",
            1,
            "skipped",
            "superseded by evaluation.failed before it was sent",
        ),
    ]
    (event,) = sink.received
    assert event["type"] == "io.runflow.evaluation.failed"
    assert {key: event["data"][key] for key in FAILED_DATA} == FAILED_DATA


# Both verdicts of one evaluation in every arrival order: the stored row, the API's answer,
# the statistics and each forwarded event say only the winning (or the event's own) verdict's
# fields. "refetch" is a worker round whose refetch GETs the completed object with its judges.
def verdict_body(status: str, second: int | None) -> bytes:
    own = (
        {**COMPLETED_CALLBACK, "top_issues": ["Collar asymmetry"], "cost": "0.0400"}
        if status == "completed"
        else FAILED_CALLBACK
    )
    stamp = {} if second is None else {"updated_at": f"2026-11-20T09:16:{second:02d}+00:00"}
    return json.dumps({**own, **stamp}).encode()


OWN_DATA = {
    "completed": {
        **COMPLETED_DATA,
        "top_issues": ["Collar asymmetry"],
        "top_strengths": [],
        "cost": "0.0400",
    },
    "failed": {
        **FAILED_DATA,
        "top_issues": [],
        "top_strengths": [],
        "issues": [],
        "gate_failures": [],
        "action": {"primary_action": None, "failure_summary": None, "improved_prompt": None},
        "cost": None,
    },
}
ROWS = {
    "completed": ("completed", 1, 0.9, None, '["Collar asymmetry"]'),
    "failed": ("failed", None, None, "timed_out", "[]"),
}
ORDERS = {
    # steps (verdict, updated_at second; "refetch": a worker round) → stored verdict, events
    "failed-then-completed": ([("failed", 1), ("completed", 2)], "completed"),
    "completed-then-failed": ([("completed", 1), ("failed", 2)], "failed"),
    "same-updated-at-completed-last": ([("failed", 1), ("completed", 1)], "completed"),
    "same-updated-at-failed-last": ([("completed", 1), ("failed", 1)], "failed"),
    "older-failed-arrives-last": ([("completed", 2), ("failed", 1)], "completed"),
    "older-completed-arrives-last": ([("failed", 2), ("completed", 1)], "failed"),
    "no-updated-at-completed-last": ([("failed", 1), ("completed", None)], "completed"),
    # Without updated_at on both, completed_at decides: this failed callback's (09:15:03) is
    # older than the completed one's (09:16:10), so it is a late one, not the newer verdict.
    "no-updated-at-failed-last": ([("completed", 1), ("failed", None)], "completed"),
    "refetch-in-between": ([("completed", 1), ("refetch", 0), ("failed", 2)], "failed"),
}


@pytest.mark.parametrize("sent_between", [False, True], ids=["queued", "sent-between"])
@pytest.mark.parametrize(("steps", "stored"), ORDERS.values(), ids=ORDERS.keys())
async def test_two_verdicts_in_any_order_keep_only_their_own_fields(
    tmp_path: Path,
    http: httpx.AsyncClient,
    runflow: tuple[FakeRunflow, str],
    steps: list[tuple[str, int | None]],
    stored: str,
    sent_between: bool,
) -> None:
    fake, url = runflow
    fake.faults.clear()
    refetched = {"overall_passed": True, "weighted_pass_rate": 0.9, "failure_code": None}
    fake.add(
        VERDICT_ID,
        **{key: ASKED[key] for key in ASKED if key != "status_code"},
        **{
            **refetched,
            "top_issues": ["Collar asymmetry"],
            "top_strengths": [],
            "completed_at": COMPLETED_CALLBACK["completed_at"],
            "updated_at": "2026-11-20T09:16:01+00:00",
        },
    )
    sink = RecordingSink(spec("s"))
    refetch = {"runflow_api_key": API_KEY, "runflow_api_base": url}
    rig = rig_for(tmp_path, http, [sink], **(refetch if ("refetch", 0) in steps else {}))
    try:
        await rig.post(json.dumps(ASKED).encode())
        for verdict, second in steps:
            if verdict != "refetch":
                await rig.post(verdict_body(verdict, second))
            if sent_between or verdict == "refetch":
                await rig.drain()
        await rig.settle()
        row = rig.rows("SELECT status, passed, score, failure_code, top_issues FROM evaluations")
        found = rig.store.get_evaluation(VERDICT_ID)
        passed = rig.store.list_evaluations(EvaluationFilter(passed=True))[0]
        overview = rig.store.stats(EvaluationFilter())
        conn = connect(rig.settings.database)
        try:
            scanned = scan_stats(conn, EvaluationFilter(), exact=True)
        finally:
            conn.close()
    finally:
        rig.store.close()
    assert row == [ROWS[stored]]
    assert found is not None
    status, passed_flag, score, failure_code, labels = ROWS[stored]
    assert {key: found["evaluation"][key] for key in ("status", "passed", "score")} == {
        "status": status,
        "passed": None if passed_flag is None else bool(passed_flag),
        "score": score,
    }
    assert found["evaluation"]["failure_code"] == failure_code
    assert found["evaluation"]["top_issues"] == json.loads(labels)
    runflow_object = found["evaluation"]["runflow"]
    assert runflow_object["overall_passed"] == (True if stored == "completed" else None)
    assert runflow_object.get("failure_code") == failure_code
    assert not runflow_object.get("judges") or stored == "completed"
    assert (found["issues"] != []) == (stored == "completed" and ("refetch", 0) in steps)
    assert [item["id"] for item in passed] == ([VERDICT_ID] if stored == "completed" else [])
    assert overview == scanned
    assert overview["by_status"] == {stored: 1}
    for event in sink.received:
        verdict = event["type"].removeprefix("io.runflow.evaluation.")
        wanted = OWN_DATA[verdict]
        assert {key: event["data"][key] for key in wanted} == wanted, verdict
        assert event["id"] == event_id(VERDICT_ID, f"evaluation.{verdict}")
    sent = [event["type"].removeprefix("io.runflow.evaluation.") for event in sink.received]
    assert sent[-1] == stored
    assert len(sent) == len(set(sent))
