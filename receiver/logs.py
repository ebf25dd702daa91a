"""Logging for `receiver serve` and `receiver worker`: one JSON object per line on standard error
(or readable text in a terminal), uvicorn's loggers included, and one line per HTTP request in
place of uvicorn's access log.

A line carries `time`, `level`, `logger`, `message` and the record's extra fields (`request_id`,
`outcome`, `delivery_id`, `evaluation_id`, `status`, `path`, `method`, `duration_ms`, …). Nothing
here logs a body, a signature, a token, a key or a sink URL; third-party clients that would
print URLs (httpx prints every request's full URL, and webhook URLs carry their tokens) are held
at WARNING.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import re
import time
from collections.abc import Iterator
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .times import second

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's duplicate of the message with terminal colours
}
# Loggers that would print URLs with credentials or tokens at INFO/DEBUG.
QUIET_LIBRARIES = ("httpx", "httpx2", "httpcore", "aio_pika", "aiormq", "nats", "redis", "hpack")
WEBHOOK_PATH = "/webhooks/runflow"
# Requests logged at DEBUG unless they fail: probes, scrapes, assets and live-row polling.
ROUTINE_PREFIXES = ("/healthz", "/readyz", "/metrics", "/static/", "/partials/")
# The scope entry in which the app leaves why it answered 500 or more, for the access line.
REASON = "receiver.reason"


def _time(created: float) -> str:
    return f"{second(int(created))}.{int((created - int(created)) * 1000):03d}Z"


_encode = json.JSONEncoder(default=str).encode  # one encoder, not one per line


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


def _library_exception(record: logging.LogRecord) -> None:
    """A client library's exception as one line (`Type: message`), not its traceback: a
    broker restarting (RabbitMQ, NATS) or a queue going away is routine for them, and the
    sink says so in its own line; their tracebacks only buried it."""
    if record.exc_info and not record.exc_text and record.name.split(".")[0] in QUIET_LIBRARIES:
        kind, error = record.exc_info[0], record.exc_info[1]
        name = kind.__name__ if kind is not None else "Exception"
        record.exc_text = f"{name}: {error}".splitlines()[0][:500] if str(error) else name


class JsonFormatter(logging.Formatter):
    """One JSON object per line (ASCII, so any terminal or collector reads it)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(
            record.created, record.levelname, record.name, record.getMessage(), extra_fields(record)
        )
        if record.exc_info:
            _library_exception(record)
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _encode(entry)


