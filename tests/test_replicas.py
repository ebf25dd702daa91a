"""Many replicas on one PostgreSQL: two `receiver serve` and two `receiver worker` processes, a
load of callbacks split between the servers with every one also sent to the other server (as
Runflow's retry might land), and one worker SIGKILLed mid-run. Every verdict is stored once and
forwarded once per sink (by event id)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from receiver.events import event_id
from receiver.fakes.recorder import Recorder
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign

from .database import connect
from .helpers import SECRET_A
from .postgres import PostgresService
from .servers import ReceiverProcess, WorkerProcess
from .services import RedisService

CALLBACKS = 120
EVENT = "evaluation.completed"


def callback(number: int) -> tuple[str, bytes]:
    evaluation_id = f"0193a7c2-5b1e-7c3d-9f10-{number:012d}"
    body = {
        "id": evaluation_id,
        "status_code": "completed",
        "client_ref": f"job-{number % 17}",
        "task_type": "headshot",
        "overall_passed": number % 3 != 0,
        "overall_score": (number % 10) / 10,
        "completed_at": f"2026-11-20T09:{number // 60:02d}:{number % 60:02d}+00:00",
    }
    return evaluation_id, json.dumps(body).encode()


@pytest.fixture
def database(postgres_server: PostgresService) -> Iterator[str]:
    url = postgres_server.create()
    yield url
    postgres_server.drop(url)


async def send(client: httpx.AsyncClient, url: str, body: bytes) -> str:
    response = await client.post(
        f"{url}/webhooks/runflow",
        content=body,
        headers={"runflow-signature": sign(body, SECRET_A)},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["outcome"])


async def load(urls: tuple[str, str], numbers: range) -> list[str]:
    """Each callback to its server and, at the same moment, to the other one."""
    async with httpx.AsyncClient(timeout=30) as client:
        sends = []
        for number in numbers:
            _, body = callback(number)
            first, second = urls if number % 2 else urls[::-1]
            sends += [send(client, first, body), send(client, second, body)]
        return await asyncio.gather(*sends)


def unfinished(database: str) -> int:
    conn = connect(database)
    try:
        (count,) = conn.execute("SELECT count(*) FROM outbox WHERE state != 'done'").fetchone()
        return int(count)
    finally:
        conn.close()


def test_two_servers_and_two_workers_store_and_forward_each_verdict_once(
    tmp_path: Path, database: str, redis_server: RedisService, stream: str
) -> None:
    recorder = Recorder()
    with ExitStack() as stack:
        hooks = stack.enter_context(serve_in_thread(recorder.app))
        config = tmp_path / "receiver.toml"
        config.write_text(
            f'[[sinks]]\nname = "queue"\ntype = "redis"\nurl = "{redis_server.url}"\n'
            f'stream = "{stream}"\n\n'
            f'[[sinks]]\nname = "consumer"\ntype = "http"\nurl = "{hooks}/hooks"\n'
        )
        env = {
            "RECEIVER_DATABASE": database,
            "RECEIVER_CONFIG": str(config),
            "RECEIVER_WORKER": "false",
            "RECEIVER_RETRY_BASE": "0.05",
            "RECEIVER_RETRY_MAX": "0.5",
            "RECEIVER_LEASE": "3",
        }
        servers = []
        for name in ("server-a", "server-b"):
            (tmp_path / name).mkdir()
            servers.append(stack.enter_context(ReceiverProcess(tmp_path / name, **env)))
        workers = []
        for name in ("worker-a", "worker-b"):
            (tmp_path / name).mkdir()
            worker_env = {**servers[0].env, **env}
            workers.append(stack.enter_context(WorkerProcess(tmp_path / name, worker_env)))
        urls = (servers[0].url, servers[1].url)

        outcomes = asyncio.run(load(urls, range(CALLBACKS // 2)))
        workers[0].stop(signal.SIGKILL)  # mid-run: whatever it had claimed waits out its lease
        outcomes += asyncio.run(load(urls, range(CALLBACKS // 2, CALLBACKS)))

        expected = {event_id(callback(n)[0], EVENT) for n in range(CALLBACKS)}
        deadline = time.monotonic() + 90
        while (
            len(set(redis_server.stream_ids(stream))) < CALLBACKS
            or len({r.headers["webhook-id"] for r in recorder.received}) < CALLBACKS
            or unfinished(database)
        ):  # a forward the killed worker sent but did not record waits out its lease
            assert time.monotonic() < deadline, "the forwards did not all arrive in time"
            time.sleep(0.2)
        time.sleep(1.0)  # anything doubled would arrive now

    assert sorted(outcomes) == sorted(["stored"] * CALLBACKS + ["duplicate"] * CALLBACKS)
    assert sorted(redis_server.stream_ids(stream)) == sorted(expected)  # once each
    delivered = [json.loads(r.body)["id"] for r in recorder.received]
    assert set(delivered) == expected
    assert all(r.headers["webhook-id"] == json.loads(r.body)["id"] for r in recorder.received)
    conn = connect(database)
    try:
        assert conn.execute("SELECT count(*), sum(receipts) FROM deliveries").fetchone() == (
            CALLBACKS,
            2 * CALLBACKS,
        )
        assert conn.execute("SELECT count(*) FROM evaluations").fetchone()[0] == CALLBACKS
        assert conn.execute("SELECT sum(evaluations) FROM client_refs").fetchone()[0] == CALLBACKS
        forwards = conn.execute(
            "SELECT sink, state, count(*), count(DISTINCT event_id) FROM outbox GROUP BY 1, 2"
        ).fetchall()
        assert sorted(forwards) == [
            ("consumer", "done", CALLBACKS, CALLBACKS),
            ("queue", "done", CALLBACKS, CALLBACKS),
        ]
        (total,) = conn.execute("SELECT sum(count) FROM rollup_daily").fetchone()
        assert total == CALLBACKS
    finally:
        conn.close()
