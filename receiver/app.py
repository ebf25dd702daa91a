"""`create_app(settings)`: routes, error handlers, and a lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from functools import partial

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Message, Receive, Scope, Send

from . import api, dashboard, openapi, web
from .config import Settings
from .context import STATE_KEY, Context
from .errors import ConfigError, ReceiverError, StoreTimeout
from .headers import SecurityHeaders
from .logs import REASON, AccessLog, lean_records
from .metrics import Metrics
from .sinks import build_sink
from .store import GLANCE_WAIT, Forwarding, Store
from .worker import Worker

log = logging.getLogger("receiver")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


async def receiver_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ReceiverError)
    headers = (
        {"WWW-Authenticate": "Bearer"}
        if exc.status == 401 and request.url.path.startswith(("/api", "/metrics"))
        else None
    )
    response = error_response(exc.status, str(exc))
    if exc.status >= 500:
        request.scope[REASON] = str(exc)  # for the access line, at ERROR
    if headers:
        response.headers.update(headers)
    if isinstance(exc, StoreTimeout):
        response.headers["Retry-After"] = str(exc.retry_after)
    if exc.status in (408, 413):
        # The body was not read to its end: the connection cannot carry another request,
        # and closing it is what cuts a slow or oversized sender off (uvicorn honours it).
        response.headers["Connection"] = "close"
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reasons = {
        404: f"no such path {request.url.path!r}",
        405: f"{request.method} is not allowed here",
    }
    response = error_response(exc.status_code, reasons.get(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; the server log has the details")


class Receiver(Starlette):
    """Starlette, but an unhandled error ends here once its 500 is sent: ServerErrorMiddleware
    has logged it then (server_error, with the method and path) and raises it again for the
    server, and uvicorn would log the same traceback a second time ("Exception in ASGI
    application", with nothing of the request). One whose response was cut off midway still
    reaches uvicorn, which closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        completed = False

        async def sending(message: Message) -> None:
            nonlocal completed
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True

        try:
            await super().__call__(scope, receive, sending)
        except Exception:
            if not completed:
                raise


def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document())


def http_client() -> httpx.AsyncClient:
    """The one outbound client (sinks, Runflow): bounded timeouts, no redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, connect=5.0),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
    )


def forwarding(settings: Settings) -> Forwarding:
    return Forwarding(
        sinks=settings.sinks, refetch=settings.refetch, reconcile_after=settings.reconcile_after
    )


def check_sinks(settings: Settings) -> None:
    """Make every sink once, as the server would: a sink that cannot work (a bad secret, a
    client library missing) raises its ConfigError now."""

    async def make() -> None:
        async with http_client() as http:
            for spec in settings.sinks:
                build_sink(spec, http)

    asyncio.run(make())


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    http: httpx.AsyncClient | None = None,
    metrics_dir: str | None = None,
) -> Starlette:
    """Build the app; nothing is opened until the lifespan starts. A sink or setting that
    cannot work fails here, before the server listens. `metrics_dir` is the directory that
    several server processes share for /metrics (prometheus-client's multiprocess mode)."""
    settings.check_ingest()
    store = store or Store(
        settings.database,
        setting=settings.database_setting,
        forwarding=forwarding(settings),
        pool_size=settings.database_pool_size,
        max_backlog=settings.max_backlog,
    )
    http = http or http_client()
    metrics = Metrics()
    metrics.expose(
        partial(store.outbox_depth, GLANCE_WAIT),
        [spec.name for spec in settings.sinks],
        metrics_dir,
        apply_backlog=store.apply_backlog,
    )
    worker = (
        Worker.from_settings(settings, store, http, metrics=metrics) if settings.worker else None
    )
    ctx = Context(settings=settings, store=store, http=http, worker=worker, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Context]]:
        loop = asyncio.get_running_loop()
        store.on_applied(partial(loop.call_soon_threadsafe, ctx.notify))
        store.open()
        try:
            if worker is not None:
                await worker.start()
            yield {STATE_KEY: ctx}
        finally:
            if worker is not None:
                await worker.stop()
            await http.aclose()
            store.close()

    app = Receiver(
        routes=[
            Route("/webhooks/runflow", web.webhook, methods=["POST"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/readyz", api.readyz, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Mount(
                "/api",
                routes=api.routes,
                middleware=[Middleware(api.ApiAuth, token=settings.dashboard_token)],
            ),
            *dashboard.routes(),
        ],
        exception_handlers={
            ReceiverError: receiver_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        middleware=[Middleware(AccessLog), Middleware(SecurityHeaders)],
        lifespan=lifespan,
    )
    app.state.receiver = ctx
    return app


def from_env() -> Starlette:
    """App factory for `uvicorn --factory` (used by `receiver serve --workers N`, which shares
    a PROMETHEUS_MULTIPROC_DIR between the processes so /metrics sums them). A worker process
    that cannot start as the others did (its settings changed since, or no longer valid) ends
    with uvicorn's start-up failure, which stops the supervisor with exit status 3: the
    service manager then starts all of them again, on one configuration."""
    from uvicorn.config import STARTUP_FAILURE

    from .supervisor import STARTED_WITH, stop_with_parent

    try:
        settings = Settings.from_env()
        fingerprint = settings.fingerprint()
        if os.environ.get(STARTED_WITH, fingerprint) != fingerprint:
            raise ConfigError(
                "the settings (.env, receiver.toml or the environment) changed since `receiver"
                " serve` started, and a worker started now would differ from the others (other"
                " sinks, say): restart the service to apply them"
            )
        app = create_app(settings, metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None)
    except ConfigError as exc:
        log.error("worker [%s] cannot start: %s", os.getpid(), exc)
        sys.exit(STARTUP_FAILURE)

    lean_records()  # each worker process configures its own logging
    stop_with_parent()
    gc.freeze()  # the start-up heap is permanent: full collections stop walking it
    return app
