"""A generic webhook consumer for `http` sinks: records every POST (any path), headers and
body byte for byte, so tests can verify signatures exactly as a real consumer would."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .common import FakeEndpoint, retry_after_header


class Recorder(FakeEndpoint):
    """POST anywhere: 200 `{"ok": true}`; faults (500, 503 with `Retry-After`, slow answers)
    queued with `fail_next`. Other methods: 405."""

    def __init__(self) -> None:
        super().__init__()
        self.app = Starlette(
            routes=[Route("/{rest:path}", self._handle, methods=["GET", "POST", "PUT"])]
        )

    async def _handle(self, request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("method not allowed", 405)
        fault = await self._take_fault()
        if fault is not None and fault.status >= 300:
            headers = retry_after_header(fault)
            return PlainTextResponse(fault.body or "fault", fault.status, headers=headers)
        self._record(request, await request.body())
        return JSONResponse({"ok": True})
