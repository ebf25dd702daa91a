"""What every fake endpoint shares: the record of requests and the faults queued from tests.

The app runs in a server thread while the test drives it from its own thread, so all state
sits behind one condition variable.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request


@dataclass(frozen=True)
class Received:
    """One accepted request, as the fake saw it (header names lowercased)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Fault:
    """The answer to one upcoming request instead of the normal one."""

    status: int
    retry_after: float | None = None
    header: bool = True  # send `Retry-After` (when retry_after is set)
    body: str | None = None
    delay: float = 0.0  # seconds to wait before answering (for client timeouts)


@dataclass
class _State:
    faults: deque[Fault] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0


class FakeEndpoint:
    """Base of the fakes: `fail_next` queues faults, `received`/`wait_for` read the record."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state = _State()

    def fail_next(
        self,
        status: int = 500,
        count: int = 1,
        *,
        retry_after: float | None = None,
        header: bool = True,
        body: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `count` requests with `status` (429: with `retry_after` seconds,
        in the `Retry-After` header unless `header=False`, and in the body where the real
        service puts it there). A status below 300 answers normally, after `delay`."""
        with self._cond:
            fault = Fault(status, retry_after, header, body, delay)
            self._state.faults.extend([fault] * count)

    def reset(self) -> None:
        """Forget faults and everything received."""
        with self._cond:
            self._state = _State()

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._state.received)

    @property
    def attempts(self) -> int:
        """Requests that reached the endpoint, including faulted and refused ones."""
        with self._cond:
            return self._state.attempts

    def payloads(self) -> list[Any]:
        """The JSON bodies accepted so far, in order."""
        return [item.json() for item in self.received]

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """Block until at least `count` requests were accepted (for tests whose sender runs
        in the background); TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._state.received) >= count, timeout):
                got = len(self._state.received)
                raise TimeoutError(f"expected {count} requests, got {got} in {timeout}s")
            return list(self._state.received)

    async def _take_fault(self) -> Fault | None:
        """Count the attempt and pop the next queued fault (after its delay)."""
        with self._cond:
            self._state.attempts += 1
            fault = self._state.faults.popleft() if self._state.faults else None
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        return fault

    def _record(self, request: Request, body: bytes) -> Received:
        item = Received(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={key.lower(): value for key, value in request.headers.items()},
            body=body,
        )
        with self._cond:
            self._state.received.append(item)
            self._cond.notify_all()
        return item


def retry_after_header(fault: Fault, whole_seconds: bool = False) -> dict[str, str]:
    """The fault's `Retry-After`; Discord rounds it up to whole seconds."""
    if fault.retry_after is None or not fault.header:
        return {}
    if whole_seconds:
        return {"retry-after": str(max(1, math.ceil(fault.retry_after)))}
    return {"retry-after": f"{fault.retry_after:g}"}
