"""The JSON API under /api (bearer token) plus health checks. Handlers are sync: Starlette runs
them on its thread pool, where each thread reads through its own read-only connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import CSRF_HEADER, bearer_ok, identify
from .context import context
from .errors import BadRequest, Forbidden, NotFound, StoreUnavailable, Unauthorized
from .feedback import send_feedback
from .logs import REASON
from .normalize import STATUSES
from .store import ACK_TIMEOUT, EvaluationFilter
from .store.outbox import STATES
from .times import now, parse_moment
from .web import read_body, whole

FILTERS = ("client_ref", "status", "passed", "task_type", "failure_code", "since", "until", "q")
CHANGES = "changed_since"  # lists only: the evaluations written since, oldest change first
MAX_LIMIT = 500
# How long /readyz waits for its write: the writer may wait without end for another process's
# turn (the writers' flock) or a hung PostgreSQL, and a probe that never answers says nothing.
# The bound of a callback's commit, so that ready means a callback would be answered 200.
READY_TIMEOUT = ACK_TIMEOUT
MAX_ROW_ID = 2**63 - 1  # SQLite's largest rowid; a larger path number would overflow the query


class ApiAuth:
    """`/api/*` needs `Authorization: Bearer <RECEIVER_DASHBOARD_TOKEN>` or the dashboard's
    session cookie; with the cookie, a state-changing request must also send X-CSRF-Token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            connection = HTTPConnection(scope)
            identity = identify(connection, self.token)
            if identity is None:
                raise Unauthorized(
                    "missing or wrong token: send Authorization: Bearer <RECEIVER_DASHBOARD_TOKEN>"
                )
            unsafe = scope["method"] not in ("GET", "HEAD", "OPTIONS")
            if unsafe and not identity.csrf_ok(self.token, connection.headers.get(CSRF_HEADER)):
                raise Forbidden("missing or wrong X-CSRF-Token for a cookie-authenticated request")
        await self.app(scope, receive, send)


def _one(params: Mapping[str, str], name: str, max_length: int = 255) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not value or len(value) > max_length:
        raise BadRequest(f"{name} must be 1 to {max_length} characters")
    return value


def _check_known(params: QueryParams, allowed: tuple[str, ...]) -> None:
    """Every parameter known and given once: a repeated one took its last value without a
    word (`?status=failed&status=completed` listed the completed ones)."""
    expected = f"expected one of {', '.join(allowed)}" if allowed else "this takes none"
    seen: set[str] = set()
    for name, _ in params.multi_items():
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name!r}; {expected}")
        if name in seen:
            raise BadRequest(f"parameter {name!r} given more than once; give it once")
        seen.add(name)


def evaluation_filter(params: Mapping[str, str]) -> EvaluationFilter:
    """Query parameters → filter; a bad value is a 400 that names its parameter."""
    status = _one(params, "status")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    passed_text = _one(params, "passed")
    passed = None
    if passed_text is not None:
        if passed_text.lower() not in ("true", "false", "1", "0"):
            raise BadRequest(f"passed must be true or false, got {passed_text!r}")
        passed = passed_text.lower() in ("true", "1")
    bounds = {}
    for name in ("since", "until", CHANGES):
        text = _one(params, name)
        try:
            bounds[name] = None if text is None else parse_moment(text)
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from None
    q = _one(params, "q", 200)
    if q is not None and "\x00" in q:  # FTS5 reads NUL as the end of its query string
        raise BadRequest("q must not contain NUL characters")
    return EvaluationFilter(
        client_ref=_one(params, "client_ref"),
        status=status,
        passed=passed,
        task_type=_one(params, "task_type"),
        failure_code=_one(params, "failure_code"),
        since=bounds["since"],
        until=bounds["until"],
        q=q,
        changed_since=bounds[CHANGES],
    )


def _limit(params: Mapping[str, str]) -> int:
    text = params.get("limit", "50")
    limit = whole(text, MAX_LIMIT)
    if not limit:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {text!r}")
    return limit


def row_id(request: Request, name: str, what: str) -> int:
    """A numeric path parameter (`{name:int}`) as a row id; NotFound when no row can have it."""
    value: int = request.path_params[name]
    if value > MAX_ROW_ID:
        raise NotFound(f"no {what} {value}")
    return value


def list_evaluations(request: Request) -> Response:
    params = request.query_params
    _check_known(params, (*FILTERS, CHANGES, "limit", "cursor"))
    items, next_cursor = context(request).store.list_evaluations(
        evaluation_filter(params), _limit(params), _one(params, "cursor", 1000)
    )
    return JSONResponse({"items": items, "next_cursor": next_cursor})


def get_evaluation(request: Request) -> Response:
    _check_known(request.query_params, ())
    evaluation_id = request.path_params["evaluation_id"]
    found = context(request).store.get_evaluation(evaluation_id)
    if found is None:
        raise NotFound(f"no evaluation {evaluation_id!r}")
    return JSONResponse(found)


def get_client_ref(request: Request) -> Response:
    _check_known(request.query_params, ())
    client_ref = request.path_params["client_ref"]
    found = context(request).store.get_client_ref(client_ref)
    if found is None:
        raise NotFound(f"no evaluation with client_ref {client_ref!r}")
    return JSONResponse(found)


def get_stats(request: Request) -> Response:
    _check_known(request.query_params, FILTERS)
    return JSONResponse(context(request).store.stats(evaluation_filter(request.query_params)))


