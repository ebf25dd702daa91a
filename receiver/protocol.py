"""`receiver serve`'s HTTP protocol: uvicorn's httptools protocol, which answers the common
callback itself instead of through ASGI.

Why: per callback, the ASGI path (a task, Starlette's routing and middleware, the `Request`,
two socket writes) cost more CPU than verifying, parsing and storing it (docs/performance.md).
Here a POST to the webhook with a small body (up to 64 KiB, arriving within
RECEIVER_BODY_TIMEOUT), signed by a current secret and parseable, is stored through the same
writer and answered in one write, with the status, headers, body, metrics and log line of the
endpoint in web.py. Anything else (a refusal, a larger or slower body, `Expect:
100-continue`, a query string, a store error or timeout, any failure) goes to the app as
uvicorn would have sent it, body included, and the endpoint answers: every reason, limit and
the quarantine stay in one place. Every connection also keeps one keep-alive timer instead of
one per response.

Built on uvicorn's protocol internals (`_start_asgi_task`, `RequestResponseCycle`), so
pyproject.toml pins uvicorn's minor version and tests/test_protocol.py checks both paths.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import CancelledError
from collections.abc import Iterable
from functools import partial
from typing import Any, cast

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .context import STATE_KEY, Context
from .errors import StoreTimeout
from .headers import HEADERS
from .logs import WEBHOOK_PATH
from .normalize import normalize, parse_body
from .signing import SIGNATURE_HEADER, verify
from .store import Receipt
from .web import BODY_WAITED, GAVE_UP, STARTED, acknowledged, kept_headers, received, whole

# After uvicorn's date and server headers: what Response and SecurityHeaders add, in order.
_HEAD = b"HTTP/1.1 200 OK\r\n"
_TAIL = b"content-type: application/json\r\n" + b"".join(
    name + b": " + value + b"\r\n" for name, value in HEADERS
)
_UNPARSEABLE = (
    b"HTTP/1.1 400 Bad Request\r\n",
    b'{"ok":false,"error":"invalid HTTP request: the connection is closed"}',
)
# A request's head (request line and headers): uvicorn's httptools protocol bounds neither its
# size nor how long it may take, so one connection could hold a server's memory (64 MB of
# header lines: +60 MB) or a connection for ever. As nginx's large_client_header_buffers and
# client_header_timeout bound them.
MAX_HEAD = 64 * 1024
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
    b'{"ok":false,"error":"request headers larger than 65536 bytes"}',
)
_HEAD_TOO_SLOW = (
    b"HTTP/1.1 408 Request Timeout\r\n",
    b'{"ok":false,"error":"request headers not received within RECEIVER_BODY_TIMEOUT"}',
)


def response(
    default_headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool, head: bytes = _HEAD
) -> bytes:
    """A 200 (or the status line `head`) with a JSON body, as uvicorn would write the
    endpoint's answer."""
    parts = [head]
    for name, value in default_headers:
        parts += [name, b": ", value, b"\r\n"]
    parts += [b"content-length: %d\r\n" % len(body), _TAIL]
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", body]
    return b"".join(parts)


def _declared_within(headers: Iterable[tuple[bytes, bytes]], most: int) -> bool:
    """Whether the Content-Length, if any (a chunked body has none), is a number up to `most`."""
    for name, value in headers:
        if name == b"content-length":
            return whole(value.decode("latin-1"), most) is not None
    return True


class HeadTooLarge(Exception):
    """Raised in the parser's callback to stop it once the 431 is written."""


