"""The one small protocol every destination implements, and the error it reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..sinkspec import SinkSpec

Event = dict[str, Any]


class SinkError(Exception):
    """A delivery that did not happen. `retry_after` (seconds) is the destination's own wish
    (429 Retry-After, Discord's retry_after); `permanent` means retrying cannot help;
    `limited` means the destination took nothing because of its rate limit (a 429): not a
    failed attempt but a request to wait."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        permanent: bool = False,
        limited: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent
        self.limited = limited

    @property
    def asks_to_wait(self) -> bool:
        """The destination asked to be left alone for a while (a 429, or a Retry-After)."""
        return not self.permanent and (self.limited or bool(self.retry_after))


class NotSent(SinkError):
    """The worker stopped before this event was sent: give it back, it was not an attempt."""

    def __init__(self, message: str = "not sent: the worker is stopping") -> None:
        super().__init__(message)


class Deferred(NotSent):
    """Not sent because the destination asked to be left alone for `retry_after` more seconds
    (a 429): give it back for then, it was not an attempt."""

    retry_after: float

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"not sent: the destination asked to wait {retry_after:.3g}s")
        self.retry_after = retry_after


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
    rest, and a restart sends nothing twice.

    Once the destination asks to wait (a 429's `retry_after`), nothing more is sent to it
    until then, in this batch or the next: those events are Deferred, not attempted. Each
    further request would be refused too, cost the event an attempt, and count against the
    sender (Discord bans one that makes too many refused requests)."""

    concurrency = 8
    shortest_hold = 0.0  # seconds; the worker sets RECEIVER_RETRY_BASE …
    longest_hold = 3600.0  # … and RECEIVER_RETRY_MAX

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self._resume_at = 0.0  # event loop time before which the destination wants nothing

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, event: Event) -> None:
        raise NotImplementedError

    def hold(self, seconds: float) -> None:
        """Send nothing more for `seconds`, within [shortest_hold, longest_hold] (the
        destination said it would refuse it; a 429 without a Retry-After says 0)."""
        now = asyncio.get_running_loop().time()
        wait = min(max(seconds, self.shortest_hold), self.longest_hold)
        self._resume_at = max(self._resume_at, now + wait)

    async def deliver(
        self,
        events: Sequence[Event],
        progress: Progress | None = None,
        halted: Callable[[], bool] = lambda: False,
    ) -> list[SinkError | None]:
        gate = asyncio.Semaphore(self.concurrency)
        clock = asyncio.get_running_loop().time

        async def one(index: int, event: Event) -> SinkError | None:
            async with gate:
                wait = self._resume_at - clock()
                if wait > 0:  # also when stopping: given back for then, not now
                    result: SinkError | None = Deferred(wait)
                elif halted():
                    result = NotSent()
                else:
                    result = await self._send(event)
                    if result is not None and result.asks_to_wait:
                        self.hold(result.retry_after or 0.0)
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
