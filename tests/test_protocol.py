"""receiver/protocol.py: the common callback is answered by the HTTP protocol itself, exactly as
the endpoint answers it (status, headers, body, stored rows); everything else reaches the app.
Each request goes to two real servers with their own databases: uvicorn's plain httptools
protocol and WebhookProtocol."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from receiver.app import create_app
from receiver.config import Settings
from receiver.errors import StoreUnavailable
from receiver.fakes.server import serve_in_thread
from receiver.logs import WEBHOOK_PATH
from receiver.protocol import WebhookProtocol
from receiver.signing import sign
from receiver.store import Delivery, Receipt, Store
from receiver.supervisor import HTTP_PROTOCOL
from receiver.web import BODY_WAITED

from .helpers import SECRET_A, count, fixture, make_settings, rows

MAX_BODY = 8192
TIMEOUT = 10.0


class Reached:
    """The app, counting the webhook requests that reach it (those the protocol handed on)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.webhooks = 0
        self.waited: list[float] = []  # what the protocol had waited for a body it handed on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH:
            self.webhooks += 1
            if BODY_WAITED in scope:
                self.waited.append(scope[BODY_WAITED])
        await self.app(scope, receive, send)


@dataclass
class Server:
    url: str
    settings: Settings
    reached: Reached

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def serve(
    stack: ExitStack,
    directory: Path,
    http: type[asyncio.Protocol] | str,
    store: Callable[[Settings], Store] | None = None,
    **changes: Any,
) -> Server:
    directory.mkdir()
    settings = make_settings(directory, max_body_bytes=MAX_BODY, worker=False, **changes)
    reached = Reached(create_app(settings, store=store(settings) if store else None))
    return Server(stack.enter_context(serve_in_thread(reached, http=http)), settings, reached)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    """(uvicorn's own protocol, WebhookProtocol)."""
    with ExitStack() as stack:
        yield (
            serve(stack, tmp_path / "plain", "httptools"),
            serve(stack, tmp_path / "fast", WebhookProtocol),
        )


def callback(number: int, **extra: object) -> bytes:
    return json.dumps(
        {"id": f"0193a7c2-5b1e-7c3d-9f10-{number:012d}", "status": "completed", **extra}
    ).encode()


def signed(body: bytes) -> dict[str, str]:
    return {"content-type": "application/json", "runflow-signature": sign(body, SECRET_A)}


RUN = fixture("run-completed.json")
NOT_JSON = b'{"id": "x",'
NO_ID = json.dumps({"status": "completed"}).encode()
LARGE = callback(9, padding="x" * MAX_BODY)

# name, path, body, headers, status, answered by the protocol (not the app)
CASES = [
    ("new callback", WEBHOOK_PATH, callback(1), signed(callback(1)), 200, True),
    ("same bytes again", WEBHOOK_PATH, callback(1), signed(callback(1)), 200, True),
    ("run callback", WEBHOOK_PATH, RUN, signed(RUN), 200, True),
    (
        "with a request id",
        WEBHOOK_PATH,
        callback(2),
        {**signed(callback(2)), "runflow-request-id": "r" * 300},
        200,
        True,
    ),
    ("bad signature", WEBHOOK_PATH, callback(3), signed(callback(4)), 401, False),
    ("no signature", WEBHOOK_PATH, callback(3), {"content-type": "application/json"}, 401, False),
    ("not JSON", WEBHOOK_PATH, NOT_JSON, signed(NOT_JSON), 400, False),
    ("no evaluation id", WEBHOOK_PATH, NO_ID, signed(NO_ID), 400, False),
    ("over the size limit", WEBHOOK_PATH, LARGE, signed(LARGE), 413, False),
    ("a query string", f"{WEBHOOK_PATH}?x=1", callback(5), signed(callback(5)), 200, False),
]


def answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Everything a client sees, but the date."""
    headers = [(name, value) for name, value in response.headers.items() if name != "date"]
    return response.status_code, headers, response.content


def test_both_protocols_answer_and_store_alike(servers: tuple[Server, Server]) -> None:
    plain, fast = servers
    with httpx.Client(timeout=TIMEOUT) as to_plain, httpx.Client(timeout=TIMEOUT) as to_fast:
        for name, path, body, headers, status, by_protocol in CASES:
            reached = fast.reached.webhooks
            expected = to_plain.post(f"{plain.url}{path}", content=body, headers=headers)
            got = to_fast.post(f"{fast.url}{path}", content=body, headers=headers)
            assert expected.status_code == status, (name, expected.text)
            assert answer(got) == answer(expected), name
            assert fast.reached.webhooks == reached + (not by_protocol), name
    for table in ("deliveries", "apply_queue", "quarantine"):
        sql = f"SELECT * FROM {table} ORDER BY 1"
        assert len(rows(fast.settings, sql)) == len(rows(plain.settings, sql)), table
    columns = "id, receipts, source, request_id, secret_index, sha256, kind, event, evaluation_id"
    sql = f"SELECT {columns}, outcome, headers, body FROM deliveries ORDER BY id"
    assert [tuple(row) for row in rows(fast.settings, sql)] == [
        tuple(row) for row in rows(plain.settings, sql)
    ]


def test_the_protocol_is_what_serve_runs() -> None:
    module, name = HTTP_PROTOCOL.split(":")
    assert (module, name) == (WebhookProtocol.__module__, WebhookProtocol.__name__)


# -- raw HTTP: what httpx does not send ---------------------------------------------------------


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(body: bytes, *extra: str) -> bytes:
    lines = [
        f"POST {WEBHOOK_PATH} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Runflow-Signature: {sign(body, SECRET_A)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_responses(sock: socket.socket, wanted: int) -> list[tuple[bytes, dict[str, object]]]:
    """`wanted` whole responses: (head, JSON body) each."""
    received = b""
    answers: list[tuple[bytes, dict[str, object]]] = []
    while len(answers) < wanted:
        head_, found, rest = received.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head_.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        if found and length is not None and len(rest) >= length:
            answers.append((head_, json.loads(rest[:length])))
            received = rest[length:]
            continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(answers)} of {wanted} responses"
        received += chunk
    return answers


def test_pipelined_callbacks_are_answered_in_order(servers: tuple[Server, Server]) -> None:
    _, fast = servers
    bodies = [callback(number) for number in range(10, 15)]
    with connect(fast) as sock:
        sock.sendall(b"".join(head(body) + body for body in bodies))
        answers = read_responses(sock, len(bodies))
    assert [body["evaluation_id"] for _, body in answers] == [
        json.loads(body)["id"] for body in bodies
    ]
    assert [body["delivery_id"] for _, body in answers] == [1, 2, 3, 4, 5]
    assert fast.reached.webhooks == 0


def test_a_body_after_its_headers_is_waited_for(servers: tuple[Server, Server]) -> None:
    _, fast = servers
    body = callback(20)
    with connect(fast) as sock:
        sock.sendall(head(body) + body[:10])
        time.sleep(0.2)
        sock.sendall(body[10:])
        [(status, answered)] = read_responses(sock, 1)
    assert status.startswith(b"HTTP/1.1 200")
    assert answered["outcome"] == "stored"
    assert fast.reached.webhooks == 0


def test_a_body_slower_than_its_budget_gets_the_apps_408_in_time(tmp_path: Path) -> None:
    """The time the protocol waited counts against RECEIVER_BODY_TIMEOUT: the app is handed
    what is left of it, not a new budget."""
    settings = make_settings(tmp_path, body_timeout=0.5, worker=False)
    reached = Reached(create_app(settings))
    body = callback(25)
    with serve_in_thread(reached, http=WebhookProtocol) as url:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
        with sock:
            sock.sendall(head(body) + body[:10])
            [(status, answered)] = read_responses(sock, 1)
    assert status.startswith(b"HTTP/1.1 408")
    assert answered["error"] == "the body did not arrive within 0.5 seconds (RECEIVER_BODY_TIMEOUT)"
    assert reached.webhooks == 1
    [waited] = reached.waited  # the app's timer ran for the budget less this
    assert waited >= 0.45


def test_a_body_declared_too_large_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    """As uvicorn's protocol would: the app answers 413 from the headers, not after
    RECEIVER_BODY_TIMEOUT (here longer than the client waits). (One declared under 64 KiB is
    read first: closing with it unread could reset the connection before the 413 is read.)"""
    with ExitStack() as stack:
        plain, fast = (
            serve(stack, tmp_path / name, http, body_timeout=60)
            for name, http in (("plain", "httptools"), ("fast", WebhookProtocol))
        )
        answers = []
        for server in (plain, fast):
            with connect(server) as sock:
                sock.settimeout(5)
                sock.sendall(head(b"x" * (HIGH_WATER_LIMIT + 1)))
                [(status, answered)] = read_responses(sock, 1)
            answers.append((status.split(b"\r\n")[0], answered))
    assert answers[0] == answers[1]
    assert answers[0][0] == b"HTTP/1.1 413 Request Entity Too Large"


def test_a_content_length_padded_with_zeros_is_read_as_its_number(
    servers: tuple[Server, Server],
) -> None:
    """httptools lets 5,000 leading zeros by; Python's int() refuses that many digits."""
    answers = []
    for server, number in zip(servers, (30, 31), strict=True):
        body = callback(number)
        padded = head(body).replace(b"Content-Length: ", b"Content-Length: " + b"0" * 5000)
        with connect(server) as sock:
            sock.sendall(padded + body)
            [(status, answered)] = read_responses(sock, 1)
        answers.append((status.split(b"\r\n")[0], answered["outcome"]))
    assert answers == [(b"HTTP/1.1 200 OK", "stored")] * 2


