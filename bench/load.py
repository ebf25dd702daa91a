"""`make bench`'s load generator where wrk is not installed (bench/ingest.py picks it).

    python bench/load.py --url URL [--seconds 10] [--connections 32]   (bodies: $BENCH_BODIES)

It does what wrk does with bench/wrk_post.lua: POSTs the signed callbacks of $BENCH_BODIES
("<signature> <body>" per line) in order, starting again after the last, over keep-alive
connections that each send their next request as soon as the answer to the last one is in
(on a new connection after `connection: close`), for the given seconds. Prints one JSON
object: requests_per_s, p50_ms, p99_ms (of the answers that came within the time), responses,
non_2xx.

Against wrk on the same core (docs/performance.md): the bare app answered it 3 % slower,
receiver as fast, so the ratios come out within a few percent of wrk's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop


class Load:
    """What the connections share: the bodies, which one goes next, and the answers so far."""

    def __init__(self, bodies: Path, host: str, path: str, seconds: float) -> None:
        with bodies.open("rb") as file:
            self.file = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.starts = [0]  # where each line starts, then the end of the last
        while (found := self.file.find(b"\n", self.starts[-1])) >= 0:
            self.starts.append(found + 1)
        self.count = len(self.starts) - 1
        if not self.count:
            raise SystemExit(f"{bodies}: no lines")
        self.next = 0
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        self.head = head.encode()
        self.open: set[Connection] = set()
        self.started = time.perf_counter()
        self.deadline = self.started + seconds
        self.latencies: list[float] = []
        self.non_2xx = 0

    def request(self) -> bytes:
        line = self.next % self.count
        self.next += 1
        signature, _, body = self.file[self.starts[line] : self.starts[line + 1] - 1].partition(
            b" "
        )
        return b"%sRunflow-Signature: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            self.head,
            signature,
            len(body),
            body,
        )

    def answered(self, status: int, seconds: float) -> None:
        self.latencies.append(seconds)
        if not 200 <= status < 400:  # what wrk counts as "Non-2xx or 3xx responses"
            self.non_2xx += 1

    def result(self) -> dict[str, Any]:
        latencies = sorted(self.latencies)
        count = len(latencies)

        def ms(share: float) -> float:
            return round(latencies[min(count - 1, int(share * count))] * 1000, 3) if count else 0.0

        return {
            "requests_per_s": round(count / (self.deadline - self.started), 2),
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "responses": count,
            "non_2xx": self.non_2xx,
        }


class Connection(asyncio.Protocol):
    """One keep-alive connection: a request, its whole answer, the next request."""

    def __init__(self, load: Load, closed: asyncio.Future[None]) -> None:
        self.load = load
        self.closed = closed
        self.buffer = b""
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.load.open.add(self)
        self.send()

    def send(self) -> None:
        if time.perf_counter() >= self.load.deadline:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:  # every server measured here sends one
            self.transport.close()
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else None])
        if len(self.buffer) < end + 4 + length:
            return
        answered = time.perf_counter()
        self.buffer = self.buffer[end + 4 + length :]
        if answered < self.load.deadline:
            self.load.answered(int(head[9:12]), answered - self.sent_at)
        if b"\r\nconnection: close" in head:
            self.transport.close()  # the next request goes on a new connection
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.open.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


async def connection(load: Load, host: str, port: int) -> None:
    """Keep one connection going until the time is up (again if the server closes it)."""
    loop = asyncio.get_running_loop()
    while time.perf_counter() < load.deadline:
        closed: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(partial(Connection, load, closed), host, port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        await closed


async def run(url: str, seconds: float, connections: int, bodies: Path) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    load = Load(bodies, parts.netloc, parts.path or "/", seconds)
    running = [asyncio.create_task(connection(load, host, port)) for _ in range(connections)]
    await asyncio.sleep(load.deadline - time.perf_counter())
    for open_connection in list(load.open):  # time is up: requests in flight are dropped
        open_connection.transport.close()
    await asyncio.gather(*running)
    return load.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/webhooks/runflow")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    options = parser.parse_args()
    bodies = Path(os.environ["BENCH_BODIES"])
    result = uvloop.run(run(options.url, options.seconds, options.connections, bodies))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
