"""Structured logs: one JSON object per line with the record's fields; one line per callback
carrying its Runflow-Request-Id; refusals at WARNING with the reason; nothing secret; one
access line per other request instead of uvicorn's; RECEIVER_LOG_FORMAT / RECEIVER_LOG_LEVEL."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from receiver import logs
from receiver.app import create_app
from receiver.config import Settings
from receiver.errors import ConfigError
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign

from .helpers import SECRET_A, SECRET_B, TOKEN, auth, fixture, make_settings, post_callback
from .servers import ReceiverProcess

EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"


def record(message: str = "hello %s", *args: object, **extra: Any) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": "receiver.test", "levelno": logging.INFO, "levelname": "INFO", "msg": message}
    )
    made.args = args or ("world",)
    made.__dict__.update(extra)
    return made


def as_json(line: str) -> dict[str, Any]:
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


# the formatters


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    line = logs.JsonFormatter().format(
        record(request_id="req-1", outcome="stored", delivery_id=7, duration_ms=1.5)
    )
    entry = as_json(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "receiver.test"
    assert entry["message"] == "hello world"
    assert entry["time"].endswith("Z")
    assert "T" in entry["time"]
    assert (entry["request_id"], entry["outcome"], entry["delivery_id"]) == ("req-1", "stored", 7)
    assert entry["duration_ms"] == 1.5
    assert "args" not in entry
    assert "msg" not in entry
    assert "levelno" not in entry


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1795000000.25, "2026-11-18T11:06:40.250Z"),
        (1795000059.999, "2026-11-18T11:07:39.999Z"),
        (1795000060.0, "2026-11-18T11:07:40.000Z"),
    ],
)
def test_the_time_is_utc_to_the_millisecond(created: float, expected: str) -> None:
    made = logging.makeLogRecord({"msg": "hello", "created": created})
    made.msecs = int((created - int(created)) * 1000)  # as LogRecord sets it
    assert as_json(logs.JsonFormatter().format(made))["time"] == expected


def test_a_json_line_stays_one_line_with_newlines_tracebacks_and_odd_values() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = record("multi\nline %s", "value\r\nx", thing=object(), color_message="\x1b[1m")
        failed.exc_info = sys.exc_info()
    entry = as_json(logs.JsonFormatter().format(failed))
    assert entry["message"] == "multi\nline value\r\nx"
    assert "ValueError: boom" in entry["exception"]
    assert entry["thing"].startswith("<object object")
    assert "color_message" not in entry  # uvicorn's coloured duplicate


@pytest.mark.parametrize("logger", ["aiormq.connection", "aio_pika.robust_connection", "nats"])
@pytest.mark.parametrize("formatter", [logs.JsonFormatter, logs.TextFormatter])
def test_a_client_library_exception_is_one_line(
    logger: str, formatter: type[logging.Formatter]
) -> None:
    """A broker restarting is routine for its client library, which logged a traceback; the
    sink says what failed in its own line. Our own exceptions keep theirs."""
    for name, whole in ((logger, False), ("receiver.worker", True)):
        try:
            raise ConnectionError("CONNECTION_FORCED - broker forced connection closure\nmore")
        except ConnectionError:
            failed = record("connection lost: %s", name=name)
            failed.exc_info = sys.exc_info()
        line = formatter().format(failed)
        assert "ConnectionError: CONNECTION_FORCED - broker forced connection closure" in line
        assert ("Traceback" in line) is whole
        assert ("more" in line) is whole


def test_text_lines_append_the_fields() -> None:
    line = logs.TextFormatter().format(record(request_id="req 1", outcome="stored", status=200))
    assert "INFO receiver.test: hello world" in line
    assert line.endswith('request_id="req 1" outcome=stored status=200')


def test_text_lines_tell_the_time_in_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        entry = record()
        entry.created, entry.msecs = 1_800_000_000.25, 250.0
        line = logs.TextFormatter().format(entry)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line.startswith("2027-01-15T08:00:00.250Z INFO receiver.test: hello world")


def test_a_text_line_cannot_be_split_by_what_a_client_sent() -> None:
    """A request path with %0A in it must not start a line that reads like one of ours; a
    traceback keeps its lines."""
    forged = "/nope\n2026-11-24 09:00:00,000 WARNING receiver.web: callback refused\r\x1b[31m\u2028"
    entry = logging.LogRecord("receiver.access", logging.INFO, "", 0, "GET %s 404", (forged,), None)
    line = logs.TextFormatter().format(entry)
    assert not any(control in line for control in "\n\r\x1b\u2028")
    assert "GET /nope\\n2026-11-24 09:00:00,000 WARNING" in line
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("receiver", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    assert (
        logs.TextFormatter().format(failed).splitlines()[1] == "Traceback (most recent call last):"
    )


@pytest.mark.parametrize(
    ("given", "tty", "expected"),
    [
        ("auto", True, "text"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("text", False, "text"),
    ],
)
def test_auto_is_text_in_a_terminal_and_json_elsewhere(
    given: str, tty: bool, expected: str
) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert logs.resolve_format(given, Stream()) == expected


def test_the_logging_config_keeps_url_printing_clients_quiet_and_uvicorn_access_off() -> None:
    document = logs.config("json", "debug")
    assert document["root"]["level"] == "DEBUG"
    assert document["formatters"]["receiver"]["()"] == "receiver.logs.JsonFormatter"
    for name in ("httpx", "httpcore", "aio_pika", "nats"):
        assert document["loggers"][name]["level"] == "WARNING"
    assert document["loggers"]["uvicorn.access"] == {
        "handlers": [],
        "level": "WARNING",
        "propagate": False,
    }
    assert logs.config("text", "error")["loggers"]["httpx"]["level"] == "ERROR"
    assert logs.config("text", "info")["formatters"]["receiver"]["()"].endswith("TextFormatter")


# the handler: a loop's lines in one write


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def messages(self) -> list[str]:
        return [as_json(line)["message"] for line in self.getvalue().splitlines()]


@contextmanager
def handling(formatter: logging.Formatter | None = None) -> Iterator[tuple[Writes, logging.Logger]]:
    """The root logger with one BatchingStreamHandler, as `configure` leaves it (pytest's own
    capture handlers set aside meanwhile)."""
    stream = Writes()
    handler = logs.BatchingStreamHandler(stream)
    handler.setFormatter(formatter or logs.JsonFormatter())
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logger = logging.getLogger("receiver.test.lines")
    try:
        yield stream, logger
    finally:
        handler.close()
        root.handlers = saved
        root.setLevel(level)
        logger.handlers, logger.filters = [], []
        logger.setLevel(logging.NOTSET)  # and forget what it cached


def test_the_webhook_lines_of_one_loop_turn_are_written_in_one_write() -> None:
    with handling() as (stream, logger):

        async def main() -> None:
            for number in range(3):
                logs.info(logger, f"callback {number}", {"outcome": "stored"})
            assert stream.writes == []  # not during the turn
            await asyncio.sleep(0)
            assert len(stream.writes) == 1
            assert stream.messages() == ["callback 0", "callback 1", "callback 2"]

        asyncio.run(main())


def test_a_turn_of_many_lines_is_written_in_pieces_a_pipe_keeps_whole() -> None:
    """`serve --workers N` processes share one stderr pipe: a write over PIPE_BUF bytes can be
    split by another process's, which left half lines. Each write is whole lines, within it."""
    with handling() as (stream, logger):

        async def main() -> None:
            for number in range(60):
                logs.info(logger, f"callback {number} ✓", {"request_id": "r" * 200})
            await asyncio.sleep(0)

        asyncio.run(main())
    assert len(stream.writes) > 1
    assert all(len(write.encode()) <= logs.PIPE_BUF for write in stream.writes)
    assert all(write.endswith("\n") for write in stream.writes)
    assert stream.messages() == [f"callback {number} ✓" for number in range(60)]


