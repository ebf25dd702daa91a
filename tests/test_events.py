"""The normalized CloudEvent (design.md §7) built from a stored evaluation."""

from __future__ import annotations

from urllib.parse import unquote

import httpx
import pytest

from receiver.events import build_event

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
