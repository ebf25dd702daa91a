"""PATCH /api/evaluations/{id}/feedback through the client, against the emulator over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread

from .helpers import auth, fixture, make_settings, post_callback

EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
API_KEY = "rf_feedback_key"


@pytest.fixture
def emulated(tmp_path: Path) -> Iterator[tuple[TestClient, FakeRunflow]]:
    fake = FakeRunflow(API_KEY)
    fake.add(EVALUATION_ID)
    with serve_in_thread(fake.app) as url:
        settings = make_settings(
            tmp_path, runflow_api_key=API_KEY, runflow_api_base=url, refetch_embeds=()
        )
        with TestClient(create_app(settings)) as client:
            post_callback(client, fixture("evaluation-completed.json"))
            yield client, fake


def patch(client: TestClient, body: Any, evaluation_id: str = EVALUATION_ID) -> Any:
    return client.patch(f"/api/evaluations/{evaluation_id}/feedback", json=body, headers=auth())


@pytest.mark.parametrize(
    ("body", "positive", "reason"),
    [
        ({"is_positive": True}, True, None),
        ({"is_positive": False, "reason": "collar"}, False, "collar"),
        ({"is_positive": None, "reason": "dropped"}, None, None),
    ],
)
def test_feedback_goes_to_runflow_and_is_stored(
    emulated: tuple[TestClient, FakeRunflow], body: Any, positive: bool | None, reason: str | None
) -> None:
    client, fake = emulated
    response = patch(client, body)
    assert response.status_code == 200, response.text
    expected = None if positive is None else {"is_positive": positive, "reason": reason}
    assert response.json()["evaluation"]["feedback"] == expected
    remote = fake.evaluations[EVALUATION_ID]
    assert (remote["feedback_is_positive"], remote["feedback_reason"]) == (positive, reason)
    shown = client.get(f"/api/evaluations/{EVALUATION_ID}", headers=auth()).json()
    assert shown["evaluation"]["feedback"] == expected


MISTAKES = {
    "not-json": ("nope", 400, "body must be JSON"),
    "no-is-positive": ({"reason": "x"}, 400, "is_positive"),
    "is-positive-text": ({"is_positive": "yes"}, 400, "is_positive must be"),
    "unknown-field": ({"is_positive": True, "why": "x"}, 400, "unknown field 'why'"),
    "reason-too-long": ({"is_positive": False, "reason": "x" * 2001}, 400, "reason"),
    "empty-reason": ({"is_positive": False, "reason": ""}, 400, "reason"),
    "nul-in-reason": ({"is_positive": False, "reason": "a\x00b"}, 400, "NUL characters"),
    "lone-surrogate": ('{"is_positive": false, "reason": "\\ud800"}', 400, "lone surrogate"),
}


@pytest.mark.parametrize(("body", "status", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_bad_feedback_is_refused_before_runflow(
    emulated: tuple[TestClient, FakeRunflow], body: Any, status: int, message: str
) -> None:
    client, fake = emulated
    before = len(fake.requests)
    if isinstance(body, str):
        response = client.patch(
            f"/api/evaluations/{EVALUATION_ID}/feedback", content=body, headers=auth()
        )
    else:
        response = patch(client, body)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert len(fake.requests) == before


def test_unknown_evaluation_is_404_and_runflow_refusals_are_502(
    emulated: tuple[TestClient, FakeRunflow],
) -> None:
    client, fake = emulated
    assert patch(client, {"is_positive": True}, "nope").status_code == 404
    fake.fail_next(403, code="FORBIDDEN", message="Missing scope evaluations:edit")
    refused = patch(client, {"is_positive": True})
    assert refused.status_code == 502
    assert "FORBIDDEN" in refused.json()["error"]


def test_without_an_api_key_feedback_is_501(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        post_callback(client, fixture("evaluation-completed.json"))
        response = patch(client, {"is_positive": True})
    assert response.status_code == 501
    assert "RUNFLOW_API_KEY" in response.json()["error"]
