"""The one small protocol every destination implements, and the error it reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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


class NotSent(SinkError):
    """The worker stopped before this event was sent: give it back, it was not an attempt."""

    def __init__(self) -> None:
        super().__init__("not sent: the worker is stopping")


# Called as each event of a batch is done: its index in the batch, its result.
Progress = Callable[[int, SinkError | None], object]


class Sink(Protocol):
    spec: SinkSpec

    async def start(self) -> None:
        """Open connections; raise SinkError if the destination cannot be reached now."""

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        """Send each event; one result per event, in order (None = delivered)."""

    async def close(self) -> None: ...


class OneByOne:
    """For destinations that take one request per event: `deliver` runs `send` concurrently
    (bounded) and turns any failure into a SinkError for that event alone.

    A batch of them can take minutes (a chat sink posts one at a time), so `deliver` tells
    `progress` of each event as it is done, and once `halted()` it sends no more (the rest
    are NotSent): a worker that stops mid-batch records what went out and gives back the
    rest, and a restart sends nothing twice."""

    concurrency = 8

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, event: Event) -> None:
        raise NotImplementedError

    async def deliver(
        self,
        events: Sequence[Event],
        progress: Progress | None = None,
        halted: Callable[[], bool] = lambda: False,
    ) -> list[SinkError | None]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(index: int, event: Event) -> SinkError | None:
            async with gate:
                result = NotSent() if halted() else await self._send(event)
            if progress is not None:
                progress(index, result)
            return result

        return list(await asyncio.gather(*(one(n, event) for n, event in enumerate(events))))

    async def _send(self, event: Event) -> SinkError | None:
        try:
            await self.send(event)
        except SinkError as exc:
            return exc
        except Exception as exc:  # a destination library's own error
            return SinkError(f"{type(exc).__name__}: {exc}")
        return None