def test_any_other_line_is_written_at_once_after_those_waiting() -> None:
    with handling() as (stream, logger):

        async def main() -> None:
            logs.info(logger, "callback stored", {})
            logger.warning("a record")
            assert stream.messages() == ["callback stored", "a record"]
            logs.info(logger, "from the loop", {})
            thread = threading.Thread(target=logs.info, args=(logger, "from a thread", {}))
            thread.start()
            thread.join()
            assert stream.messages()[2:] == ["from the loop", "from a thread"]

        asyncio.run(main())
        logs.info(logger, "no loop", {})
        assert stream.messages()[-1] == "no loop"


def test_closing_the_handler_writes_what_waits() -> None:
    with handling() as (stream, logger):

        async def main() -> None:
            logs.info(logger, "last words", {})
            logging.getLogger().handlers[0].close()  # as logging.shutdown does at exit

        asyncio.run(main())
        assert stream.messages() == ["last words"]


def test_a_line_that_cannot_be_made_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    with handling() as (stream, logger):
        logs.info(logger, "callback stored", {"odd": Unprintable()})
        logs.info(logger, "callback after", {})
        assert stream.messages() == ["callback after"]
    assert "Logging error" in capsys.readouterr().err


def text_formatter() -> None:
    logging.getLogger().handlers[0].setFormatter(logs.TextFormatter())


