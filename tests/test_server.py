"""The real server: uvicorn in its own process, concurrent clients, restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import httpx

from receiver.signing import sign

from .database import connect
from .helpers import SECRET_A, TOKEN
from .servers import ReceiverProcess, run_cli


def _body(number: int) -> bytes:
    return json.dumps(
        {
            "id": f"0193a7c2-0000-7000-8000-{number:012d}",
            "status_code": "completed",
            "client_ref": f"job-{number % 50}",
            "overall_passed": number % 3 != 0,
            "weighted_pass_rate": (number % 10) / 10,
            "task_type": "headshot",
            "completed_at": "2026-11-20T09:14:43.352000+00:00",
        }
    ).encode()


async def _post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/webhooks/runflow",
                    content=body,
                    headers={"runflow-signature": sign(body, SECRET_A)},
                )
                for body in bodies
            )
        )


def test_hundreds_of_concurrent_callbacks_are_each_stored_once(tmp_path: Path) -> None:
    bodies = [_body(n) for n in range(300)]
    replays = bodies[::3]
    with ReceiverProcess(tmp_path) as server:
        responses = asyncio.run(_post_all(server.url, bodies + replays))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses[:3]]
    outcomes = [r.json()["outcome"] for r in responses]
    assert outcomes.count("stored") == 300
    assert outcomes.count("duplicate") == len(replays)
    conn = connect(tmp_path / "receiver.db")
    assert conn.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 300
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 300
    assert conn.execute("SELECT sum(receipts) FROM deliveries").fetchone()[0] == 300 + len(replays)
    assert conn.execute("SELECT count(*) FROM client_refs").fetchone()[0] == 50


def test_a_restart_keeps_everything_acknowledged(tmp_path: Path) -> None:
    bodies = [_body(n) for n in range(40)]
    server = ReceiverProcess(tmp_path).start()
    asyncio.run(_post_all(server.url, bodies[:20]))
    server.stop(signal.SIGKILL)
    with ReceiverProcess(tmp_path) as again:
        asyncio.run(_post_all(again.url, bodies[20:]))
        page = httpx.get(
            f"{again.url}/api/evaluations",
            params={"limit": 100},
            headers={"authorization": f"Bearer {TOKEN}"},
        ).json()
    assert len(page["items"]) == 40


def test_send_test_reaches_a_live_server_and_the_cli_sees_it(tmp_path: Path) -> None:
    with ReceiverProcess(tmp_path) as server:
        url = f"{server.url}/webhooks/runflow"
        sent = run_cli("send-test", url, "--client-ref", "newcomer-1", cwd=tmp_path, env=server.env)
        assert sent.returncode == 0, sent.stderr
        assert '"outcome":"stored"' in sent.stdout
        shown = run_cli(
            "query", "--client-ref", "newcomer-1", "--json", cwd=tmp_path, env=server.env
        )
    (item,) = json.loads(shown.stdout)
    assert item["status"] == "completed"


async def _post_and_stop(server: ReceiverProcess, bodies: list[bytes]) -> list[int | None]:
    """Post every body at once and SIGTERM the server while they are in flight: each answer's
    status, or None where the connection ended without one."""
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:

        async def post(body: bytes) -> int | None:
            try:
                response = await client.post(
                    "/webhooks/runflow",
                    content=body,
                    headers={"runflow-signature": sign(body, SECRET_A)},
                )
            except httpx.HTTPError:
                return None
            return response.status_code

        posts = [asyncio.create_task(post(body)) for body in bodies]
        while sum(task.done() for task in posts) < len(bodies) // 4:
            await asyncio.sleep(0.01)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        return await asyncio.gather(*posts)


def test_a_graceful_stop_under_load_keeps_every_acknowledged_callback(tmp_path: Path) -> None:
    """Callbacks in flight when the server is told to stop are answered 200 and kept, or get
    no answer (Runflow retries those); none is answered and lost, and a restart applies all."""
    bodies = [_body(n) for n in range(1000)]
    server = ReceiverProcess(tmp_path).start()
    statuses = asyncio.run(_post_and_stop(server, bodies))
    assert server.stop() == 0
    acknowledged = {
        json.loads(body)["id"]
        for body, status in zip(bodies, statuses, strict=True)
        if status == 200
    }
    assert set(statuses) <= {200, None, 503}
    assert len(acknowledged) >= len(bodies) // 4
    conn = connect(tmp_path / "receiver.db")
    stored = {row[0] for row in conn.execute("SELECT evaluation_id FROM deliveries")}
    assert acknowledged <= stored
    conn.close()
    with ReceiverProcess(tmp_path) as again:  # a read applies what is still queued first
        httpx.get(
            f"{again.url}/api/evaluations",
            params={"limit": 1},
            headers={"authorization": f"Bearer {TOKEN}"},
        ).raise_for_status()
    conn = connect(tmp_path / "receiver.db")
    assert conn.execute("SELECT count(*) FROM evaluations").fetchone()[0] == len(stored)
    assert conn.execute("SELECT count(*) FROM apply_queue").fetchone()[0] == 0


def test_a_second_ctrl_c_forces_the_stop_with_status_130(tmp_path: Path) -> None:
    """uvicorn leaves without the app's shutdown then: it exited 0, after an ERROR traceback
    of the shutdown that never came."""
    with (
        ReceiverProcess(tmp_path) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sender,
    ):
        assert server.process is not None
        sender.sendall(b"POST /webhooks/runflow HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
        time.sleep(0.2)  # its body never comes: the first Ctrl-C waits for it
        server.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 20
        while b"Waiting for connections to close" not in server.log.read_bytes():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.05)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=20) == 130
    log = server.log.read_text()
    assert "forced to stop" in log
    assert "Traceback" not in log
