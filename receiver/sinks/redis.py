"""Redis Streams sink: `XADD <stream> MAXLEN ~ <maxlen>` with fields `id`, `type`, `event`."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT

from ..sinkspec import SinkSpec
from ._queues import body, option, reason, where
from .base import Event, SinkError


class RedisSink:
    """A batch is one pipelined round trip (no MULTI), because throughput matters more than
    atomicity here: consumers dedupe on the `id` field, so a partial batch is safely retried."""

    socket_timeout = 10.0
    connect_timeout = 5.0

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.stream = str(option(spec, "stream"))
        self.maxlen = int(option(spec, "maxlen"))
        self._client: Redis | None = None

    async def start(self) -> None:
        client = Redis.from_url(
            self.spec.url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            # One immediate retry on a dropped connection: after a server restart the pooled
            # socket is dead, and a fresh one usually works. Timeouts are not retried (the
            # first XADDs may have landed), and longer waits belong to the outbox worker.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            raise SinkError(
                f"redis at {where(self.spec.url)} is unreachable: {reason(exc, self.spec.url)}"
            ) from None
        self._client = client

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        if self._client is None:
            return [SinkError("redis sink is not started") for _ in events]
        pipe = self._client.pipeline(transaction=False)
        for event in events:
            fields: dict[FieldT, EncodableT] = {
                "id": event["id"],
                "type": event["type"],
                "event": body(event),
            }
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # connection refused, reset, timeout: the whole batch
            text = f"redis at {where(self.spec.url)}: {reason(exc, self.spec.url)}"
            return [SinkError(text) for _ in events]
        return [
            SinkError(f"redis XADD {self.stream}: {reason(reply, self.spec.url)}")
            if isinstance(reply, Exception)
            else None
            for reply in replies
        ]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