def another_handler() -> None:
    logging.getLogger().addHandler(logging.NullHandler())


def a_filter() -> None:
    logging.getLogger("receiver.test.lines").addFilter(lambda item: item.getMessage() != "drop")


def quiet_logger() -> None:
    logging.getLogger("receiver.test.lines").setLevel(logging.WARNING)


def quiet_handler() -> None:
    logging.getLogger().handlers[0].setLevel(logging.WARNING)


@pytest.mark.parametrize(
    ("setup", "records", "written"),
    [
        (None, 0, ["callback stored"]),  # only our JSON handler: the line, without a record
        (text_formatter, 1, None),
        (another_handler, 1, ["callback stored"]),
        (a_filter, 1, ["callback stored"]),
        (quiet_logger, 0, []),
        (quiet_handler, 1, []),
    ],
)
def test_a_line_per_callback_goes_around_logging_only_when_nothing_else_would_see_it(
    setup: Callable[[], None] | None, records: int, written: list[str] | None
) -> None:
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    fields = {"outcome": "stored", "delivery_id": 7, "request_id": None, "duration_ms": 1.5}
    logging.setLogRecordFactory(counting)
    try:
        with handling() as (stream, logger):
            if setup is not None:
                setup()
            logs.info(logger, "callback stored", fields)
            logs.info(logger, "drop", fields)  # what a_filter drops: all others log it
            made_here = [item for item in made if item.getMessage() == "callback stored"]
            assert len(made_here) == records
            if written is not None:
                assert stream.messages()[: len(written)] == written
            if setup is None:  # the same line logging would have written
                via_logging = logs.JsonFormatter().format(
                    logging.makeLogRecord(
                        {"name": logger.name, "levelname": "INFO", "msg": "callback stored"}
                        | fields
                    )
                )
                direct = as_json(stream.getvalue().splitlines()[0])
                expected = as_json(via_logging)
                assert direct.pop("time").endswith("Z")
                expected.pop("time")
                assert direct == expected
                assert list(direct) == list(expected)  # and in the same order
    finally:
        logging.setLogRecordFactory(factory)


# settings


def test_log_settings_default_and_parse(tmp_path: Path) -> None:
    base = {"RUNFLOW_WEBHOOK_SECRET": "whsec_x"}
    default = Settings.from_env(base, env_file=None)
    assert (default.log_format, default.log_level) == ("auto", "info")
    given = Settings.from_env(
        {**base, "RECEIVER_LOG_FORMAT": "JSON", "RECEIVER_LOG_LEVEL": "Warning"}, env_file=None
    )
    assert (given.log_format, given.log_level) == ("json", "warning")


