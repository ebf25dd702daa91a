"""bench/load.py, wrk's fallback in `make bench`: the bodies of the file in order and intact,
every answer counted (non-2xx apart), connections the server closes opened again. Against a
loopback server for half a second; nothing here is timed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from bench.load import run

# More lines than half a second sends (no request is sent twice), every seventh one large.
LINES = [
    (f"sig-{n}", f'{{"id":"e-{n}","pad":"{"x" * (n % 7 == 0) * 3000}"}}') for n in range(50_000)
]
CONNECTIONS = 4
SECONDS = 0.5


class Server:
    """Answers each POST with 200, or 401 when its signature ends in 3; with `close`, closes
    the connection after every answer (`connection: close`). Records each request's signature
    and body."""

    def __init__(self, close: bool) -> None:
        self.close = close
        self.received: list[tuple[str, str]] = []
        self.refused = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                fields = dict(
                    line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if line
                )
                body = await reader.readexactly(int(fields["Content-Length"]))
                signature = fields["Runflow-Signature"]
                self.received.append((signature, body.decode()))
                refused = signature.endswith("3")
                self.refused += refused
                status = b"401 Unauthorized" if refused else b"200 OK"
                close = b"connection: close\r\n" if self.close else b""
                writer.write(b"HTTP/1.1 %s\r\ncontent-length: 2\r\n%s\r\nok" % (status, close))
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client left: time is up
        writer.close()
        with contextlib.suppress(ConnectionError):  # reset by a client that left mid-answer
            await writer.wait_closed()


async def load(
    tmp_path: Path, close: bool, lines: list[tuple[str, str]] = LINES
) -> tuple[dict[str, object], Server]:
    bodies = tmp_path / "bodies.txt"
    bodies.write_text("".join(f"{signature} {body}\n" for signature, body in lines))
    server = Server(close)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        result = await run(
            f"http://127.0.0.1:{port}/webhooks/runflow", SECONDS, CONNECTIONS, bodies
        )
        await asyncio.gather(*server.handlers)  # each sees its connection closed
    finally:
        listening.close()
        await listening.wait_closed()
    return result, server


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "server-closes"])
def test_sends_the_bodies_in_order_and_counts_every_answer(tmp_path: Path, close: bool) -> None:
    result, server = asyncio.run(load(tmp_path, close))
    sent = len(server.received)
    assert sent < len(LINES)
    # Every line from the first, none skipped, none twice, each body intact (in whatever order
    # the connections' requests arrived).
    assert sorted(server.received) == sorted(LINES[:sent])
    # Answers that came after the time was up are not counted; at most one per connection.
    responses = result["responses"]
    assert isinstance(responses, int)
    assert sent - CONNECTIONS <= responses <= sent
    assert server.refused - CONNECTIONS <= result["non_2xx"] <= server.refused
    assert result["requests_per_s"] == pytest.approx(responses / SECONDS, rel=1e-3)
    assert 0 < result["p50_ms"] <= result["p99_ms"]  # type: ignore[operator]


def test_starts_the_bodies_again_after_the_last(tmp_path: Path) -> None:
    few = LINES[:3]
    _, server = asyncio.run(load(tmp_path, False, few))
    sent = len(server.received)
    assert sent > len(few)
    assert sorted(server.received) == sorted(few[n % len(few)] for n in range(sent))
