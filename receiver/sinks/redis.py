"""Redis Streams sink: `XADD <stream> MAXLEN ~ <maxlen>` with fields `id`, `type`, `event`,
once per event id."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT

from ..sinkspec import SinkSpec
from ._queues import DEDUPE_SECONDS, body, option, reason, where
from .base import Event, SinkError

# XADD unless this event id was added within DEDUPE_SECONDS, as one atomic step (a script
# runs alone, and writes nothing if XADD fails). An outbox row is marked done only after its
# XADD, so a crash in between, or a reply lost on the way back, sends it again: this keeps
# the second copy out of the stream. KEYS: stream, dedupe key; ARGV: ttl, maxlen, fields.
XADD_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], entry, 'EX', ARGV[1])
return entry
"""


class RedisSink:
    """A batch is one pipelined round trip (no MULTI), because throughput matters more than
    atomicity here; each event is added at most once (XADD_ONCE, keyed `<stream>:dedupe:<id>`),
    so a partial batch is safely retried."""

    socket_timeout = 10.0
    connect_timeout = 5.0

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.stream = str(option(spec, "stream"))
        self.maxlen = int(option(spec, "maxlen"))
        self._client: Redis | None = None
        self._xadd_once: AsyncScript | None = None

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
        self._xadd_once = client.register_script(XADD_ONCE)

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        if self._client is None or self._xadd_once is None:
            return [SinkError("redis sink is not started") for _ in events]
        # `async with`: the pipeline gives its connection back even when loading the script
        # (before the commands are sent) fails.
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                fields: list[EncodableT] = ["id", event["id"], "type", event["type"]]
                fields += ["event", body(event)]
                await self._xadd_once(  # queued on the pipeline, sent by execute()
                    keys=[self.stream, f"{self.stream}:dedupe:{event['id']}"],
                    args=[DEDUPE_SECONDS, self.maxlen, *fields],
                    client=pipe,
                )
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
            self._xadd_once = None
