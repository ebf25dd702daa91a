"""The Runflow client against the emulator served for real: submit with idempotency keys,
local validation before any request, retries (and what is never retried), feedback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from receiver.errors import BadRequest
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.runflow import RunflowClient, RunflowError
from receiver.runflow_requests import SubmitRequest

from .servers import free_port

pytestmark = pytest.mark.anyio
API_KEY = "rf_test_key_do_not_log"
EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
REQUEST: dict[str, Any] = {
    "generated_image_url": "https://cdn.example.com/renders/job-123.png",
    "task_type": "headshot",
    "client_ref": "customer-job-123",
    "reference_images": [{"url": "https://cdn.example.com/refs/face-1.jpg", "kind": "identity"}],
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeRunflow, str]]:
    fake = FakeRunflow(API_KEY, callback_delay=0.01)
    with serve_in_thread(fake.app) as url:
        yield fake, url


@pytest.fixture
def fake(served: tuple[FakeRunflow, str]) -> Iterator[FakeRunflow]:
    fake = served[0]
    fake.reset()
    yield fake
    fake.wait_idle()


class Sleeps:
    """Stands in for asyncio.sleep: records the delays asked for, waits for none."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield client


@pytest.fixture
def client(
    served: tuple[FakeRunflow, str], http: httpx.AsyncClient, sleeps: Sleeps
) -> RunflowClient:
    return RunflowClient(http, base=served[1], api_key=API_KEY, sleep=sleeps, retry_base=1.0)


def sent(fake: FakeRunflow, index: int = -1) -> dict[str, Any]:
    return fake.requests[index]


