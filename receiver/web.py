"""POST /webhooks/runflow: bounded read → verify raw bytes → parse → durable store → ack
(applied to its evaluation right after, store/backlog.py). `receiver serve` answers the common
callback from its HTTP protocol (protocol.py) with `acknowledged`, and hands the rest here."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from contextlib import aclosing

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from . import logs
from .context import Context, context
from .errors import BadRequest, PayloadTooLarge, ReceiverError, RequestTimeout, Unauthorized
from .logs import WEBHOOK_PATH
from .normalize import Callback, normalize, parse_body
from .signing import SIGNATURE_HEADER, verify
from .store import Delivery, Receipt

log = logging.getLogger("receiver.web")
MAX_REQUEST_ID = 200  # Runflow-Request-Id as logged; the header is the sender's to choose

# Kept with each delivery so it can be re-verified and traced; never credentials.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "runflow-request-id",
    SIGNATURE_HEADER,
    "x-forwarded-for",
)
_KEPT = frozenset(name.encode() for name in KEPT_HEADERS)
# Seconds the HTTP protocol already waited for this body before handing it on (protocol.py).
BODY_WAITED = "receiver.body_waited"
# When (time.perf_counter()) the HTTP protocol began a request it handed on: a callback's
# `duration_ms` runs from there, the time spent holding its body or storing it included.
STARTED = "receiver.started"
# The StoreTimeout of a callback the HTTP protocol already waited for: answered as it is, not
# stored again (that would double the wait the sender sees).
GAVE_UP = "receiver.gave_up"


def kept_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The kept headers of a request's raw header list in one pass (the first of a repeated
    one, as `request.headers[name]` would give)."""
    kept: dict[str, str] = {}
    for name, value in raw:
        if name in _KEPT and (key := name.decode("latin-1")) not in kept:
            kept[key] = value.decode("latin-1")
    return kept


def whole(text: str, most: int) -> int | None:
    """`text` as a whole number from 0 to `most`, else None: ASCII digits only, and never int()
    of a huge string (Python refuses more than 4300 digits: a 500, not the caller's 400)."""
    digits = text.lstrip("0") or "0"  # an HTTP parser lets a Content-Length of 5,000 zeros by
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(most)):
        return None
    number = int(digits)
    return number if number <= most else None


async def read_body(request: Request, limit: int, setting: str | None = None) -> bytes:
    """The body, refusing anything over `limit` bytes before reading it (or as soon as it
    grows past it, when no Content-Length was sent), and anything that takes longer than
    RECEIVER_BODY_TIMEOUT seconds to arrive in full (a slow client holds no slot for long).
    `setting` names the variable that sets `limit`, if one does, in the 413's reason."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("Content-Length is not a number")
        if whole(declared, limit) is None:
            shown = declared if len(declared) <= 20 else f"a {len(declared)}-digit number of"
            raise PayloadTooLarge(
                f"body is {shown} bytes; the limit is {limit}"
                + (f" ({setting})" if setting else "")
            )
    timeout = context(request).settings.body_timeout
    remaining = timeout - request.scope.get(BODY_WAITED, 0.0)
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(remaining), aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"body is over the limit of {limit} bytes"
                        + (f" ({setting})" if setting else "")
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout:g} seconds (RECEIVER_BODY_TIMEOUT)"
        ) from None
    except ClientDisconnect:
        raise BadRequest("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def webhook(request: Request) -> Response:
    """Accept one callback: a counter, a histogram observation and one log line each
    (refusals at WARNING with the reason; never the body, the signature or a secret)."""
    started = request.scope.get(STARTED) or time.perf_counter()
    ctx = context(request)
    request_id = request.headers.get("runflow-request-id")
    try:
        receipt, secret_index, verifying = await _accept(request, ctx)
    except Exception as exc:
        _refused(ctx, request, exc, request_id, started)
        raise
    return Response(
        acknowledged(ctx, receipt, secret_index, request_id, started, verifying),
        media_type="application/json",
    )


# What JSONResponse renders: compact, UTF-8.
_answer = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def acknowledged(
    ctx: Context,
    receipt: Receipt,
    secret_index: int | None,
    request_id: str | None,
    started: float,
    verifying: float,
) -> bytes:
    """Count and log a stored callback; the body of its 200. Shared by the endpoint and the
    HTTP protocol's own path (protocol.py), so both answer alike."""
    committed = time.perf_counter()
    ctx.metrics.accepted(receipt.outcome, committed - verifying)
    if request_id is not None:
        request_id = request_id[:MAX_REQUEST_ID]  # as logged; stored whole
    logs.info(
        log,
        f"callback {receipt.outcome}",
        {
            "request_id": request_id,
            "outcome": receipt.outcome,
            "delivery_id": receipt.delivery_id,
            "evaluation_id": receipt.evaluation_id,
            "secret_index": secret_index,
            "status": 200,
            "method": "POST",
            "path": WEBHOOK_PATH,
            "duration_ms": round((committed - started) * 1000, 3),
        },
    )
    return _answer(
        {
            "ok": True,
            "outcome": receipt.outcome,
            "delivery_id": receipt.delivery_id,
            "evaluation_id": receipt.evaluation_id,
        }
    ).encode()


def _refused(
    ctx: Context, request: Request, exc: Exception, request_id: str | None, started: float
) -> None:
    status = exc.status if isinstance(exc, ReceiverError) else 500
    outcome = ctx.metrics.refused(status)
    reason = str(exc) if isinstance(exc, ReceiverError) else type(exc).__name__
    log.warning(
        "callback refused: %s",
        reason,
        extra={
            "request_id": None if request_id is None else request_id[:MAX_REQUEST_ID],
            "outcome": outcome,
            "reason": reason,
            "status": status,
            "method": "POST",
            "path": request.scope["path"],
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


async def _accept(request: Request, ctx: Context) -> tuple[Receipt, int | None, float]:
    """Read, verify, parse and store: the receipt, the index of the secret that signed it and
    when verification started (the ingest histogram runs from there to the commit)."""
    settings = ctx.settings
    body = await read_body(request, settings.max_body_bytes, "RECEIVER_MAX_BODY_BYTES")
    verifying = time.perf_counter()
    headers = kept_headers(request.scope["headers"])  # the signature and request id are among them
    signature = headers.get(SIGNATURE_HEADER)
    request_id = headers.get("runflow-request-id")
    secret_index = verify(body, signature, settings.webhook_secrets)
    if secret_index is None:
        if signature is None and settings.allow_unsigned:
            log.warning("accepting an unsigned callback (RECEIVER_ALLOW_UNSIGNED=true)")
        elif signature is None:
            raise Unauthorized("missing Runflow-Signature header")
        else:
            raise Unauthorized("Runflow-Signature does not match the body")
    try:
        callback = normalize(parse_body(body))
    except BadRequest as exc:
        await ctx.store.quarantine(body, str(exc), headers, request_id)
        raise
    if (gave_up := request.scope.get(GAVE_UP)) is not None:
        raise gave_up
    receipt = await ctx.store.accept(received(body, callback, headers, secret_index))
    return receipt, secret_index, verifying


def received(
    body: bytes, callback: Callback, headers: dict[str, str], secret_index: int | None
) -> Delivery:
    """The delivery to store for a verified, parsed callback (also protocol.py's)."""
    return Delivery(
        body=body,
        callback=callback,
        headers=headers,
        request_id=headers.get("runflow-request-id"),
        secret_index=secret_index,
    )
