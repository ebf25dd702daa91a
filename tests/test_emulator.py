"""The Runflow emulator served for real: submits become signed callbacks to a recording
receiver, delivered in the configured shape, retried, abandoned, and reflected by GET."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from receiver.fakes.emulator import FAILED, PASSED, CallbackShape
from receiver.fakes.recorder import Recorder
from receiver.fakes.runflow import FakeRunflow, main
from receiver.fakes.server import serve_in_thread
from receiver.normalize import normalize, parse_body
from receiver.signing import verify

from .helpers import SECRET_A, SECRET_B

pytestmark = pytest.mark.anyio
API_KEY = "rf_test_key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
RUN_ID = "0193a7c2-7000-7000-8000-0000000000f1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Recorder, str]]:
    """The callback destination: records every POST byte for byte, fails on demand."""
    recorder = Recorder()
    with serve_in_thread(recorder.app) as url:
        yield recorder, url


class Rig:
    """One emulator (configured per test) in front of the shared recording receiver."""

    def __init__(self, fake: FakeRunflow, base: str, recorder: Recorder, hook: str) -> None:
        self.fake, self.base, self.recorder, self.hook = fake, base, recorder, hook

    def request(self, **changes: Any) -> dict[str, Any]:
        return {
            "generated_image_url": "https://cdn.example.com/renders/job-123.png",
            "task_type": "headshot",
            "client_ref": "customer-job-123",
            "callback_url": self.hook,
            **changes,
        }


@pytest.fixture
def rig_for(receiver: tuple[Recorder, str]) -> Iterator[Any]:
    recorder, url = receiver
    recorder.reset()
    with ExitStack() as stack:

        def start(**options: Any) -> Rig:
            options = {"callback_delay": 0.01, "callback_backoff": 0.01, **options}
            fake = FakeRunflow(API_KEY, **options)
            base = stack.enter_context(serve_in_thread(fake.app))
            return Rig(fake, base, recorder, f"{url}/webhooks/runflow")

        yield start


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


async def submit(
    http: httpx.AsyncClient, rig: Rig, key: str | None = None, **changes: Any
) -> httpx.Response:
    headers = {**AUTH, **({"idempotency-key": key} if key else {})}
    return await http.post(
        f"{rig.base}/v1/evaluations", json=rig.request(**changes), headers=headers
    )


SHAPES: list[tuple[CallbackShape, str, str]] = [
    ("bare", "https://cdn.example.com/job-123.png", "evaluation.completed"),
    ("bare", "https://cdn.example.com/fail-123.png", "evaluation.failed"),
    ("envelope", "https://cdn.example.com/job-123.png", "evaluation.completed"),
    ("envelope", "https://cdn.example.com/fail-123.png", "evaluation.failed"),
]


@pytest.mark.parametrize(("shape", "image", "event"), SHAPES)
async def test_a_submit_becomes_a_signed_callback_in_the_configured_shape(
    rig_for: Any, http: httpx.AsyncClient, shape: CallbackShape, image: str, event: str
) -> None:
    rig = rig_for(callback_secrets=[SECRET_A], callback_shape=shape)
    response = await submit(http, rig, generated_image_url=image)
    assert response.status_code == 202
    created = response.json()
    assert created["status_code"] == "pending"
    assert "judges" not in created
    await rig.fake.settled()
    (received,) = rig.recorder.wait_for(1)
    assert received.path == "/webhooks/runflow"
    assert verify(received.body, received.headers["runflow-signature"], [SECRET_A]) == 0
    assert received.headers["runflow-request-id"]
    body = json.loads(received.body)
    if shape == "bare":
        assert body["id"] == created["id"]
        assert body["status_code"] == event.removeprefix("evaluation.")
        assert "event" not in body
    else:
        assert (body["event"], body["evaluation_id"]) == (event, created["id"])
        assert "id" not in body
    callback = normalize(parse_body(received.body))  # the receiver's own parser accepts it
    assert (callback.event, callback.evaluation_id) == (event, created["id"])
    assert callback.fields["client_ref"] == "customer-job-123"
    assert rig.fake.callback_outcomes == {created["id"]: "delivered"}


async def test_get_reflects_each_state_and_embeds_the_verdict(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(callbacks_enabled=False)
    rig.fake.paused = True
    created = (await submit(http, rig)).json()
    url = f"{rig.base}/v1/evaluations/{created['id']}"
    early = (await http.get(url, params={"embed": "judges"}, headers=AUTH)).json()
    assert (early["status_code"], early["overall_passed"], early["judges"]) == ("pending", None, [])
    with pytest.raises(TimeoutError):
        rig.fake.wait_idle(timeout=0.05)
    rig.fake.paused = False
    await rig.fake.settled()
    embeds = {"embed": "judges,action,gate_failures"}
    done = (await http.get(url, params=embeds, headers=AUTH)).json()
    assert done["status_code"] == "completed"
    assert (done["overall_passed"], done["weighted_pass_rate"]) == (False, 0.62)
    assert done["client_ref"] == "customer-job-123"
    assert done["callback_url"] == rig.hook
    assert done["completed_at"].endswith("+00:00")
    assert {j["evaluation_id"] for j in done["judges"]} == {created["id"]}
    assert done["action"]["evaluation_id"] == created["id"]
    assert done["gate_failures"]
    plain = (await http.get(url, headers=AUTH)).json()
    assert "judges" not in plain
    assert rig.recorder.attempts == 0
    assert rig.fake.callback_outcomes == {created["id"]: "disabled"}


@pytest.mark.parametrize(
    ("verdict", "passed", "status"), [(PASSED, True, "completed"), (FAILED, None, "failed")]
)
async def test_the_verdict_policy_decides_the_outcome(
    rig_for: Any, http: httpx.AsyncClient, verdict: Any, passed: bool | None, status: str
) -> None:
    rig = rig_for(verdict=verdict, callbacks_enabled=False)
    created = (await submit(http, rig)).json()
    await rig.fake.settled()
    found = rig.fake.evaluations[created["id"]]
    assert (found["status_code"], found["overall_passed"]) == (status, passed)
    if status == "failed":
        assert found["failure_code"] == "processing_failed"
    else:
        assert all(judge["passed"] for judge in found["judges"])


async def test_non_2xx_answers_are_retried_and_then_abandoned(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(callback_secrets=[SECRET_A], callback_attempts=3)
    rig.recorder.fail_next(500, count=3)
    created = (await submit(http, rig)).json()
    await rig.fake.settled()
    log = rig.fake.callback_log
    assert [(a.attempt, a.status) for a in log] == [(1, 500), (2, 500), (3, 500)]
    assert len({a.body for a in log}) == 1
    assert rig.fake.callback_outcomes == {created["id"]: "abandoned"}
    assert rig.recorder.attempts == 3
    assert rig.recorder.received == []


async def test_a_retry_that_succeeds_delivers_the_same_bytes(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(callback_secrets=[SECRET_A], callback_attempts=5)
    rig.recorder.fail_next(503, count=2)
    created = (await submit(http, rig)).json()
    await rig.fake.settled()
    log = rig.fake.callback_log
    assert [a.status for a in log] == [503, 503, 200]
    (received,) = rig.recorder.received
    assert received.body == log[0].body
    assert rig.fake.callback_outcomes == {created["id"]: "delivered"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_errors_are_retried_and_then_abandoned(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(callback_attempts=2)
    hook = f"http://127.0.0.1:{closed_port()}/webhooks/runflow"
    created = (await submit(http, rig, callback_url=hook)).json()
    await rig.fake.settled()
    log = rig.fake.callback_log
    assert [(a.attempt, a.status) for a in log] == [(1, None), (2, None)]
    assert all(a.error and "ConnectError" in a.error for a in log)
    assert rig.fake.callback_outcomes == {created["id"]: "abandoned"}


async def test_rotation_signs_with_each_secret_in_turn(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(callback_secrets=[SECRET_A, SECRET_B])
    for n in range(4):
        assert (await submit(http, rig, client_ref=f"job-{n}")).status_code == 202
    await rig.fake.settled()
    received = rig.recorder.wait_for(4)
    used = [verify(r.body, r.headers["runflow-signature"], [SECRET_A, SECRET_B]) for r in received]
    assert used.count(0) == used.count(1) == 2
    indexes = [a.secret_index for a in rig.fake.callback_log]
    assert indexes.count(0) == indexes.count(1) == 2


async def test_without_a_secret_callbacks_are_unsigned(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for()
    await submit(http, rig)
    await rig.fake.settled()
    (received,) = rig.recorder.wait_for(1)
    assert "runflow-signature" not in received.headers


async def test_callbacks_go_to_loopback_only_unless_allowed(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for()
    created = (await submit(http, rig, callback_url="https://receiver.example.com/hook")).json()
    await rig.fake.settled()
    (attempt,) = rig.fake.callback_log
    assert (attempt.attempt, attempt.status) == (0, None)
    assert rig.fake.callback_outcomes == {created["id"]: "not_loopback"}


async def test_the_idempotency_key_returns_the_same_evaluation_or_a_conflict(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(callbacks_enabled=False)
    first = await submit(http, rig, key="k-1")
    again = await submit(http, rig, key="k-1")
    other = await submit(http, rig, key="k-1", task_type="portrait")
    unkeyed = [await submit(http, rig) for _ in range(2)]
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 409
    assert other.json()["code"] == "IDEMPOTENCY_CONFLICT"
    assert unkeyed[0].json()["id"] != unkeyed[1].json()["id"]
    assert len(rig.fake.evaluations) == 3
    await rig.fake.settled()


INVALID: dict[str, tuple[dict[str, Any], bool, list[str]]] = {
    # changes, allow_http_callbacks -> fields named in `errors`
    "missing": (
        {"generated_image_url": None, "task_type": None},
        True,
        ["generated_image_url", "task_type"],
    ),
    "limits": (
        {"task_type": "t" * 101, "client_ref": "c" * 256, "reference_images": [{"url": "u"}] * 5},
        True,
        ["task_type", "reference_images", "client_ref"],
    ),
    "http-remote": ({"callback_url": "http://receiver.example.com/hook"}, True, ["callback_url"]),
    "http-loopback-strict": (
        {"callback_url": "http://127.0.0.1:8000/hook"},
        False,
        ["callback_url"],
    ),
}


@pytest.mark.parametrize(("changes", "allow", "fields"), INVALID.values(), ids=INVALID.keys())
async def test_validation_errors_come_in_runflows_shape(
    rig_for: Any,
    http: httpx.AsyncClient,
    changes: dict[str, Any],
    allow: bool,
    fields: list[str],
) -> None:
    rig = rig_for(allow_http_callbacks=allow)
    body = {k: v for k, v in rig.request(**changes).items() if v is not None}
    response = await http.post(f"{rig.base}/v1/evaluations", json=body, headers=AUTH)
    assert response.status_code == 422
    answer = response.json()
    assert answer["code"] == "VALIDATION_ERROR"
    assert answer["message"]
    assert [e["field"] for e in answer["errors"]] == fields
    assert all(e["message"].startswith(e["field"]) for e in answer["errors"])
    assert rig.fake.evaluations == {}


async def test_evaluation_feedback_semantics(rig_for: Any, http: httpx.AsyncClient) -> None:
    rig = rig_for()
    rig.fake.add(EVALUATION_ID)
    url = f"{rig.base}/v1/evaluations/{EVALUATION_ID}/feedback"

    async def patch(body: Any) -> httpx.Response:
        return await http.patch(url, json=body, headers=AUTH)

    up = (await patch({"is_positive": True, "reason": "Sharp"})).json()
    assert (up["feedback_is_positive"], up["feedback_reason"]) == (True, "Sharp")
    cleared = (await patch({"is_positive": None, "reason": "ignored"})).json()
    assert (cleared["feedback_is_positive"], cleared["feedback_reason"]) == (None, None)
    assert "judges" not in cleared
    for bad in ({"reason": "x"}, {"is_positive": "yes"}, {"is_positive": False, "reason": ""}):
        refused = await patch(bad)
        assert (refused.status_code, refused.json()["code"]) == (422, "VALIDATION_ERROR")
    long = await patch({"is_positive": False, "reason": "r" * 2001})
    assert long.json()["errors"][0]["field"] == "reason"
    missing = await http.patch(
        f"{rig.base}/v1/evaluations/{RUN_ID}/feedback", json={"is_positive": True}, headers=AUTH
    )
    assert missing.status_code == 404
    assert rig.fake.evaluations[EVALUATION_ID]["feedback_is_positive"] is None


async def test_run_feedback_refuses_api_keys_and_accepts_user_sessions(
    rig_for: Any, http: httpx.AsyncClient
) -> None:
    rig = rig_for(user_tokens=["user-session"])
    url = f"{rig.base}/v1/runs/{RUN_ID}/feedback"
    refused = await http.patch(url, json={"is_positive": True}, headers=AUTH)
    assert refused.status_code == 403
    assert refused.json()["code"] == "FORBIDDEN"
    assert "user session" in refused.json()["message"]
    user = {"authorization": "Bearer user-session"}
    accepted = await http.patch(url, json={"is_positive": False, "reason": "Off"}, headers=user)
    assert accepted.status_code == 200
    assert rig.fake.run_feedback[RUN_ID]["feedback_reason"] == "Off"


MINIMAL = {"generated_image_url": "https://cdn.example.com/a.png", "task_type": "headshot"}
ENDPOINTS = [
    ("POST", "/v1/evaluations", MINIMAL),
    ("GET", f"/v1/evaluations/{EVALUATION_ID}", None),
    ("PATCH", f"/v1/evaluations/{EVALUATION_ID}/feedback", {"is_positive": True}),
    ("PATCH", f"/v1/runs/{RUN_ID}/feedback", {"is_positive": True}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_faults_and_auth_apply_to_every_endpoint(
    rig_for: Any, http: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    rig = rig_for(callbacks_enabled=False, user_tokens=["user-session"])
    rig.fake.add(EVALUATION_ID)
    user = {"authorization": "Bearer user-session"} if "/runs/" in path else AUTH
    url = rig.base + path

    async def call(headers: dict[str, str]) -> httpx.Response:
        return await http.request(method, url, json=body, headers=headers)

    rig.fake.fail_next(429, retry_after=2)
    rig.fake.fail_next(503)
    limited, unavailable = await call(user), await call(user)
    assert (limited.status_code, limited.json()["code"]) == (429, "RATE_LIMITED")
    assert limited.headers["retry-after"] == "2"
    assert (unavailable.status_code, unavailable.json()["code"]) == (503, "SERVICE_UNAVAILABLE")
    assert (await call({})).status_code == 401
    assert (await call(user)).status_code in {200, 202}
    await rig.fake.settled()


def test_the_runner_documents_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--port", "--secret", "--shape", "--api-key", "--any-callback-host"):
        assert option in usage
