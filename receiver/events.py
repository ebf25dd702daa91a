"""Stored evaluation → the normalized CloudEvent of design.md §7 (pure)."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from .normalize import columns, judge_issues
from .times import normalize_time

# Fixed forever: event ids derive from it, and consumers dedupe on them.
NAMESPACE = uuid.UUID("6f1d2c3e-8a4b-5c6d-9e0f-a1b2c3d4e5f6")
TYPE_PREFIX = "io.runflow."
# The media type of a structured-mode CloudEvent in JSON: the HTTP, AMQP and NATS bindings of
# CloudEvents 1.0 tell a consumer the body is the whole event (not just its data) by it.
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"


def event_id(evaluation_id: str, event: str) -> str:
    """The same verdict of the same evaluation always gets the same id."""
    return str(uuid.uuid5(NAMESPACE, f"{evaluation_id}/{event}"))


def _list_of_dicts(value: Any, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [{key: item.get(key) for key in keys} for item in value if isinstance(item, dict)]


def build_event(
    fields: dict[str, Any],
    event: str,
    *,
    refetched: bool,
    received_at: str,
    dashboard_url: str | None = None,
) -> dict[str, Any]:
    """A structured-mode CloudEvent 1.0. Fields nobody filled are null or [], never absent."""
    cols = columns(fields)
    evaluation_id = fields["id"]
    raw_action = fields.get("action")
    action: dict[str, Any] = raw_action if isinstance(raw_action, dict) else {}
    strengths = fields.get("top_strengths")
    cost = fields.get("cost")
    data = {
        "evaluation_id": evaluation_id,
        "client_ref": cols["client_ref"],
        "status": cols["status"],
        "passed": None if cols["passed"] is None else bool(cols["passed"]),
        "score": cols["score"],
        "task_type": cols["task_type"],
        "failure_code": cols["failure_code"],
        "top_issues": cols["top_issues"],
        "top_strengths": [s for s in strengths if isinstance(s, str)]
        if isinstance(strengths, list)
        else [],
        "issues": [
            {"judge": judge, "category": category, "subcategory": sub, "detail": detail}
            for judge, category, sub, detail in judge_issues(fields)
        ],
        "gate_failures": _list_of_dicts(
            fields.get("gate_failures"), ("output_key", "module", "reason")
        ),
        "action": {
            "primary_action": action.get("primary_action") or fields.get("primary_action_code"),
            "failure_summary": action.get("failure_summary"),
            "improved_prompt": action.get("improved_prompt"),
        },
        "attempt_number": cols["attempt_number"],
        "parent_evaluation_id": cols["parent_evaluation_id"],
        "run_id": cols["run_id"],
        "cost": cost if isinstance(cost, str) else None,
        "image_url": cols["image_url"],
        "generation_prompt": fields.get("generation_prompt")
        if isinstance(fields.get("generation_prompt"), str)
        else None,
        "completed_at": cols["completed_at"],
        "refetched": refetched,
        # The id as one path segment, as the dashboard links it (`?`, `#`, `/` included).
        "dashboard_url": f"{dashboard_url}/evaluations/{quote(evaluation_id, safe='')}"
        if dashboard_url
        else None,
    }
    return {
        "specversion": "1.0",
        "id": event_id(evaluation_id, event),
        "source": "/runflow/evaluations",
        "type": TYPE_PREFIX + event,
        "subject": evaluation_id,
        "time": cols["completed_at"] or normalize_time(received_at) or received_at,
        "datacontenttype": "application/json",
        "data": data,
    }