@pytest.mark.parametrize(
    ("name", "bad"), [("RECEIVER_LOG_FORMAT", "yaml"), ("RECEIVER_LOG_LEVEL", "loud")]
)
def test_a_bad_log_setting_names_its_variable(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be one of .*got '{bad}'"):
        Settings.from_env({"RUNFLOW_WEBHOOK_SECRET": "whsec_x", name: bad}, env_file=None)


# what the app logs


def lines_of(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = logs.JsonFormatter()
    return [as_json(formatter.format(item)) for item in caplog.records]


def test_a_callback_logs_one_line_with_its_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = fixture("evaluation-completed.json")
    with (
        TestClient(create_app(make_settings(tmp_path, worker=False))) as client,
        caplog.at_level(logging.DEBUG),
    ):
        response = post_callback(client, body, headers={"runflow-request-id": "req-abc-123"})
    assert response.status_code == 200
    lines = lines_of(caplog)
    (line,) = [entry for entry in lines if entry["logger"] == "receiver.web"]
    assert line["level"] == "INFO"
    assert line["message"] == "callback stored"
    assert line["request_id"] == "req-abc-123"
    assert line["outcome"] == "stored"
    assert line["delivery_id"] == response.json()["delivery_id"]
    assert line["evaluation_id"] == EVALUATION_ID
    assert line["secret_index"] == 0
    assert (line["status"], line["method"], line["path"]) == (200, "POST", "/webhooks/runflow")
    assert line["duration_ms"] > 0
    # the webhook's own line is its access line: no second one for the same request
    assert not [entry for entry in lines if entry["logger"] == "receiver.access"]
    text = "\n".join(json.dumps(entry) for entry in lines)
    for secret in (SECRET_A, SECRET_B, TOKEN, sign(body, SECRET_A)):
        assert secret not in text
    assert "generated_image_url" not in text
    assert "cdn." not in text


@pytest.mark.parametrize(
    ("secret", "content", "outcome", "status"),
    [
        ("whsec_wrong", None, "bad_signature", 401),
        (None, None, "bad_signature", 401),
        (SECRET_A, b"[1]", "bad_request", 400),
    ],
)
def test_refusals_log_a_warning_with_the_reason_and_nothing_secret(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    secret: str | None,
    content: bytes | None,
    outcome: str,
    status: int,
) -> None:
    body = content or fixture("evaluation-completed.json")
    with (
        TestClient(create_app(make_settings(tmp_path, worker=False))) as client,
        caplog.at_level(logging.INFO),
    ):
        response = post_callback(client, body, secret, headers={"runflow-request-id": "req-9"})
    assert response.status_code == status
    (line,) = [entry for entry in lines_of(caplog) if entry["logger"] == "receiver.web"]
    assert line["level"] == "WARNING"
    assert (line["outcome"], line["status"], line["request_id"]) == (outcome, status, "req-9")
    assert line["reason"] == response.json()["error"]
    assert line["message"] == f"callback refused: {line['reason']}"
    text = json.dumps(line)
    for value in (SECRET_A, SECRET_B, "whsec_wrong", sign(body, secret or SECRET_A)):
        assert value not in text


def test_a_long_request_id_is_cut_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        TestClient(create_app(make_settings(tmp_path, worker=False))) as client,
        caplog.at_level(logging.INFO),
    ):
        post_callback(
            client, fixture("evaluation-completed.json"), headers={"runflow-request-id": "r" * 5000}
        )
    (line,) = [entry for entry in lines_of(caplog) if entry["logger"] == "receiver.web"]
    assert line["request_id"] == "r" * 200


def test_other_requests_get_one_access_line_without_the_query(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        TestClient(create_app(make_settings(tmp_path, worker=False))) as client,
        caplog.at_level(logging.DEBUG, logger="receiver.access"),
    ):
        assert client.get("/api/evaluations?client_ref=private-ref", headers=auth()).is_success
        assert client.get("/api/evaluations").status_code == 401
        assert client.get("/healthz").is_success
        assert client.get("/metrics", headers=auth()).is_success
    lines = [entry for entry in lines_of(caplog) if entry["logger"] == "receiver.access"]
    assert [(e["level"], e["method"], e["path"], e["status"]) for e in lines] == [
        ("INFO", "GET", "/api/evaluations", 200),
        ("INFO", "GET", "/api/evaluations", 401),
        ("DEBUG", "GET", "/healthz", 200),  # probes and scrapes only at DEBUG
        ("DEBUG", "GET", "/metrics", 200),
    ]
    assert all(entry["duration_ms"] >= 0 for entry in lines)
    assert "private-ref" not in json.dumps(lines)
    assert TOKEN not in json.dumps(lines)


# `receiver serve`


def test_serve_writes_json_lines_and_no_uvicorn_access_log(tmp_path: Path) -> None:
    body = fixture("evaluation-completed.json")
    with ReceiverProcess(tmp_path, RECEIVER_LOG_FORMAT="auto") as server:  # not a terminal
        headers = {
            "content-type": "application/json",
            "runflow-signature": sign(body, SECRET_A),
            "runflow-request-id": "req-from-runflow-1",
        }
        response = httpx.post(f"{server.url}/webhooks/runflow", content=body, headers=headers)
        assert response.status_code == 200
        httpx.get(f"{server.url}/api/evaluations", headers=auth())
    output = server.log.read_text()
    entries = [as_json(line) for line in output.splitlines() if line.startswith("{")]
    (callback,) = [entry for entry in entries if entry.get("request_id") == "req-from-runflow-1"]
    assert (callback["logger"], callback["outcome"]) == ("receiver.web", "stored")
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)
    assert any(entry.get("path") == "/api/evaluations" for entry in entries)
    assert '"POST /webhooks/runflow HTTP/1.1" 200' not in output  # uvicorn's access line
    # every log line is JSON; only the start-up banner (stdout) is plain text
    for line in output.splitlines():
        assert line.startswith(("{", "receiver: ")), line
    for secret in (SECRET_A, SECRET_B, TOKEN, headers["runflow-signature"]):
        assert secret not in output


