"""Slow senders: a callback whose body does not arrive in full within RECEIVER_BODY_TIMEOUT gets
408 and its connection closed, while other clients keep being served. Run against both HTTP
parsers uvicorn may use: httptools (what `receiver serve` picks) and h11."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from receiver.app import create_app
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign

from .database import connect
from .helpers import SECRET_A, make_settings
from .servers import ReceiverProcess

BODY_TIMEOUT = 1.0
# How long past the budget a 408 may take to arrive (a loaded CI machine is slow).
GRACE = 4.0


@contextmanager
def receiver(tmp_path: Path, parser: str) -> Iterator[tuple[str, str]]:
    """(base URL, database file) of a receiver with a one-second body budget."""
    if parser == "httptools":
        with ReceiverProcess(tmp_path, RECEIVER_BODY_TIMEOUT=str(BODY_TIMEOUT)) as server:
            yield server.url, tmp_path / "receiver.db"
    else:
        settings = make_settings(tmp_path, body_timeout=BODY_TIMEOUT, worker=False)
        with serve_in_thread(create_app(settings)) as url:
            yield url, settings.database


def _callback(evaluation_id: str) -> bytes:
    return json.dumps({"id": evaluation_id, "status": "completed", "padding": "x" * 400}).encode()


def _head(body: bytes) -> bytes:
    return (
        "POST /webhooks/runflow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRunflow-Signature: {sign(body, SECRET_A)}\r\n\r\n"
    ).encode()


def _connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + GRACE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if not)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _read_one_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length bytes of body) on a kept-alive connection."""
    received = b""
    while True:
        head, found, body = received.partition(b"\r\n\r\n")
        if found:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            assert length is not None, head
            if len(body) >= int(length.group(1)):
                return received
        chunk = sock.recv(65536)
        assert chunk, "closed before a whole response"
        received += chunk


def _status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    return status, json.loads(body)


def _trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """One byte every 50 ms: always sending, never finishing within the budget."""
    for byte in data:
        if stop.wait(0.05):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:  # the server closed the connection: what we expect
            return


def _count(database: Path | str, table: str) -> int:
    conn = connect(database)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_slow_bodies_get_408_and_are_cut_off_while_others_are_served(
    tmp_path: Path, parser: str
) -> None:
    with receiver(tmp_path, parser) as (url, database):
        started = time.monotonic()
        stalled = []
        for number in range(8):  # headers and a few bytes, then nothing more
            body = _callback(f"stalled-{number}")
            sock = _connect(url)
            sock.sendall(_head(body) + body[:10])
            stalled.append(sock)
        trickling_body = _callback("trickling")
        trickler = _connect(url)
        trickler.sendall(_head(trickling_body))
        stop = threading.Event()
        thread = threading.Thread(target=_trickle, args=(trickler, trickling_body, stop))
        thread.start()
        try:
            # Meanwhile other clients are answered at once, every one of them.
            with httpx.Client(base_url=url, timeout=5) as client:
                for number in range(5):
                    body = _callback(f"prompt-{number}")
                    sent = time.monotonic()
                    response = client.post(
                        "/webhooks/runflow",
                        content=body,
                        headers={"runflow-signature": sign(body, SECRET_A)},
                    )
                    assert response.status_code == 200, response.text
                    assert time.monotonic() - sent < BODY_TIMEOUT / 2
            for sock in stalled:
                status, answer = _status_and_body(_read_until_closed(sock))
                assert status == 408
                assert answer["ok"] is False
                assert "RECEIVER_BODY_TIMEOUT" in str(answer["error"])
            try:
                status, _ = _status_and_body(_read_until_closed(trickler))
                assert status == 408
            except ConnectionResetError:
                # Bytes it sent after the server closed draw a reset, which may overtake the
                # 408 (a server cannot help that without lingering): cut off all the same.
                pass
            elapsed = time.monotonic() - started
            assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + GRACE
        finally:
            stop.set()
            thread.join(5)
            for sock in [*stalled, trickler]:
                sock.close()
        # Nothing of the slow ones was stored, not even in quarantine.
        assert _count(database, "deliveries") == 5
        assert _count(database, "evaluations") == 5
        assert _count(database, "quarantine") == 0


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(tmp_path: Path) -> None:
    with ReceiverProcess(tmp_path, RECEIVER_BODY_TIMEOUT=str(BODY_TIMEOUT)) as server:
        body = _callback("gone")
        with _connect(server.url) as sock:
            sock.sendall(_head(body) + body[:10])
            time.sleep(0.1)
        body = _callback("after")
        response = httpx.post(
            f"{server.url}/webhooks/runflow",
            content=body,
            headers={"runflow-signature": sign(body, SECRET_A)},
            timeout=5,
        )
        assert response.status_code == 200
        time.sleep(0.2)
    log = server.log.read_text()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
    assert _count(tmp_path / "receiver.db", "deliveries") == 1
    assert _count(tmp_path / "receiver.db", "quarantine") == 0


def test_a_budget_longer_than_uvicorns_keep_alive_still_ends_in_408(tmp_path: Path) -> None:
    """uvicorn's only timer, the keep-alive timeout (5 s), runs between requests, never while a
    body is read: on a kept-alive connection a stalled second request still gets our 408 at
    RECEIVER_BODY_TIMEOUT (here 6 s), not a silent close at 5 s."""
    budget = 6.0
    with ReceiverProcess(tmp_path, RECEIVER_BODY_TIMEOUT=str(budget)) as server:
        first, second = _callback("kept-alive-1"), _callback("kept-alive-2")
        with _connect(server.url) as sock:
            sock.settimeout(budget + GRACE)
            sock.sendall(_head(first) + first)
            answer = _read_one_response(sock)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            time.sleep(1)  # the keep-alive timer is running now
            started = time.monotonic()
            sock.sendall(_head(second) + second[:10])
            status, _ = _status_and_body(_read_until_closed(sock))
            elapsed = time.monotonic() - started
    assert status == 408
    assert budget <= elapsed < budget + GRACE
    assert _count(tmp_path / "receiver.db", "deliveries") == 1