class WebhookProtocol(HttpToolsProtocol):
    _held: RequestResponseCycle | None = None  # a callback whose body is still arriving
    _held_since = 0.0  # time.perf_counter() when its headers arrived
    _deadline: asyncio.TimerHandle | None = None
    _idle_since: float | None = None  # when the last response ended, if no request came since

    # Keep-alive: uvicorn arms a timer after every response and cancels it on the next
    # request, ~6 % of a callback's CPU. Here one timer per connection, which when it fires
    # closes the connection if it has been idle that long, and else looks again later.

    _heading = False  # between the first byte of a request and the end of its headers
    _head_bytes = 0  # received meanwhile, before the piece being parsed
    _piece = 0  # bytes in the piece being parsed
    _head_deadline: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        """Bytes httptools cannot parse: uvicorn's plain-text 400, in the one error shape."""
        self._refuse(_UNPARSEABLE)

    def _refuse(self, answer: tuple[bytes, bytes]) -> None:
        """Answer with an error and close; nothing to do on a connection already closing."""
        if self.transport.is_closing():
            return
        head, body = answer
        self.transport.write(response(self.server_state.default_headers, body, False, head))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = self.loop.time()  # one that never sends a byte is closed as idle
        self._keep_alive_for(self.timeout_keep_alive)

    def data_received(self, data: bytes) -> None:
        self._piece = len(data)
        super().data_received(data)
        if self._heading and not self.transport.is_closing():  # a head not complete yet
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse(_HEAD_TOO_LARGE)
            elif self._head_deadline is None:  # only now: most heads come in one piece
                ctx = self.app_state.get(STATE_KEY)
                wait = ctx.settings.body_timeout if ctx is not None else 10.0
                self._head_deadline = self.loop.call_later(wait, self._refuse, _HEAD_TOO_SLOW)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heading = True

    def on_headers_complete(self) -> None:
        received, self._heading, self._head_bytes = self._head_bytes, False, 0
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        # A head that ends in this piece was not counted above: measured once it may be large.
        if received + self._piece > MAX_HEAD and self._head_size() > MAX_HEAD:
            self._refuse(_HEAD_TOO_LARGE)
            raise HeadTooLarge  # stops the parser: nothing of this request goes on
        super().on_headers_complete()

    def _head_size(self) -> int:
        """The request line and headers as sent, give or take their separators."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # a request: the timer, if armed, will find the connection busy

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self._keep_alive_for(self.timeout_keep_alive)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:
            return  # busy: the response arms it again
        idle = self.loop.time() - self._idle_since
        if idle >= self.timeout_keep_alive:
            super().timeout_keep_alive_handler()
        else:
            self._keep_alive_for(self.timeout_keep_alive - idle)

    def _keep_alive_for(self, seconds: float) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(
            seconds, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self._held is not None:
            self._release()  # the endpoint logs the sender who left, as it would have

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        ctx = self.app_state.get(STATE_KEY)
        if (
            ctx is None
            or app is not self.app  # uvicorn's 503 when over --limit-concurrency
            or scope["path"] != WEBHOOK_PATH
            or scope["method"] != "POST"
            or scope["query_string"]
            or cycle.waiting_for_100_continue  # the app sends the 100 when it reads
        ):
            super()._start_asgi_task(cycle, app)
        elif not cycle.more_body:
            self._accept(ctx, cycle)
        elif not _declared_within(scope["headers"], HIGH_WATER_LIMIT):
            # More than is ever held here: the app streams it, or refuses it before it is sent
            # (413). A smaller one is read first, so the answer never races a reset.
            super()._start_asgi_task(cycle, app)
        else:  # most clients write the body after the headers: wait for it, as the app would
            self._held, self._held_since = cycle, time.perf_counter()
            self._deadline = self.loop.call_later(ctx.settings.body_timeout, self._release)

    def _holds_at_most(self, ctx: Context) -> int:
        """The most body a callback is held for here; a larger one the app streams (and
        refuses when too large)."""
        return min(HIGH_WATER_LIMIT, ctx.settings.max_body_bytes)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        held = self._held
        if held is not None and len(held.body) > self._holds_at_most(self.app_state[STATE_KEY]):
            self._release()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        held = self._held
        if held is not None and not held.more_body:
            self._unhold()
            self._accept(self.app_state[STATE_KEY], held, self._held_since)

    def _unhold(self) -> None:
        self._held = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _release(self) -> None:
        """Hand the held callback to the app, which reads the rest of its body within what is
        left of RECEIVER_BODY_TIMEOUT."""
        held = self._held
        if held is not None:
            self._unhold()
            scope = cast(dict[str, Any], held.scope)
            scope[BODY_WAITED] = time.perf_counter() - self._held_since
            self._to_app(held, self._held_since)

    def _accept(
        self, ctx: Context, cycle: RequestResponseCycle, started: float | None = None
    ) -> None:
        """Verify, parse and store a whole callback; `started` is when its headers came, if
        its body was held for (the logged duration runs from there)."""
        verifying = time.perf_counter()
        started = verifying if started is None else started
        settings = ctx.settings
        body = bytes(cycle.body)
        headers = kept_headers(cycle.scope["headers"])
        secret_index = verify(body, headers.get(SIGNATURE_HEADER), settings.webhook_secrets)
        if secret_index is None or len(body) > settings.max_body_bytes:
            return self._to_app(cycle, started)
        try:
            delivery = received(body, normalize(parse_body(body)), headers, secret_index)
            stored = ctx.store.accepting(delivery)
        except Exception:  # the app answers it: with the reason, or a 500 that it logs
            return self._to_app(cycle, started)
        stored.add_done_callback(
            partial(self._stored, ctx, cycle, secret_index, delivery.request_id, started, verifying)
        )

    def _stored(
        self,
        ctx: Context,
        cycle: RequestResponseCycle,
        secret_index: int,
        request_id: str | None,
        started: float,
        verifying: float,
        stored: asyncio.Future[Receipt],
    ) -> None:
        error = CancelledError() if stored.cancelled() else stored.exception()
        if error is not None:
            if isinstance(error, StoreTimeout):  # the endpoint answers it without storing
                cast(dict[str, Any], cycle.scope)[GAVE_UP] = error
            # else the endpoint tries again: a 503 if the store is down
            return self._to_app(cycle, started)
        try:
            body = acknowledged(ctx, stored.result(), secret_index, request_id, started, verifying)
        except Exception:  # a failing log handler or metric: the endpoint answers it too
            return self._to_app(cycle, started)
        if cycle.disconnected:
            return
        cycle.response_started = cycle.response_complete = True
        self.transport.write(response(cycle.default_headers, body, cycle.keep_alive))
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def _to_app(self, cycle: RequestResponseCycle, started: float) -> None:
        cast(dict[str, Any], cycle.scope)[STARTED] = started
        super()._start_asgi_task(cycle, self.app)
