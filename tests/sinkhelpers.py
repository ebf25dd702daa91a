"""Shared by the web sink tests: the fixture's event, serving fakes, one delivery."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx

from receiver.events import build_event
from receiver.fakes.common import FakeEndpoint
from receiver.fakes.server import serve_in_thread
from receiver.normalize import normalize, parse_body
from receiver.sinks import SinkError, build_sink
from receiver.sinkspec import SinkSpec

from .helpers import fixture


def make_event() -> dict[str, Any]:
    callback = normalize(parse_body(fixture("get-evaluation-embedded.json")))
    assert callback.event is not None
    return build_event(
        callback.fields,
        callback.event,
        refetched=True,
        received_at="2026-11-20T09:14:44Z",
        dashboard_url="https://receiver.example.com",
    )


def served(fake: FakeEndpoint) -> Iterator[tuple[Any, str]]:
    with serve_in_thread(fake.app) as base:
        yield fake, base


async def deliver(kind: str, url: str, **options: Any) -> SinkError | None:
    """One event through a fresh sink of `kind`; an error must name the sink, not the URL."""
    spec = SinkSpec(name=f"my-{kind}", type=kind, url=url, options=options)
    async with httpx.AsyncClient() as http:
        sink = build_sink(spec, http)
        await sink.start()
        (result,) = await sink.deliver([make_event()])
        await sink.close()
    if result is not None:
        assert f"'my-{kind}'" in str(result)
        assert url not in str(result)
        for part in [*httpx.URL(url).path.split("/"), "recorder-query-secret"]:
            assert len(part) < 8 or part not in str(result), "a piece of the URL leaked"
    return result


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
