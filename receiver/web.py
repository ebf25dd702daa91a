"""POST /webhooks/runflow: bounded read → verify raw bytes → parse → durable store → ack.

The hot path is a bare ASGI app that `Shortcut` calls directly: the router, the request
object and the middleware meant for pages cost more than verifying and storing a callback.
It answers with the same JSON shapes and security headers as the rest of the app.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from .body import receive_body
from .context import Context
from .errors import BadRequest, ReceiverError, Unauthorized
from .headers import HEADERS
from .normalize import normalize, parse_body
from .signing import SIGNATURE_HEADER, verify
from .store import Delivery, Receipt

log = logging.getLogger("receiver.web")
PATH = "/webhooks/runflow"
MAX_REQUEST_ID = 200  # Runflow-Request-Id as logged; the header is the sender's to choose

# Kept with each delivery so it can be re-verified and traced; never credentials.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "runflow-request-id",
    SIGNATURE_HEADER,
    "x-forwarded-for",
)
_WANTED = frozenset(name.encode() for name in (*KEPT_HEADERS, "content-length"))
_JSON = (b"content-type", b"application/json")


class Webhook:
    """Accept one callback: a counter, a histogram observation and one log line each
    (refusals at WARNING with the reason; never the body, the signature or a secret)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        ctx: Context = scope["app"].state.receiver
        headers = _headers(scope)
        request_id = headers.get("runflow-request-id")
        logged_id = request_id[:MAX_REQUEST_ID] if request_id is not None else None
        try:
            receipt, secret_index, verifying = await _accept(ctx, headers, receive)
        except ReceiverError as exc:
            _refused(ctx, exc.status, str(exc), logged_id, started)
            closing = ((b"connection", b"close"),) if exc.status in (408, 413) else ()
            await _respond(send, exc.status, {"ok": False, "error": str(exc)}, closing)
            return
        except Exception as exc:  # the app's error handler answers 500 and logs the trace
            _refused(ctx, 500, type(exc).__name__, logged_id, started)
            raise
        committed = time.perf_counter()
        ctx.metrics.accepted(receipt.outcome, committed - verifying)
        if receipt.outcome == "stored":
            ctx.notify()
        log.info(
            "callback %s",
            receipt.outcome,
            extra={
                "request_id": logged_id,
                "outcome": receipt.outcome,
                "delivery_id": receipt.delivery_id,
                "evaluation_id": receipt.evaluation_id,
                "secret_index": secret_index,
                "status": 200,
                "method": "POST",
                "path": PATH,
                "duration_ms": round((committed - started) * 1000, 3),
            },
        )
        await _respond(
            send,
            200,
            {
                "ok": True,
                "outcome": receipt.outcome,
                "delivery_id": receipt.delivery_id,
                "evaluation_id": receipt.evaluation_id,
            },
        )


class Shortcut:
    """Middleware that hands POST /webhooks/runflow to `endpoint` before anything else runs."""

    def __init__(self, app: ASGIApp, endpoint: ASGIApp) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST":
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _headers(scope: Scope) -> dict[str, str]:
    """The few request headers the webhook reads (the first of each, as Starlette does)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


async def _respond(
    send: Send, status: int, payload: dict[str, object], extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", b"%d" % len(body)), *extra, *HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _refused(
    ctx: Context, status: int, reason: str, request_id: str | None, started: float
) -> None:
    outcome = ctx.metrics.refused(status)
    log.warning(
        "callback refused: %s",
        reason,
        extra={
            "request_id": request_id,
            "outcome": outcome,
            "reason": reason,
            "status": status,
            "method": "POST",
            "path": PATH,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


async def _accept(
    ctx: Context, headers: dict[str, str], receive: Receive
) -> tuple[Receipt, int | None, float]:
    """Read, verify, parse and store: the receipt, the index of the secret that signed it and
    when verification started (the ingest histogram runs from there to the commit)."""
    settings = ctx.settings
    body = await receive_body(
        receive,
        headers.get("content-length"),
        settings.max_body_bytes,
        settings.body_timeout,
        "RECEIVER_MAX_BODY_BYTES",
    )
    verifying = time.perf_counter()
    signature = headers.get(SIGNATURE_HEADER)
    secret_index = verify(body, signature, settings.webhook_secrets)
    if secret_index is None:
        if signature is None and settings.allow_unsigned:
            log.warning("accepting an unsigned callback (RECEIVER_ALLOW_UNSIGNED=true)")
        elif signature is None:
            raise Unauthorized("missing Runflow-Signature header")
        else:
            raise Unauthorized("Runflow-Signature does not match the body")
    kept = {name: headers[name] for name in KEPT_HEADERS if name in headers}
    request_id = headers.get("runflow-request-id")
    try:
        callback = normalize(parse_body(body))
    except BadRequest as exc:
        await ctx.store.quarantine(body, str(exc), kept, request_id)
        raise
    receipt = await ctx.store.ingest(
        Delivery(
            body=body,
            callback=callback,
            headers=kept,
            request_id=request_id,
            secret_index=secret_index,
        )
    )
    return receipt, secret_index, verifying