def test_expect_100_continue_is_left_to_the_app(servers: tuple[Server, Server]) -> None:
    _, fast = servers
    body = callback(21)
    with connect(fast) as sock:
        sock.sendall(head(body, "Expect: 100-continue"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        [(status, _)] = read_responses(sock, 1)
    assert status.startswith(b"HTTP/1.1 200")
    assert fast.reached.webhooks == 1


def test_connection_close_is_honoured(servers: tuple[Server, Server]) -> None:
    _, fast = servers
    body = callback(22)
    with connect(fast) as sock:
        sock.sendall(head(body, "Connection: close") + body)
        [(status, _)] = read_responses(sock, 1)
        assert sock.recv(65536) == b""  # closed by the server
    assert b"\r\nconnection: close" in status
    assert fast.reached.webhooks == 0


@pytest.mark.parametrize("request_", [b"GARBAGE\r\n\r\n", b"POST / HTTP/1.1\r\nA\x00: b\r\n\r\n"])
def test_bytes_that_are_no_http_get_the_one_error_shape(
    servers: tuple[Server, Server], request_: bytes
) -> None:
    """uvicorn answers them in plain text; every other error is `{"ok": false, "error"}`."""
    _, fast = servers
    with connect(fast) as sock:
        sock.sendall(request_)
        [(status, body)] = read_responses(sock, 1)
        assert sock.recv(65536) == b""  # closed by the server
    assert status.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\ncontent-type: application/json\r\n" in status
    assert b"\r\nx-content-type-options: nosniff\r\n" in status
    assert body == {"ok": False, "error": "invalid HTTP request: the connection is closed"}


def test_a_callback_whose_sender_left_is_still_stored(servers: tuple[Server, Server]) -> None:
    _, fast = servers
    body = callback(23)
    with connect(fast) as sock:
        sock.sendall(head(body) + body)
    deadline = time.monotonic() + TIMEOUT
    while count(fast.settings, "deliveries") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count(fast.settings, "deliveries") == 1


class Refusing(Store):
    """A store that cannot take a callback: at once, or once the writer had it."""

    def __init__(self, *args: object, at_once: bool, error: Exception, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.at_once = at_once
        self.error = error

    def accepting(self, delivery: Delivery) -> asyncio.Future[Receipt]:
        error = self.error
        if self.at_once:
            raise error
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        return future


@pytest.mark.parametrize("at_once", [True, False], ids=["at-once", "after-the-writer"])
@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (StoreUnavailable("the database is locked"), 503, "the database is locked"),
        (RuntimeError("a bug"), 500, "internal error; the server log has the details"),
    ],
    ids=["unavailable", "bug"],
)
def test_a_store_error_is_answered_by_the_app(
    tmp_path: Path, at_once: bool, error: Exception, status: int, reason: str
) -> None:
    def store(settings: Settings) -> Store:
        return Refusing(settings.database, at_once=at_once, error=error)

    body = callback(24)
    with ExitStack() as stack:
        fast = serve(stack, tmp_path / "fast", WebhookProtocol, store)
        response = httpx.post(f"{fast.url}{WEBHOOK_PATH}", content=body, headers=signed(body))
    assert response.status_code == status
    assert response.json() == {"ok": False, "error": reason}
    assert fast.reached.webhooks == 1


def test_a_large_body_is_handed_to_the_app_before_it_is_all_read(
    servers: tuple[Server, Server],
) -> None:
    _, fast = servers
    body = callback(26, padding="x" * 100_000)
    with connect(fast) as sock:
        sock.sendall(head(body) + body[: MAX_BODY + 1])
        [(status, answered)] = read_responses(sock, 1)
    assert status.startswith(b"HTTP/1.1 413")
    assert (
        answered["error"]
        == f"body is {len(body)} bytes; the limit is {MAX_BODY} (RECEIVER_MAX_BODY_BYTES)"
    )
    assert fast.reached.webhooks == 1


def test_a_sender_who_leaves_mid_body_reaches_the_app_at_once(
    servers: tuple[Server, Server],
) -> None:
    _, fast = servers
    body = callback(27)
    with connect(fast) as sock:
        sock.sendall(head(body) + body[:10])
    deadline = time.monotonic() + TIMEOUT
    while not fast.reached.webhooks and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fast.reached.webhooks == 1  # long before the 10 s body budget
    assert count(fast.settings, "deliveries") == 0


def test_keep_alive_closes_an_idle_connection_but_not_a_busy_one(tmp_path: Path) -> None:
    """One timer per connection: when it fires on a connection used since, it looks again
    later instead of closing it."""
    settings = make_settings(tmp_path, worker=False)
    keep_alive = 1
    with serve_in_thread(create_app(settings), http=WebhookProtocol, keep_alive=keep_alive) as url:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=TIMEOUT)
        with sock:
            for number in range(6):  # 1.5 s of use, never idle for as long as keep_alive
                body = callback(30 + number)
                sock.sendall(head(body) + body)
                [(status, _)] = read_responses(sock, 1)
                assert status.startswith(b"HTTP/1.1 200"), number
                time.sleep(keep_alive / 4)
            idle = time.monotonic()
            assert sock.recv(65536) == b""  # closed once idle for keep_alive
            assert time.monotonic() - idle >= keep_alive * 0.5