def derived_key(body: dict[str, Any]) -> str:
    """Computed independently of the client: sha256 of sorted-key, compact JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "receiver-" + hashlib.sha256(canonical.encode()).hexdigest()


# -- submit -------------------------------------------------------------------------------------


async def test_submit_sends_the_given_idempotency_key_and_returns_the_pending_evaluation(
    fake: FakeRunflow, client: RunflowClient
) -> None:
    evaluation = await client.submit(REQUEST, idempotency_key="job-123-attempt-1")
    assert evaluation["status_code"] == "pending"
    assert evaluation["client_ref"] == "customer-job-123"
    assert evaluation["id"] in fake.evaluations
    request = sent(fake)
    assert (request["method"], request["path"]) == ("POST", "/v1/evaluations")
    assert request["headers"]["idempotency-key"] == "job-123-attempt-1"
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert json.loads(request["body"]) == REQUEST


async def test_the_derived_key_is_deterministic_whatever_the_form_of_the_request(
    fake: FakeRunflow, client: RunflowClient
) -> None:
    as_dataclass = SubmitRequest(
        generated_image_url=REQUEST["generated_image_url"],
        task_type="headshot",
        client_ref="customer-job-123",
        reference_images=tuple(REQUEST["reference_images"]),
    )
    first = await client.submit(dict(reversed(list(REQUEST.items()))))
    second = await client.submit(as_dataclass)
    other = await client.submit({**REQUEST, "client_ref": "customer-job-124"})
    keys = [r["headers"]["idempotency-key"] for r in fake.requests]
    assert keys[0] == keys[1] == derived_key(REQUEST)
    assert keys[2] == derived_key({**REQUEST, "client_ref": "customer-job-124"}) != keys[0]
    assert first["id"] == second["id"] != other["id"]
    assert len(fake.evaluations) == 2


async def test_a_repeated_submit_with_the_same_key_is_the_same_evaluation(
    fake: FakeRunflow, client: RunflowClient
) -> None:
    first = await client.submit(REQUEST, idempotency_key="k-1")
    again = await client.submit(REQUEST, idempotency_key="k-1")
    assert again["id"] == first["id"]
    assert list(fake.evaluations) == [first["id"]]


async def test_the_same_key_with_another_body_is_a_conflict_and_not_retried(
    fake: FakeRunflow, client: RunflowClient, sleeps: Sleeps
) -> None:
    await client.submit(REQUEST, idempotency_key="k-2")
    with pytest.raises(RunflowError) as caught:
        await client.submit({**REQUEST, "task_type": "portrait"}, idempotency_key="k-2")
    assert (caught.value.http_status, caught.value.code) == (409, "IDEMPOTENCY_CONFLICT")
    assert len(fake.requests) == 2
    assert sleeps.delays == []


# -- validation before any request --------------------------------------------------------------

LONG_URL = "https://receiver.example.com/" + "a" * 2020  # 2049 characters
INVALID_SUBMITS: dict[str, tuple[dict[str, Any], str]] = {
    "no-image": ({"generated_image_url": None}, "generated_image_url is required"),
    "empty-image": ({"generated_image_url": ""}, "generated_image_url is required"),
    "image-not-text": ({"generated_image_url": 7}, "generated_image_url must be a string"),
    "no-task-type": ({"task_type": None}, "task_type is required"),
    "empty-task-type": ({"task_type": ""}, "task_type must be 1 to 100 characters"),
    "long-task-type": ({"task_type": "t" * 101}, "task_type must be 1 to 100 characters"),
    "long-client-ref": ({"client_ref": "c" * 256}, "client_ref must be at most 255 characters"),
    "five-images": (
        {"reference_images": [{"url": f"https://cdn.example.com/{n}.jpg"} for n in range(5)]},
        "reference_images must have at most 4 items",
    ),
    "image-without-url": (
        {"reference_images": [{"kind": "identity"}]},
        "reference_images[0].url is required",
    ),
    "http-callback": (
        {"callback_url": "http://receiver.example.com/webhooks/runflow"},
        "callback_url must be an https URL",
    ),
    "loopback-http-callback": (
        {"callback_url": "http://127.0.0.1:8000/webhooks/runflow"},
        "callback_url must be an https URL",
    ),
    "long-callback": ({"callback_url": LONG_URL}, "callback_url must be at most 2048 characters"),
    "run-id": ({"run_id": "run-7"}, "run_id must be a UUID"),
    "attributes": ({"input_attributes": ["style"]}, "input_attributes must be an object"),
    "typo": ({"client_reference": "x"}, "unknown field 'client_reference'"),
    "job-class": ({"job_class": "turbo"}, "job_class must be one of standard"),
    "empty-job-class": ({"job_class": ""}, "job_class must be one of standard"),
}


@pytest.mark.parametrize(
    ("change", "message"), INVALID_SUBMITS.values(), ids=INVALID_SUBMITS.keys()
)
async def test_an_invalid_submit_is_refused_locally_naming_the_field(
    fake: FakeRunflow, client: RunflowClient, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        await client.submit({**REQUEST, **change})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert fake.requests == []


@pytest.mark.parametrize("key", ["", "has space", "k" * 256, "naïve"])
async def test_an_unusable_idempotency_key_is_refused_locally(
    fake: FakeRunflow, client: RunflowClient, key: str
) -> None:
    with pytest.raises(BadRequest, match="idempotency_key must be 1 to 255"):
        await client.submit(REQUEST, idempotency_key=key)
    assert fake.requests == []


AT_THE_LIMITS = {
    "task_type": "t" * 100,
    "client_ref": "c" * 255,
    "reference_images": [{"url": f"https://cdn.example.com/{n}.jpg"} for n in range(4)],
    "callback_url": LONG_URL[:2048],
}


async def test_values_exactly_at_the_limits_are_sent(
    fake: FakeRunflow, client: RunflowClient
) -> None:
    evaluation = await client.submit({**REQUEST, **AT_THE_LIMITS})
    assert evaluation["task_type"] == "t" * 100
    assert len(fake.requests) == 1


async def test_http_callbacks_on_loopback_only_when_the_client_allows_them(
    served: tuple[FakeRunflow, str], fake: FakeRunflow, http: httpx.AsyncClient
) -> None:
    client = RunflowClient(http, base=served[1], api_key=API_KEY, allow_http_callbacks=True)
    fake.callbacks_enabled = False
    try:
        local = {**REQUEST, "callback_url": "http://127.0.0.1:9/webhooks/runflow"}
        assert (await client.submit(local))["callback_url"] == local["callback_url"]
        with pytest.raises(BadRequest, match="callback_url must be an https URL"):
            await client.submit({**REQUEST, "callback_url": "http://receiver.example.com/x"})
        fake.wait_idle()
    finally:
        fake.callbacks_enabled = True
    assert len(fake.requests) == 1


INVALID_FEEDBACK: dict[str, tuple[dict[str, Any], str]] = {
    "empty-reason": ({"is_positive": True, "reason": ""}, "reason must be 1 to 2000 characters"),
    "long-reason": (
        {"is_positive": False, "reason": "r" * 2001},
        "reason must be 1 to 2000 characters",
    ),
    "not-a-bool": ({"is_positive": 1}, "is_positive must be true, false or null"),
    "not-a-uuid": (
        {"is_positive": True, "evaluation_id": "../../admin"},
        "evaluation id must be a UUID",
    ),
}


@pytest.mark.parametrize(
    ("arguments", "message"), INVALID_FEEDBACK.values(), ids=INVALID_FEEDBACK.keys()
)
async def test_invalid_feedback_is_refused_locally(
    fake: FakeRunflow, client: RunflowClient, arguments: dict[str, Any], message: str
) -> None:
    arguments = dict(arguments)
    evaluation_id = arguments.pop("evaluation_id", EVALUATION_ID)
    with pytest.raises(BadRequest, match=message):
        await client.evaluation_feedback(evaluation_id, **arguments)
    assert fake.requests == []


# -- retries ------------------------------------------------------------------------------------

RETRIED: dict[str, tuple[list[dict[str, Any]], list[float | None]]] = {
    # faults queued -> the delays the client must ask for (None: any full-jitter delay)
    "429-retry-after": ([{"status": 429, "retry_after": 7}], [7.0]),
    "503-retry-after": ([{"status": 503, "retry_after": 0.25}], [0.25]),
    "429-bare": ([{"status": 429}], [None]),
    "500": ([{"status": 500}], [None]),
    "503-twice-then-429": (
        [{"status": 503, "count": 2}, {"status": 429, "retry_after": 2.5}],
        [None, None, 2.5],
    ),
}


@pytest.mark.parametrize(("faults", "delays"), RETRIED.values(), ids=RETRIED.keys())
@pytest.mark.parametrize("call", ["submit", "evaluation_feedback"])
async def test_rate_limits_and_server_errors_are_retried_then_succeed(
    fake: FakeRunflow,
    client: RunflowClient,
    sleeps: Sleeps,
    faults: list[dict[str, Any]],
    delays: list[float | None],
    call: str,
) -> None:
    fake.add(EVALUATION_ID)
    for fault in faults:
        fake.fail_next(**fault)
    if call == "submit":
        result = await client.submit(REQUEST)
    else:
        result = await client.evaluation_feedback(EVALUATION_ID, True, "sharp")
    assert result["id"]
    assert len(fake.requests) == len(delays) + 1
    assert len({r["headers"].get("idempotency-key") for r in fake.requests}) == 1
    assert len(sleeps.delays) == len(delays)
    for attempt, (asked, expected) in enumerate(zip(sleeps.delays, delays, strict=True)):
        if expected is None:
            assert 0 <= asked <= 1.0 * 2**attempt  # full jitter under the doubling cap
        else:
            # Retry-After honoured (never sooner); the jittered delay wins when longer
            assert expected <= asked <= max(expected, 1.0 * 2**attempt)


async def test_it_gives_up_after_five_tries(
    fake: FakeRunflow, client: RunflowClient, sleeps: Sleeps
) -> None:
    fake.fail_next(503, count=10)
    with pytest.raises(RunflowError, match="gave up after 5 tries") as caught:
        await client.submit(REQUEST)
    assert caught.value.retryable
    assert (caught.value.http_status, caught.value.code) == (503, "SERVICE_UNAVAILABLE")
    assert len(fake.requests) == 5
    assert len(sleeps.delays) == 4


async def test_a_retry_after_longer_than_it_will_wait_is_raised_not_shortened(
    fake: FakeRunflow, client: RunflowClient, sleeps: Sleeps
) -> None:
    fake.fail_next(429, retry_after=3600)
    with pytest.raises(RunflowError, match="Retry-After 3600s") as caught:
        await client.submit(REQUEST)
    assert (caught.value.retryable, caught.value.retry_after) == (True, 3600)
    assert len(fake.requests) == 1
    assert sleeps.delays == []


async def test_a_timeout_is_retried(sleeps: Sleeps) -> None:
    fake = FakeRunflow(API_KEY, callbacks_enabled=False)  # its own: the slow answer comes late
    fake.fail_next(None, delay=1.0)
    with serve_in_thread(fake.app) as url:
        async with httpx.AsyncClient(timeout=0.3) as http:
            client = RunflowClient(http, base=url, api_key=API_KEY, sleep=sleeps)
            evaluation = await client.submit(REQUEST)
    assert evaluation["status_code"] == "pending"
    assert sleeps.delays
    assert len(fake.requests) == len(sleeps.delays) + 1
    assert len(fake.evaluations) == 1  # the key made the retried submit safe


async def test_an_unreachable_api_base_is_named_with_the_reason(
    http: httpx.AsyncClient, sleeps: Sleeps
) -> None:
    """It said 'failed: ConnectError', naming neither the origin nor the setting."""
    base = f"http://127.0.0.1:{free_port()}"
    client = RunflowClient(http, base=base, api_key=API_KEY, sleep=sleeps)
    with pytest.raises(RunflowError) as caught:
        await client.get_evaluation(EVALUATION_ID)
    assert str(caught.value).startswith(
        f"Runflow GET /v1/evaluations/{EVALUATION_ID} failed: cannot connect to {base} "
        "(RUNFLOW_API_BASE): "
    )
    assert "Connection refused" in str(caught.value) or "connection attempts" in str(caught.value)
    assert caught.value.retryable


REFUSALS = {
    400: ("BAD_REQUEST", "Malformed body"),
    401: ("UNAUTHORIZED", "Invalid or missing API key"),
    402: ("INSUFFICIENT_CREDITS", "Not enough credits"),
    403: ("FORBIDDEN", "Missing scope evaluations:create"),
    404: ("NOT_FOUND", "Evaluation not found"),
    409: ("CONFLICT", "Already in progress"),
    422: ("VALIDATION_ERROR", "task_type is not supported"),
}


@pytest.mark.parametrize("status", REFUSALS)
async def test_other_client_errors_are_not_retried_and_carry_code_and_message(
    fake: FakeRunflow, client: RunflowClient, sleeps: Sleeps, status: int
) -> None:
    code, message = REFUSALS[status]
    fake.fail_next(status, code=code, message=message)
    with pytest.raises(RunflowError) as caught:
        await client.submit(REQUEST)
    error = caught.value
    assert (error.http_status, error.code, error.retryable) == (status, code, False)
    assert f"{code}: {message}" in str(error)
    assert len(fake.requests) == 1
    assert sleeps.delays == []


async def test_a_wrong_key_is_refused_once_and_the_key_is_never_shown(
    served: tuple[FakeRunflow, str], fake: FakeRunflow, http: httpx.AsyncClient, sleeps: Sleeps
) -> None:
    client = RunflowClient(http, base=served[1], api_key="rf_wrong_secret", sleep=sleeps)
    with pytest.raises(RunflowError) as caught:
        await client.evaluation_feedback(EVALUATION_ID, True)
    assert (caught.value.http_status, caught.value.code) == (401, "UNAUTHORIZED")
    assert "rf_wrong_secret" not in str(caught.value)
    assert "rf_wrong_secret" not in repr(client)
    assert len(fake.requests) == 1


# -- feedback -----------------------------------------------------------------------------------


async def test_evaluation_feedback_set_change_and_clear(
    fake: FakeRunflow, client: RunflowClient
) -> None:
    fake.add(EVALUATION_ID)
    up = await client.evaluation_feedback(EVALUATION_ID, True, "Sharp and on brief")
    assert (up["feedback_is_positive"], up["feedback_reason"]) == (True, "Sharp and on brief")
    down = await client.evaluation_feedback(EVALUATION_ID, False)
    assert (down["feedback_is_positive"], down["feedback_reason"]) == (False, None)
    cleared = await client.evaluation_feedback(EVALUATION_ID, None, "dropped with the rating")
    assert (cleared["feedback_is_positive"], cleared["feedback_reason"]) == (None, None)
    bodies = [json.loads(r["body"]) for r in fake.requests]
    assert bodies == [
        {"is_positive": True, "reason": "Sharp and on brief"},
        {"is_positive": False},
        {"is_positive": None},
    ]
    assert {r["path"] for r in fake.requests} == {f"/v1/evaluations/{EVALUATION_ID}/feedback"}
    fetched = await client.get_evaluation(EVALUATION_ID)
    assert fetched["feedback_is_positive"] is None
