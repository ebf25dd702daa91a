"""POST /webhooks/runflow: bounded read → verify raw bytes → parse → durable store → ack."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse

from .context import context
from .errors import BadRequest, PayloadTooLarge, Unauthorized
from .normalize import normalize, parse_body
from .signing import SIGNATURE_HEADER, verify
from .store import Delivery

log = logging.getLogger("receiver.web")

# Kept with each delivery so it can be re-verified and traced; never credentials.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "runflow-request-id",
    SIGNATURE_HEADER,
    "x-forwarded-for",
)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing anything over `limit` bytes before reading it (or as soon as it
    grows past it, when no Content-Length was sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"body is {declared} bytes; the limit is {limit} (RECEIVER_MAX_BODY_BYTES)"
            )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def webhook(request: Request) -> JSONResponse:
    ctx = context(request)
    settings = ctx.settings
    body = await read_body(request, settings.max_body_bytes)
    signature = request.headers.get(SIGNATURE_HEADER)
    request_id = request.headers.get("runflow-request-id")
    secret_index = verify(body, signature, settings.webhook_secrets)
    if secret_index is None:
        if signature is None and settings.allow_unsigned:
            log.warning("accepting an unsigned callback (RECEIVER_ALLOW_UNSIGNED=true)")
        elif signature is None:
            raise Unauthorized("missing Runflow-Signature header")
        else:
            raise Unauthorized("Runflow-Signature does not match the body")
    headers = {name: request.headers[name] for name in KEPT_HEADERS if name in request.headers}
    try:
        callback = normalize(parse_body(body))
    except BadRequest as exc:
        await ctx.store.quarantine(body, str(exc), headers, request_id)
        raise
    receipt = await ctx.store.ingest(
        Delivery(
            body=body,
            callback=callback,
            headers=headers,
            request_id=request_id,
            secret_index=secret_index,
        )
    )
    if receipt.outcome == "stored":
        ctx.notify()
    return JSONResponse(
        {
            "ok": True,
            "outcome": receipt.outcome,
            "delivery_id": receipt.delivery_id,
            "evaluation_id": receipt.evaluation_id,
        }
    )