def connected(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=TIMEOUT)


def test_a_connection_that_never_sends_a_request_is_closed_as_idle(tmp_path: Path) -> None:
    """uvicorn arms its keep-alive timer only after a response: one that sent nothing stayed
    open for ever."""
    app = create_app(make_settings(tmp_path, worker=False))
    with serve_in_thread(app, http=WebhookProtocol, keep_alive=1) as url, connected(url) as sock:
        assert sock.recv(65536) == b""  # closed, within the keep-alive


@pytest.mark.parametrize(
    ("sent", "status", "error"),
    [
        (  # and then nothing: it held the connection for ever
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n".encode(),
            b"HTTP/1.1 408 Request Timeout",
            "request headers not received within RECEIVER_BODY_TIMEOUT",
        ),
        (  # unbounded: 64 MB of them took 60 MB of the server's memory
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\n".encode() + b"X-Pad: " + b"a" * 70_000 + b"\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "request headers larger than 65536 bytes",
        ),
        (  # complete, and in one piece (or its last piece): it was not counted
            head(callback(1), "X-Pad: " + "a" * 66_000) + callback(1),  # a signed callback
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "request headers larger than 65536 bytes",
        ),
        (  # many headers
            b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: aaaaaaaaaa\r\n" * 3500 + b"\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "request headers larger than 65536 bytes",
        ),
    ],
    ids=["too-slow", "too-large", "too-large-complete", "too-many"],
)
def test_a_request_head_is_bounded_in_time_and_size(
    tmp_path: Path, sent: bytes, status: bytes, error: str
) -> None:
    settings = make_settings(tmp_path, worker=False, body_timeout=0.5)
    complete = sent.find(b"\r\n\r\n") > 0
    with serve_in_thread(create_app(settings), http=WebhookProtocol) as url, connected(url) as sock:
        piece = len(sent) if complete else 16384  # complete heads at once: one read, if it can
        for start in range(0, len(sent), piece):  # as a client writes it, in pieces
            sock.sendall(sent[start : start + piece])
            time.sleep(0.01)
        [(head_, body)] = read_responses(sock, 1)
        assert sock.recv(65536) == b""  # closed
    assert head_.startswith(status + b"\r\n")
    assert b"\r\ncontent-type: application/json\r\n" in head_
    assert body == {"ok": False, "error": error}
    assert count(settings, "deliveries") == 0


