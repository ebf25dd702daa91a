"""Schemathesis against /openapi.json: every operation but the webhook (signed; see test_fuzz)
is called with generated input on a real server holding a few evaluations and forwards, with
the bearer token. No answer may be a 5xx, and every answer must match the document."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from receiver import openapi
from receiver.fakes.chat import FakeSlack
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign

from .helpers import SECRET_A, TOKEN, fixture
from .servers import ReceiverProcess

FIXTURES = [
    "evaluation-completed.json",
    "evaluation-failed.json",
    "get-evaluation-embedded.json",
    "run-completed.json",
]
# Evaluations made up here, so that every filter and page has something to find.
MADE_UP = [
    {
        "id": f"0193a7c2-0000-7000-8000-{number:012d}",
        "status": ["completed", "failed", "pending", "running"][number % 4],
        "client_ref": f"job-{number % 3}",
        "overall_passed": [True, False, None][number % 3],
        "weighted_pass_rate": number / 10,
        "task_type": ["headshot", "product"][number % 2],
        "top_issues": ["hands", "text"][: number % 3],
        "completed_at": f"2026-11-2{number % 10}T09:14:43.352000+00:00",
        "attempt_number": 1 + number % 2,
    }
    for number in range(8)
]

schema = schemathesis.openapi.from_dict(openapi.document()).exclude(path="/webhooks/runflow")
OPERATIONS = [result.ok().label for result in schema.get_all_operations()]  # type: ignore[union-attr]
SEEN: dict[str, set[int]] = {}  # operation → statuses answered, across the run


class Live:
    """The running receiver and what it holds."""

    def __init__(self, url: str, evaluation_ids: list[str], client_refs: list[str]) -> None:
        self.url = url
        self.evaluation_ids = evaluation_ids
        self.client_refs = client_refs


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    runflow = FakeRunflow(callbacks_enabled=False)
    slack = FakeSlack()
    workdir = tmp_path_factory.mktemp("schema")
    with serve_in_thread(runflow.app) as runflow_url, serve_in_thread(slack.app) as slack_url:
        env = {
            "RUNFLOW_API_KEY": runflow.api_key,
            "RUNFLOW_API_BASE": runflow_url,
            "RECEIVER_SLACK_WEBHOOK_URL": slack.url(slack_url),
        }
        with ReceiverProcess(workdir, **env) as server:
            bodies = [fixture(name) for name in FIXTURES]
            bodies += [json.dumps(fields).encode() for fields in MADE_UP]
            ids = []
            for body in bodies:
                payload = json.loads(body)
                evaluation_id = payload.get("evaluation_id") or payload.get("id")
                if evaluation_id and not payload.get("event", "").startswith("run."):
                    runflow.add(evaluation_id, **{k: v for k, v in payload.items() if k != "event"})
                    ids.append(evaluation_id)
                response = httpx.post(
                    f"{server.url}/webhooks/runflow",
                    content=body,
                    headers={"runflow-signature": sign(body, SECRET_A)},
                    timeout=10,
                )
                assert response.status_code == 200, response.text
            _wait_for_forwards(server.url)
            refs = sorted({str(fields["client_ref"]) for fields in MADE_UP})
            yield Live(server.url, sorted(set(ids)), refs)


def _wait_for_forwards(url: str) -> None:
    """Until the worker has sent what it queued (so /api/forwards shows done rows)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = httpx.get(
            f"{url}/api/forwards", params={"state": "pending"}, headers=_auth(), timeout=5
        )
        if found.status_code == 200 and not found.json()["items"]:
            return
        time.sleep(0.1)
    raise AssertionError("forwards still pending")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _known(case: Any, live: Live, data: st.DataObject) -> None:
    """Point about half the path parameters at things that exist, to reach the 200 paths."""
    params = case.path_parameters or {}
    if not data.draw(st.booleans(), label="known"):
        return
    if "evaluation_id" in params:
        params["evaluation_id"] = data.draw(st.sampled_from(live.evaluation_ids))
    if "client_ref" in params:
        params["client_ref"] = data.draw(st.sampled_from(live.client_refs))
    for name in ("forward_id", "delivery_id"):
        if name in params:
            params[name] = data.draw(st.integers(min_value=1, max_value=8))


@schema.given(data=st.data())
@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_answers_match_the_document(case: Any, data: st.DataObject, live: Live) -> None:
    _known(case, live, data)
    response = case.call_and_validate(
        base_url=live.url,
        headers=_auth(),
        checks=[
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
            content_type_conformance,
        ],
        timeout=10,
    )
    SEEN.setdefault(case.operation.label, set()).add(response.status_code)


def test_every_operation_answered_200_at_least_once() -> None:
    """So the success schemas were checked too, not only the errors (runs after the above)."""
    if not SEEN:
        pytest.skip("runs only after test_api_answers_match_the_document")
    missing = [label for label, statuses in SEEN.items() if 200 not in statuses]
    assert not missing, {label: SEEN[label] for label in missing}
    assert len(SEEN) == len(OPERATIONS), set(OPERATIONS) - set(SEEN)


def test_the_document_loads_without_the_webhook() -> None:
    assert "POST /webhooks/runflow" not in OPERATIONS
    assert "GET /api/evaluations" in OPERATIONS
    assert "PATCH /api/evaluations/{evaluation_id}/feedback" in OPERATIONS
