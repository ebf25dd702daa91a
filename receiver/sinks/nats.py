"""NATS JetStream sink: publish to `<subject>.<completed|failed>` with `Nats-Msg-Id` = event id
and `Content-Type: application/cloudevents+json` (structured mode of the CloudEvents NATS
binding: a message with headers but without it would read as binary mode)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError

from ..events import CONTENT_TYPE
from ..sinkspec import SinkSpec
from ._queues import DEDUPE_SECONDS, body, option, reason, where
from .base import Event, SinkError

log = logging.getLogger("receiver.sinks")


def stream_name(subject: str) -> str:
    """The stream made for a subject when none is configured: `runflow.evaluations` →
    `RUNFLOW_EVALUATIONS` (stream names may not contain dots)."""
    return subject.replace(".", "_").replace("*", "_").replace(">", "_").upper()


class NatsSink:
    """Acked JetStream publishes, so a delivery means "stored in the stream"; the message id
    lets JetStream drop the duplicate when the outbox retries a publish whose ack was lost."""

    timeout = 10.0
    connect_timeout = 5.0

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.subject = str(option(spec, "subject"))
        self.stream = str(option(spec, "stream") or stream_name(self.subject))
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._last_error: BaseException | None = None
        self._closing = False
        self._ensuring = asyncio.Lock()

    async def start(self) -> None:
        self._closing = False
        client = Client()
        try:
            # The client reconnects forever once connected, so only the first connect is bounded.
            async with asyncio.timeout(self.connect_timeout):
                await client.connect(
                    self.spec.url,
                    name="runflow-receiver",
                    connect_timeout=max(1, int(self.connect_timeout)),
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except Exception as exc:
            with contextlib.suppress(Exception):  # never connected: close() has nothing to do
                await client.close()
            cause = self._last_error or exc
            raise SinkError(
                f"nats at {where(self.spec.url)} is unreachable: {reason(cause, self.spec.url)}"
            ) from None
        js = client.jetstream(timeout=self.timeout)
        try:
            await self._ensure_stream(js)
        except Exception as exc:  # JetStream off, subjects overlapping another stream, …
            await client.close()
            raise SinkError(f"nats stream {self.stream!r}: {reason(exc, self.spec.url)}") from None
        self._client, self._js = client, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the stream if missing; an existing one is left as its owner configured it.
        Ours remembers message ids for DEDUPE_SECONDS (JetStream's default is 2 minutes): a
        crashed worker's events are sent again only when their lease runs out."""
        async with self._ensuring:
            try:
                await js.stream_info(self.stream)
            except NotFoundError:
                await js.add_stream(
                    name=self.stream,
                    subjects=[f"{self.subject}.>"],
                    duplicate_window=DEDUPE_SECONDS,
                )

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        if self._client is None or self._js is None:
            return [SinkError("nats sink is not started") for _ in events]
        if not self._client.is_connected:
            # The client would buffer and replay later; fail now and let the outbox retry.
            text = f"nats at {where(self.spec.url)}: not connected (reconnecting)"
            return [SinkError(text) for _ in events]
        js = self._js
        return list(await asyncio.gather(*(self._publish(js, event) for event in events)))

    async def _publish(self, js: JetStreamContext, event: Event) -> SinkError | None:
        verdict = str(event["type"]).rsplit(".", 1)[-1]  # completed | failed

        async def publish() -> None:
            await js.publish(
                f"{self.subject}.{verdict}",
                body(event),
                timeout=self.timeout,
                stream=self.stream,
                headers={"Nats-Msg-Id": event["id"], "Content-Type": CONTENT_TYPE},
            )

        try:
            try:
                await publish()
            except NoStreamResponseError:  # the server lost it (restarted without it)
                await self._ensure_stream(js)
                await publish()
        except Exception as exc:  # timeout, connection lost, no stream to be had
            return SinkError(f"nats publish: {reason(exc, self.spec.url)}")
        return None

    async def close(self) -> None:
        self._closing = True
        if self._client is not None:
            await self._client.close()
        self._client = self._js = None

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        log.debug("sink %r: nats: %s", self.spec.name, reason(exc, self.spec.url))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("sink %r: disconnected from %s", self.spec.name, where(self.spec.url))

    async def _on_reconnected(self) -> None:
        log.info("sink %r: reconnected to %s", self.spec.name, where(self.spec.url))
