"""The one small protocol every destination implements, and the error it reports."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from ..sinkspec import SinkSpec

Event = dict[str, Any]


class SinkError(Exception):
    """A delivery that did not happen. `retry_after` (seconds) is the destination's own wish
    (429 Retry-After, Discord's retry_after); `permanent` means retrying cannot help."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


class Sink(Protocol):
    spec: SinkSpec

    async def start(self) -> None:
        """Open connections; raise SinkError if the destination cannot be reached now."""

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        """Send each event; one result per event, in order (None = delivered)."""

    async def close(self) -> None: ...


class OneByOne:
    """For destinations that take one request per event: `deliver` runs `send` concurrently
    (bounded) and turns any failure into a SinkError for that event alone."""

    concurrency = 8

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, event: Event) -> None:
        raise NotImplementedError

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(event: Event) -> SinkError | None:
            async with gate:
                try:
                    await self.send(event)
                except SinkError as exc:
                    return exc
                except Exception as exc:  # a destination library's own error
                    return SinkError(f"{type(exc).__name__}: {exc}")
                return None

        return list(await asyncio.gather(*(one(event) for event in events)))