def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    """Ready when an (empty) write transaction commits right now and the worker (if it runs
    in this process) is running."""
    ctx = context(request)
    try:
        await asyncio.wait_for(ctx.store.probe(), READY_TIMEOUT)
    except TimeoutError:
        raise StoreUnavailable(
            f"the store took no write within {READY_TIMEOUT:g} s (another process holds"
            " the writer's turn, or the database hangs)"
        ) from None
    if ctx.worker is not None and not ctx.worker.running:
        request.scope[REASON] = "the worker is not running"
        return JSONResponse({"ok": False, "error": "the worker is not running"}, status_code=503)
    return JSONResponse(
        {"ok": True, "store": "writable", "worker": "running" if ctx.worker else "separate"}
    )


def metrics(request: Request) -> Response:
    """Prometheus exposition. Needs the bearer token: RECEIVER_METRICS_TOKEN (which opens
    nothing else) or RECEIVER_DASHBOARD_TOKEN (or the dashboard's session cookie)."""
    ctx = context(request)
    settings = ctx.settings
    scraper = settings.metrics_token is not None and bearer_ok(
        request.headers.get("authorization"), settings.metrics_token
    )
    if not scraper and identify(request, settings.dashboard_token) is None:
        raise Unauthorized(
            "missing or wrong token: send Authorization: Bearer <RECEIVER_METRICS_TOKEN> "
            "(or <RECEIVER_DASHBOARD_TOKEN>)"
        )
    body, content_type = ctx.metrics.render(request.headers.get("accept"))
    return Response(body, headers={"content-type": content_type, "cache-control": "no-store"})


def forwards_after(cursor: str | None) -> int | None:
    """The last forward id of the previous page, from its `next_cursor` (`receiver forwards
    --cursor` takes the same)."""
    after = None if cursor is None else whole(cursor, MAX_ROW_ID)
    if cursor is not None and after is None:
        raise BadRequest("cursor is not valid: pass next_cursor from the previous page unchanged")
    return after


def list_forwards(request: Request) -> Response:
    params = request.query_params
    _check_known(params, ("state", "sink", "limit", "cursor"))
    state = _one(params, "state")
    if state is not None and state not in STATES:
        raise BadRequest(f"state must be one of {', '.join(STATES)}, got {state!r}")
    limit = _limit(params)
    items = context(request).store.list_forwards(  # one more: is there a next page?
        state=state,
        sink=_one(params, "sink"),
        limit=limit + 1,
        after=forwards_after(_one(params, "cursor")),
    )
    next_cursor = str(items[limit - 1]["id"]) if len(items) > limit else None
    items = items[:limit]
    return JSONResponse({"items": items, "next_cursor": next_cursor})


async def retry_forward(request: Request) -> Response:
    ctx = context(request)
    forward = await ctx.store.retry_forward(row_id(request, "forward_id", "forward"), now())
    ctx.notify()
    return JSONResponse({"ok": True, "forward": forward})


async def replay_delivery(request: Request) -> Response:
    ctx = context(request)
    delivery_id = row_id(request, "delivery_id", "delivery")
    queued = await ctx.store.replay_delivery(delivery_id, now())
    ctx.notify()
    return JSONResponse({"ok": True, "queued": queued})


# `reason` may be 2000 characters, up to 12 bytes each as JSON escapes (a surrogate pair).
MAX_FEEDBACK_BODY = 32 * 1024


async def patch_feedback(request: Request) -> Response:
    """`{"is_positive": true|false|null, "reason": "..."}` → Runflow → stored → the evaluation."""
    _check_known(request.query_params, ())
    ctx = context(request)
    evaluation_id = request.path_params["evaluation_id"]
    body = await read_body(request, MAX_FEEDBACK_BODY)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        raise BadRequest(
            'body must be JSON: {"is_positive": true|false|null, "reason": …}'
        ) from None
    if not isinstance(payload, dict) or "is_positive" not in payload:
        raise BadRequest("body must be an object with is_positive (true, false or null)")
    unknown = set(payload) - {"is_positive", "reason"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}; expected is_positive, reason")
    is_positive, reason = payload["is_positive"], payload.get("reason")
    if is_positive is not None and not isinstance(is_positive, bool):
        raise BadRequest("is_positive must be true, false or null")
    if reason is not None and not isinstance(reason, str):
        raise BadRequest("reason must be a string")
    await send_feedback(ctx.settings, ctx.store, ctx.http, evaluation_id, is_positive, reason)
    found = await asyncio.to_thread(ctx.store.get_evaluation, evaluation_id)  # off the loop
    return JSONResponse({"ok": True, "evaluation": found["evaluation"] if found else None})


routes = [
    Route("/evaluations", list_evaluations, methods=["GET"]),
    Route("/evaluations/{evaluation_id}/feedback", patch_feedback, methods=["PATCH"]),
    Route("/evaluations/{evaluation_id:path}", get_evaluation, methods=["GET"]),
    Route("/client-refs/{client_ref:path}", get_client_ref, methods=["GET"]),
    Route("/stats", get_stats, methods=["GET"]),
    Route("/forwards", list_forwards, methods=["GET"]),
    Route("/forwards/{forward_id:int}/retry", retry_forward, methods=["POST"]),
    Route("/deliveries/{delivery_id:int}/replay", replay_delivery, methods=["POST"]),
]
