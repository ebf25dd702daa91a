"""(e) The floor: the least a durable receiver written in CPython does per callback. No
framework: uvloop and httptools; verify the HMAC, parse the JSON, one INSERT per callback in a
group commit (one writer thread, every waiting callback in one transaction, WAL with
synchronous=FULL) and the 200 only after its commit; one JSON log line per callback, the
batch's lines in one write.

What receiver does beyond this (its schema and apply queue, strict parsing and normalizing,
metrics, logging, uvicorn's protocol, the writer shared with every other operation) is what
the gap between the two costs (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import queue
import sqlite3
import sys
import threading
import time
from typing import cast

import httptools
import uvloop

INSERT = (
    "INSERT INTO deliveries (received_at, sha256, evaluation_id, headers, body)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id"
)
Row = tuple[str, str, str, str, bytes]


class Writer:
    """One thread: takes every callback waiting, inserts them in one transaction, commits (an
    fsync), then hands the batch to the event loop in one call."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY, received_at TEXT,"
            " sha256 TEXT, evaluation_id TEXT, headers TEXT, body BLOB)"
        )
        self.conn.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS deliveries_key ON deliveries (evaluation_id, sha256)"
        )
        self.loop = loop
        self.queue: queue.SimpleQueue[tuple[Row, Webhook]] = queue.SimpleQueue()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self.conn.execute("BEGIN IMMEDIATE")
            ids = [self.conn.execute(INSERT, row).fetchone() for row, _ in batch]
            self.conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(answer, batch, ids)


def answer(batch: list[tuple[Row, Webhook]], ids: list[tuple[int] | None]) -> None:
    lines = []
    for ((received_at, _, evaluation_id, _, _), webhook), found in zip(batch, ids, strict=True):
        delivery_id = found[0] if found else None
        lines.append(
            json.dumps(
                {
                    "time": received_at,
                    "level": "INFO",
                    "message": "callback stored",
                    "delivery_id": delivery_id,
                    "evaluation_id": evaluation_id,
                }
            )
        )
        webhook.respond(
            b"200 OK",
            json.dumps({"ok": True, "delivery_id": delivery_id}).encode(),
        )
    sys.stderr.write("\n".join(lines) + "\n")


class Webhook(asyncio.Protocol):
    def __init__(self, secret: bytes, writer: Writer) -> None:
        self.secret = secret
        self.writer = writer
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, headers = b"".join(self.body), self.headers
        self.body, self.headers = [], {}
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, headers.get(b"runflow-signature", b"")):
            return self.respond(b"401 Unauthorized", b'{"ok":false}')
        try:
            evaluation_id = str(json.loads(body)["id"])
        except (ValueError, KeyError, TypeError):
            return self.respond(b"400 Bad Request", b'{"ok":false}')
        kept = {"content-type": headers.get(b"content-type", b"").decode("latin-1")}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        row = (stamp, hashlib.sha256(body).hexdigest(), evaluation_id, json.dumps(kept), body)
        self.writer.queue.put((row, self))

    def respond(self, status: bytes, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    writer = Writer(os.environ["NAIVE_DATABASE"], loop)
    secret = os.environ["RUNFLOW_WEBHOOK_SECRET"].encode()
    server = await loop.create_server(lambda: Webhook(secret, writer), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