def test_the_logged_duration_counts_the_wait_for_the_body_on_both_protocols(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback's `duration_ms` runs from its headers, as on uvicorn's own protocol, whether
    the protocol answered it after holding its body or handed it to the app: a body that came
    0.3 s late, or never (the 408 after RECEIVER_BODY_TIMEOUT), is not logged as 1 ms."""
    late = 0.3
    budget = 0.5
    durations: dict[str, list[float]] = {}
    with ExitStack() as stack, caplog.at_level(logging.INFO, logger="receiver.web"):
        for name, http in (("plain", "httptools"), ("fast", WebhookProtocol)):
            server = serve(stack, tmp_path / name, http, body_timeout=budget)
            body = callback(40)
            with connect(server) as sock:
                sock.sendall(head(body) + body[:10])
                time.sleep(late)
                sock.sendall(body[10:])
                [(status, _)] = read_responses(sock, 1)
                assert status.startswith(b"HTTP/1.1 200"), name
                sock.sendall(head(body) + body[:10])  # and never the rest
                [(status, _)] = read_responses(sock, 1)
                assert status.startswith(b"HTTP/1.1 408"), name
            lines = [r for r in caplog.records if r.name == "receiver.web"]
            durations[name] = [getattr(r, "duration_ms", 0.0) for r in lines]
            caplog.clear()
    # Half the wait, not all of it: the server may read the headers a little after they were
    # sent, and a loaded machine makes that gap unbounded; the bug logged about 1 ms.
    for name, (answered, timed_out) in durations.items():
        assert answered >= late * 500, (name, answered)
        assert timed_out >= budget * 500, (name, timed_out)


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("PUT", callback(60), b"HTTP/1.1 405"),  # a signed callback by another method
        ("PATCH", callback(61), b"HTTP/1.1 405"),
        ("POST", LARGE, b"HTTP/1.1 413"),  # over RECEIVER_MAX_BODY_BYTES, though in one piece
    ],
)
def test_what_the_endpoint_refuses_the_protocol_never_stores(
    tmp_path: Path, method: str, body: bytes, status: bytes
) -> None:
    """Pipelined behind another request, a whole signed request reaches the protocol at once:
    it must still be refused as the endpoint refuses it, and stored by neither."""
    with ExitStack() as stack:
        server = serve(stack, tmp_path / "fast", WebhookProtocol)
        first = callback(59)
        refused = head(body).replace(b"POST ", method.encode() + b" ", 1) + body
        with connect(server) as sock:
            sock.sendall(head(first) + first + refused)
            (ok, _), (answered, _) = read_responses(sock, 2)
        assert ok.startswith(b"HTTP/1.1 200")
        assert answered.startswith(status)
        assert count(server.settings, "deliveries") == 1