def test_serve_text_format_and_level(tmp_path: Path) -> None:
    with ReceiverProcess(tmp_path, RECEIVER_LOG_FORMAT="text", RECEIVER_LOG_LEVEL="warning") as s:
        post_callback_over_http(s.url, fixture("evaluation-completed.json"), "whsec_wrong")
    output = s.log.read_text()
    assert not any(line.startswith("{") for line in output.splitlines())
    assert "WARNING receiver.web: callback refused" in output
    assert "outcome=bad_signature" in output
    assert "INFO" not in output  # uvicorn's start-up lines are below the level


def post_callback_over_http(url: str, body: bytes, secret: str) -> httpx.Response:
    headers = {"content-type": "application/json", "runflow-signature": sign(body, secret)}
    return httpx.post(f"{url}/webhooks/runflow", content=body, headers=headers)


def access_lines_once_logged(
    caplog: pytest.LogCaptureFixture, statuses: set[int], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The access lines, once those of `statuses` are in: a request's line is written after
    its answer went out, so a client can read the answer first (and a server stopped then
    never wrote the last line)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [entry for entry in lines_of(caplog) if entry["logger"] == "receiver.access"]
        if statuses <= {entry["status"] for entry in lines} or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_a_5xx_gets_an_error_line_that_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer of 500 or more that the app gave on purpose (Runflow refusing feedback: 502;
    the store unreadable: 503) is logged at ERROR with its reason, not as a routine INFO line
    with nothing to debug it by; a 4xx keeps its INFO line, without the reason (which may
    echo the query)."""
    fake = FakeRunflow("rf_logs_key")
    fake.add(EVALUATION_ID)
    with serve_in_thread(fake.app) as runflow_url:
        settings = make_settings(
            tmp_path,
            runflow_api_key="rf_logs_key",
            runflow_api_base=runflow_url,
            refetch_embeds=(),
            worker=False,
        )
        with (
            serve_in_thread(create_app(settings), http="httptools") as url,
            caplog.at_level(logging.INFO),
        ):
            body = fixture("evaluation-completed.json")
            assert httpx.post(
                f"{url}/webhooks/runflow",
                content=body,
                headers={"runflow-signature": sign(body, SECRET_A)},
            ).is_success
            fake.fail_next(403, code="FORBIDDEN", message="Missing scope evaluations:edit")
            refused = httpx.patch(
                f"{url}/api/evaluations/{EVALUATION_ID}/feedback",
                json={"is_positive": True},
                headers=auth(),
            )
            assert refused.status_code == 502
            mistake = httpx.get(f"{url}/api/evaluations?status=nope", headers=auth())
            assert mistake.status_code == 400
            lines = access_lines_once_logged(caplog, {502, 400})
    (failed,) = [entry for entry in lines if entry["status"] == 502]
    assert failed["level"] == "ERROR"
    assert failed["reason"] == refused.json()["error"]
    (refusal,) = [entry for entry in lines if entry["status"] == 400]
    assert refusal["level"] == "INFO"
    assert "reason" not in refusal
