"""Reading a request body, bounded in size and in time, straight from the ASGI channel."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import Receive

from .errors import BadRequest, PayloadTooLarge, RequestTimeout


async def receive_body(
    receive: Receive,
    declared: str | None,
    limit: int,
    timeout: float,
    setting: str | None = None,
) -> bytes:
    """The body, refusing anything over `limit` bytes before reading it (`declared` is the
    Content-Length, if sent) or as soon as it grows past it, and anything that takes longer
    than `timeout` seconds to arrive in full (RECEIVER_BODY_TIMEOUT: a slow client holds no
    slot for long). `setting` names the variable that sets `limit`, for the 413's reason."""
    named = f" ({setting})" if setting else ""
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}{named}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadRequest("the client disconnected before sending the whole body")
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is over the limit of {limit} bytes{named}")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout:g} seconds (RECEIVER_BODY_TIMEOUT)"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(request: Request, limit: int, setting: str | None = None) -> bytes:
    """`receive_body` for a Starlette request (the API and the dashboard's forms)."""
    timeout: float = request.app.state.receiver.settings.body_timeout
    return await receive_body(
        request.receive, request.headers.get("content-length"), limit, timeout, setting
    )
