"""The normalized CloudEvent (design.md §7) built from a stored evaluation."""

from __future__ import annotations

from urllib.parse import unquote

import httpx
import pytest

from receiver.events import build_event, event_id

PUBLIC_URL = "https://receiver.example.com"


@pytest.mark.parametrize(
    ("evaluation_id", "path"),
    [
        ("0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11", "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"),
        ("a?b=1", "a%3Fb%3D1"),
        ("a#top", "a%23top"),
        ("x/../victim", "x%2F..%2Fvictim"),
        ("50%", "50%25"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
    ],
)
def test_the_dashboard_url_leads_to_the_page_of_that_evaluation(
    evaluation_id: str, path: str
) -> None:
    """The id is one path segment, as the dashboard links it: a `?`, `#` or `/` in it must
    not open another page (a query, a fragment, another evaluation's page)."""
    fields = {"id": evaluation_id, "status_code": "completed"}
    event = build_event(
        fields,
        "evaluation.completed",
        refetched=False,
        received_at="2026-11-20T09:14:44Z",
        dashboard_url=PUBLIC_URL,
    )
    url = event["data"]["dashboard_url"]
    assert url == f"{PUBLIC_URL}/evaluations/{path}"
    parsed = httpx.URL(url)
    assert (parsed.query, parsed.fragment) == (b"", "")
    prefix, segment = parsed.raw_path.decode().rsplit("/", 1)
    assert (prefix, unquote(segment)) == ("/evaluations", evaluation_id)


@pytest.mark.parametrize(
    ("evaluation_id", "event", "expected"),
    [  # fixed for ever: consumers dedupe on them, across versions of receiver
        (
            "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11",
            "evaluation.completed",
            "62b2b280-4468-573a-87f6-d2c8809d4fe5",
        ),
        (
            "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11",
            "evaluation.failed",
            "584252a6-18a1-5387-a910-d409b7b9b05d",
        ),
    ],
)
def test_event_ids_never_change(evaluation_id: str, event: str, expected: str) -> None:
    assert event_id(evaluation_id, event) == expected


def test_the_envelope_is_a_cloudevent_1_0() -> None:
    built = build_event(
        {"id": "e1", "status_code": "completed", "completed_at": "2026-11-20T09:00:00Z"},
        "evaluation.completed",
        refetched=False,
        received_at="2026-11-20T09:00:01.000000Z",
    )
    envelope = {key: value for key, value in built.items() if key != "data"}
    assert envelope == {
        "specversion": "1.0",
        "id": event_id("e1", "evaluation.completed"),
        "source": "/runflow/evaluations",
        "type": "io.runflow.evaluation.completed",
        "subject": "e1",
        "time": "2026-11-20T09:00:00.000000Z",
        "datacontenttype": "application/json",
    }


@pytest.mark.parametrize(
    ("fields", "primary_action"),
    [
        ({"action": {"primary_action": "regenerate"}}, "regenerate"),
        ({"primary_action_code": "retouch"}, "retouch"),  # without the action embed
        ({"action": {"primary_action": "regenerate"}, "primary_action_code": "x"}, "regenerate"),
        ({}, None),
    ],
)
def test_the_primary_action(fields: dict[str, object], primary_action: str | None) -> None:
    built = build_event(
        {"id": "e1", "status_code": "completed", **fields},
        "evaluation.completed",
        refetched=False,
        received_at="2026-11-20T09:00:01.000000Z",
    )
    assert built["data"]["action"]["primary_action"] == primary_action
