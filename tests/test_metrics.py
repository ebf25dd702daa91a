"""GET /metrics: the webhook's counters and latency, the worker's forwards, refetches and
reconciliation, the outbox per sink, process metrics; token-protected; one registry per app;
summed over the processes of `receiver serve --workers 2`."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from receiver import supervisor
from receiver.app import create_app
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.metrics import Metrics, StoreCollector
from receiver.normalize import normalize, parse_body
from receiver.runflow import RunflowClient
from receiver.signing import sign
from receiver.sinks import SinkError
from receiver.sinkspec import SinkSpec
from receiver.store import Delivery, Forwarding, Store
from receiver.worker import Worker

from .database import POSTGRES, connect, sqlite_only
from .helpers import SECRET_A, TOKEN, RecordingSink, auth, fixture, make_settings, post_callback
from .postgres import PostgresService
from .servers import ReceiverProcess

EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
API_KEY = "rf_test_key"
RUNNING_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e12"
UNKNOWN_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e13"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics", headers=auth())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(response.text)


def with_id(name: str, evaluation_id: str) -> bytes:
    payload = json.loads(fixture(name))
    payload["id"] = evaluation_id
    return json.dumps(payload).encode()


def sink_spec(name: str, **filters: Any) -> SinkSpec:
    return SinkSpec(name=name, type="http", url="http://127.0.0.1:9/", **filters)


# the webhook


def test_callbacks_by_outcome_signature_failures_and_latency(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_body_bytes=4096, worker=False)
    with TestClient(create_app(settings)) as client:
        good = fixture("evaluation-completed.json")
        assert post_callback(client, good).json()["outcome"] == "stored"
        assert post_callback(client, good).json()["outcome"] == "duplicate"
        assert post_callback(client, fixture("run-completed.json")).json()["outcome"] == "ignored"
        assert post_callback(client, good, secret="whsec_wrong").status_code == 401
        assert post_callback(client, good, secret=None).status_code == 401
        assert post_callback(client, b"[1, 2]").status_code == 400
        assert post_callback(client, b'{"pad": "' + b"a" * 5000 + b'"}').status_code == 413
        found = scrape(client)
    expected = {
        "stored": 1,
        "duplicate": 1,
        "ignored": 1,
        "bad_signature": 2,
        "bad_request": 1,
        "too_large": 1,
        "timeout": 0,
        "unavailable": 0,
        "error": 0,
    }
    for outcome, number in expected.items():
        assert value(found, "receiver_callbacks_total", outcome=outcome) == number, outcome
    assert value(found, "receiver_signature_failures_total") == 2
    # verify → commit is observed for the three acknowledged callbacks, refusals are not
    assert value(found, "receiver_ingest_seconds_count") == 3
    assert value(found, "receiver_ingest_seconds_bucket", le="+Inf") == 3
    assert 0 < (value(found, "receiver_ingest_seconds_sum") or 0) < 30
    assert value(found, "receiver_ingest_seconds_bucket", le="0.001") is not None  # ms buckets
    # process and platform collectors, no *_created series
    assert value(found, "process_resident_memory_bytes")
    assert any(name == "python_info" for name, _ in found)
    assert not any(name.endswith("_created") for name, _ in found)


@sqlite_only
def test_a_store_that_cannot_write_counts_as_unavailable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker=False)
    store = Store(settings.database, busy_timeout=0.05)
    with TestClient(create_app(settings, store=store)) as client:
        blocker = sqlite3.connect(settings.database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            assert post_callback(client, fixture("evaluation-completed.json")).status_code == 503
        finally:
            blocker.execute("ROLLBACK")
        found = scrape(client)
    assert value(found, "receiver_callbacks_total", outcome="unavailable") == 1
    assert value(found, "receiver_ingest_seconds_count") == 0


def test_outbox_depth_and_dead_letters_per_sink(tmp_path: Path) -> None:
    sinks = (sink_spec("hook"), sink_spec("quiet", events=frozenset({"evaluation.failed"})))
    settings = make_settings(tmp_path, sinks=sinks, worker=False)
    with TestClient(create_app(settings)) as client:
        for number in range(3):
            body = with_id("evaluation-completed.json", f"e-{number}")
            assert post_callback(client, body).json()["outcome"] == "stored"
        conn = connect(settings.database)
        with conn:
            conn.execute("UPDATE outbox SET state = 'dead' WHERE id = (SELECT min(id) FROM outbox)")
        conn.close()
        found = scrape(client)
    assert value(found, "receiver_outbox", sink="hook", state="pending") == 2
    assert value(found, "receiver_outbox", sink="hook", state="dead") == 1
    assert value(found, "receiver_outbox", sink="hook", state="done") == 0
    assert value(found, "receiver_dead_letters", sink="hook") == 1
    assert value(found, "receiver_apply_backlog") == 0  # every callback applied
    # a configured sink with nothing for it yet still has its series, at zero
    assert value(found, "receiver_outbox", sink="quiet", state="pending") == 0
    assert value(found, "receiver_dead_letters", sink="quiet") == 0
    # and the worker's counters exist for each sink before anything was forwarded
    assert value(found, "receiver_forwards_total", sink="hook", result="done") in (None, 0)


def test_a_failing_outbox_read_drops_only_those_gauges(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, dict[str, int]]:
        raise sqlite3.OperationalError("disk I/O error")

    metrics = Metrics()
    metrics.expose(broken, ["hook"])
    with caplog.at_level("ERROR", logger="receiver.metrics"):
        body, _ = metrics.render(None)
    found = samples(body.decode())
    assert value(found, "receiver_callbacks_total", outcome="stored") == 0
    assert value(found, "receiver_dead_letters", sink="hook") is None
    assert value(found, "receiver_store_up") == 0
    assert "cannot read the outbox depth" in caplog.text


def test_registering_the_outbox_collector_does_not_read_the_store() -> None:
    calls: list[int] = []

    def depth() -> dict[str, dict[str, int]]:
        calls.append(1)
        return {}

    Metrics().expose(depth, ["hook"], apply_backlog=lambda: calls.append(1) or 0)
    assert calls == []
    assert [family.name for family in StoreCollector(depth, []).describe()] == [
        "receiver_store_up",
        "receiver_outbox",
        "receiver_dead_letters",
    ]


@pytest.mark.parametrize("queued", [0, 7])
def test_the_apply_backlog_is_a_gauge(queued: int) -> None:
    metrics = Metrics()
    metrics.expose(dict, ["hook"], apply_backlog=lambda: queued)
    body, _ = metrics.render(None)
    assert value(samples(body.decode()), "receiver_apply_backlog") == queued


@pytest.mark.skipif(not POSTGRES, reason="a PostgreSQL server that is down")
def test_a_scrape_answers_at_once_while_postgresql_is_down(
    tmp_path: Path, postgres_server: PostgresService
) -> None:
    """The outbox read waited POOL_TIMEOUT (10 s) for a connection, as long as a scraper
    waits: the scrape failed whole. Now the store's gauges are left out and say so, and the
    rest is served."""
    settings = make_settings(tmp_path, worker=False)
    with serve_in_thread(create_app(settings)) as url:
        assert value(scraped(url), "receiver_apply_backlog") == 0
        postgres_server.stop()
        try:
            found = scraped(url, timeout=8.0)  # under POOL_TIMEOUT: the old scrape got nothing
        finally:
            postgres_server.start()
        assert value(found, "receiver_store_up") == 0
        assert value(found, "receiver_apply_backlog") is None  # needs the database
        assert value(found, "receiver_callbacks_total", outcome="stored") == 0
        assert any(name.startswith("process_") for name, _ in found)


@sqlite_only
def test_a_scrape_answers_while_another_process_holds_the_writers_turn_and_lock(
    tmp_path: Path,
) -> None:
    """SQLite's readers do not wait for writers (WAL): the gauges are read while another
    process holds the writers' flock and a write transaction."""
    settings = make_settings(tmp_path, worker=False)
    with serve_in_thread(create_app(settings)) as url:
        turns = os.open(f"{settings.database}-writer.lock", os.O_RDONLY | os.O_CREAT)
        writer = sqlite3.connect(settings.database, isolation_level=None)
        try:
            fcntl.flock(turns, fcntl.LOCK_EX)
            writer.execute("BEGIN IMMEDIATE")
            found = scraped(url, timeout=8.0)
        finally:
            writer.close()
            os.close(turns)
    assert value(found, "receiver_store_up") == 1
    assert value(found, "receiver_apply_backlog") == 0