def _entry(
    created: float, level: str, logger: str, message: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """A JSON line's object: the four fields every line has, then the record's own (which
    never replace those four)."""
    entry = {"time": _time(created), "level": level, "logger": logger, "message": message}
    for key, value in fields.items():
        entry.setdefault(key, value)
    return entry


def _utc(seconds: float | None) -> time.struct_time:
    return time.gmtime(seconds)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value …` for people reading a terminal; the time in
    UTC, as in the JSON lines."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        self.converter = _utc

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, control characters escaped: a request path with %0A in it must not start
        a line of its own that reads like ours. (A traceback, added after, keeps its lines.)"""
        return _CONTROL.sub(_escape, super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        _library_exception(record)
        text = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return text
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in extras.items())
        head, newline, tail = text.partition("\n")  # keep a traceback below the fields
        return f"{head} {pairs}{newline}{tail}"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode()


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and all(c.isprintable() and c not in ' "=' for c in value):
        return value
    return json.dumps(value, default=str)


# A write to a pipe of at most this many bytes is never split by another process's: the lines
# of `serve --workers N`, on one stderr, stay whole however much is written at once.
PIPE_BUF = 4096


def _pieces(lines: list[str]) -> Iterator[str]:
    """Whole lines, joined into pieces of at most PIPE_BUF bytes (a longer line alone)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode())
        if piece and size + length > PIPE_BUF:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "".join(piece)


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes the webhook's lines of one event loop turn together: in
    writes of up to PIPE_BUF bytes, whole lines each.

    Why: under load the webhook logs a line per callback, and a write per line (the GIL let go
    and taken back around each) cost more than making the line (docs/performance.md). A line
    given to `batch` on a thread running an event loop waits for the end of that loop's turn
    (one `call_soon`); any other line (every record logging hands it) is written at once, after
    those waiting, so the order holds and nothing else waits. `logging.shutdown` (at exit)
    writes whatever still waits."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line + self.terminator)  # the caller holds the lock
        self.flush()

    def batch(self, line: str) -> None:
        """Write a formatted line by the end of this event loop turn (at once off a loop)."""
        self.acquire()
        try:
            self._pending.append(line + self.terminator)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            if len(self._pending) == 1:
                loop.call_soon(self.flush)
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            pending, self._pending = self._pending, []
            for piece in _pieces(pending):
                self.stream.write(piece)
                self.stream.flush()
            super().flush()
        except Exception:  # as StreamHandler would: report it, and carry on
            self.handleError(logging.makeLogRecord({"msg": "(the lines waiting)"}))
        finally:
            self.release()


def info(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """`logger.info(message, extra=fields)` for a line per callback. When the only thing that
    would see the record is the JSON handler `configure` installs (no other handler or filter
    on the way), the line goes straight to it, the same line without a LogRecord and logging's
    dispatch, and is written with the others of its loop turn: a sixth of a callback's cost
    under load (docs/performance.md)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_handler(logger)
    if handler is None:
        logger.info(message, extra=fields)
        return
    try:
        line = _encode(_entry(time.time(), "INFO", logger.name, message, fields))
    except Exception:  # logging reports what it cannot format, and never raises
        logger.info(message, extra=fields)
        return
    handler.batch(line)


def _sole_handler(logger: logging.Logger) -> BatchingStreamHandler | None:
    root = logging.root
    if len(root.handlers) != 1 or root.filters:
        return None
    handler = root.handlers[0]
    if (
        type(handler) is not BatchingStreamHandler
        or type(handler.formatter) is not JsonFormatter
        or handler.filters
        or handler.level > logging.INFO
    ):
        return None
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    return handler


def resolve_format(name: str, stream: TextIO) -> str:
    """`auto` is text in a terminal and JSON anywhere else (services, containers, files)."""
    if name != "auto":
        return name
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def config(log_format: str, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` document; also uvicorn's `log_config`, which configures
    each `--workers` process with it. `log_format` is `json` or `text` (resolved already)."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    upper = level.upper()
    quiet = max(logging.WARNING, logging.getLevelName(upper))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"receiver": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "receiver": {
                "class": f"{__name__}.BatchingStreamHandler",
                "formatter": "receiver",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            # uvicorn's own lines go through the root handler; its access log is replaced by
            # AccessLog (one line per request, with the duration) and stays silent.
            "uvicorn": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            **{
                name: {"handlers": [], "level": logging.getLevelName(quiet), "propagate": True}
                for name in QUIET_LIBRARIES
            },
        },
        "root": {"handlers": ["receiver"], "level": upper},
    }


def lean_records() -> None:
    """Leave out of every record the fields no line of ours shows (thread, process, source
    file and line): each costs the webhook's line a lookup (the logging docs' "Optimization")."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None


def configure(log_format: str, level: str, stream: TextIO) -> dict[str, Any]:
    """Set up logging for this process; returns the document (for uvicorn's `log_config`)."""
    document = config(resolve_format(log_format, stream), level)
    logging.config.dictConfig(document)
    lean_records()
    return document


access_log = logging.getLogger("receiver.access")


class AccessLog:
    """One line per HTTP request (method, path, status, duration) in place of uvicorn's access
    log. The webhook logs its own, richer line, so it is left out here; routine requests
    (probes, scrapes, static files) are logged at DEBUG unless they fail, and an answer of 500
    or more at ERROR, with the `reason` the app left in the scope (REASON). The query string
    is never logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["path"] == WEBHOOK_PATH and scope["method"] == "POST"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = scope["path"]
            routine = path.startswith(ROUTINE_PREFIXES) and status < 400
            level = logging.DEBUG if routine else logging.ERROR if status >= 500 else logging.INFO
            if access_log.isEnabledFor(level):
                fields = {
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                }
                if status >= 500 and REASON in scope:
                    fields["reason"] = scope[REASON]
                access_log.log(level, "%s %s %d", scope["method"], path, status, extra=fields)