def scraped(url: str, timeout: float = 30.0) -> Samples:
    response = httpx.get(f"{url}/metrics", headers=auth(), timeout=timeout)
    assert response.status_code == 200, response.text
    return samples(response.text)


# access


def test_metrics_need_a_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, metrics_token="scrape-only-token", worker=False)
    with TestClient(create_app(settings)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "RECEIVER_METRICS_TOKEN" in refused.json()["error"]
        assert client.get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        assert client.get("/metrics", headers=auth()).status_code == 200
        scraper = {"authorization": "Bearer scrape-only-token"}
        assert client.get("/metrics", headers=scraper).status_code == 200
        # the metrics token opens nothing else
        assert client.get("/api/evaluations", headers=scraper).status_code == 401
        assert client.get("/", headers=scraper, follow_redirects=False).status_code != 200


def test_without_a_metrics_token_only_the_dashboard_token_works(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, worker=False))) as client:
        assert client.get("/metrics", headers={"authorization": "Bearer "}).status_code == 401
        assert client.get("/metrics", headers=auth()).status_code == 200


def test_openmetrics_when_the_scraper_asks(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, worker=False))) as client:
        response = client.get(
            "/metrics", headers={**auth(), "accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "receiver_callbacks_total" in response.text


def test_each_app_has_its_own_registry_and_the_global_one_stays_empty(tmp_path: Path) -> None:
    one = make_settings(tmp_path / "one", worker=False)
    two = make_settings(tmp_path / "two", worker=False)
    with TestClient(create_app(one)) as first, TestClient(create_app(two)) as second:
        post_callback(first, fixture("evaluation-completed.json"))
        assert value(scrape(first), "receiver_callbacks_total", outcome="stored") == 1
        assert value(scrape(second), "receiver_callbacks_total", outcome="stored") == 0
    assert REGISTRY.get_sample_value("receiver_callbacks_total", {"outcome": "stored"}) is None


# the worker


@pytest.fixture(scope="module")
def runflow() -> Iterator[tuple[FakeRunflow, str]]:
    fake = FakeRunflow(API_KEY)
    with serve_in_thread(fake.app) as url:
        yield fake, url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield client


class Rig:
    def __init__(
        self, tmp_path: Path, http: httpx.AsyncClient, sinks: list[RecordingSink], **kw: Any
    ) -> None:
        self.settings = make_settings(tmp_path, retry_base=0.001, retry_max=0.01, **kw)
        forwarding = Forwarding(
            tuple(s.spec for s in sinks), self.settings.refetch, self.settings.reconcile_after
        )
        self.store = Store(self.settings.database, forwarding=forwarding)
        self.metrics = Metrics()
        client = RunflowClient(http, base=self.settings.runflow_api_base, api_key=API_KEY)
        self.worker = Worker(self.settings, self.store, sinks, client, metrics=self.metrics)
        self.store.open()

    async def post(self, body: bytes) -> None:
        await self.store.ingest(Delivery(body, normalize(parse_body(body))))

    async def drain(self) -> None:
        for _ in range(50):
            if not await self.worker.run_once():
                return

    def count(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.mark.anyio
async def test_forwards_by_sink_and_result(tmp_path: Path, http: httpx.AsyncClient) -> None:
    flaky = RecordingSink(sink_spec("flaky"))
    flaky.failures = [SinkError("HTTP 503"), SinkError("HTTP 410", permanent=True)]
    steady = RecordingSink(sink_spec("steady"))
    rig = Rig(tmp_path, http, [flaky, steady])
    try:
        for number in range(3):
            await rig.post(with_id("evaluation-completed.json", f"e-{number}"))
        await rig.drain()
    finally:
        rig.store.close()
    assert rig.count("receiver_forwards_total", sink="flaky", result="retry") == 1
    assert rig.count("receiver_forwards_total", sink="flaky", result="dead") == 1
    assert rig.count("receiver_forwards_total", sink="flaky", result="done") == 2
    assert rig.count("receiver_forwards_total", sink="steady", result="done") == 3
    assert rig.count("receiver_forwards_total", sink="steady", result="skipped") == 0


@pytest.mark.anyio
async def test_skipped_forwards_and_refetch_results(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.faults.clear()
    fake.add(EVALUATION_ID)
    fake.fail_next(500)  # one retry, then the refetch works
    sink = RecordingSink(sink_spec("portraits", task_types=frozenset({"portrait"})))
    rig = Rig(tmp_path, http, [sink], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post(fixture("evaluation-completed-envelope.json"))  # no task_type yet
        for _ in range(100):
            await rig.worker.run_once()
            if rig.count("receiver_forwards_total", sink="portraits", result="skipped"):
                break
    finally:
        rig.store.close()
    assert rig.count("receiver_refetch_total", result="retry") == 1
    assert rig.count("receiver_refetch_total", result="ok") == 1
    assert rig.count("receiver_refetch_total", result="failed") == 0
    assert rig.count("receiver_forwards_total", sink="portraits", result="skipped") == 1


@pytest.mark.anyio
async def test_a_refetch_refused_for_good_counts_as_failed(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.faults.clear()
    fake.evaluations.pop(EVALUATION_ID, None)  # 404
    rig = Rig(tmp_path, http, [], runflow_api_key=API_KEY, runflow_api_base=url)
    try:
        await rig.post(fixture("evaluation-completed-envelope.json"))
        await rig.drain()
    finally:
        rig.store.close()
    assert rig.count("receiver_refetch_total", result="failed") == 1
    assert rig.count("receiver_refetch_total", result="ok") == 0


@pytest.mark.anyio
async def test_reconcile_results(
    tmp_path: Path, http: httpx.AsyncClient, runflow: tuple[FakeRunflow, str]
) -> None:
    fake, url = runflow
    fake.faults.clear()
    fake.add(EVALUATION_ID)  # completed at Runflow
    fake.add(RUNNING_ID, status_code="running", completed_at=None)
    rig = Rig(tmp_path, http, [], runflow_api_key=API_KEY, runflow_api_base=url, reconcile_after=0)
    try:
        for evaluation_id in (EVALUATION_ID, RUNNING_ID, UNKNOWN_ID):
            running = json.loads(fixture("evaluation-completed.json"))
            running.update(id=evaluation_id, status_code="running", completed_at=None)
            await rig.post(json.dumps(running).encode())
        counts = await rig.worker.reconcile()
    finally:
        rig.store.close()
    assert counts == {"polled": 3, "verdicts": 1, "pending": 1, "errors": 1}
    assert rig.count("receiver_reconcile_total", result="verdicts") == 1
    assert rig.count("receiver_reconcile_total", result="pending") == 1
    assert rig.count("receiver_reconcile_total", result="errors") == 1


# several processes


def test_serve_with_two_workers_sums_every_process(tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    posted = 24
    with ReceiverProcess(
        tmp_path, "--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(shared), RECEIVER_WORKER="false"
    ) as server:
        for number in range(posted):
            body = with_id("evaluation-completed.json", f"e-{number}")
            headers = {
                "content-type": "application/json",
                "runflow-signature": sign(body, SECRET_A),
            }
            # a new connection each time, so the two processes share the load
            response = httpx.post(f"{server.url}/webhooks/runflow", content=body, headers=headers)
            assert response.json()["outcome"] == "stored"
        bad = httpx.post(f"{server.url}/webhooks/runflow", content=b"{}", headers={})
        assert bad.status_code == 401
        scrapes = []
        for _ in range(6):
            response = httpx.get(
                f"{server.url}/metrics", headers={"authorization": f"Bearer {TOKEN}"}
            )
            assert response.status_code == 200
            scrapes.append(samples(response.text))
    pids = {path.stem.rsplit("_", 1)[1] for path in shared.glob("counter_*.db")}
    assert len(pids) == 2  # both processes counted into the shared directory
    noted = "on SQLite the workers take turns on one write lock" in server.log.read_text()
    assert noted is not POSTGRES  # a note at start, on SQLite only
    for found in scrapes:  # whichever process answered, the sum over both
        assert value(found, "receiver_callbacks_total", outcome="stored") == posted
        assert value(found, "receiver_callbacks_total", outcome="bad_signature") == 1
        assert value(found, "receiver_signature_failures_total") == 1
        assert value(found, "receiver_ingest_seconds_count") == posted


def test_serve_with_workers_makes_and_removes_a_shared_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with supervisor.shared_metrics_dir() as directory:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
        assert Path(directory).is_dir()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert not Path(directory).exists()


def test_a_given_shared_directory_is_used_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with supervisor.shared_metrics_dir() as directory:
        assert directory == str(tmp_path)
    assert tmp_path.is_dir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(Exception, match="PROMETHEUS_MULTIPROC_DIR: no such directory"):
        supervisor.given_metrics_dir()
