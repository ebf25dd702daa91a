"""Callback bytes → a Callback in Runflow's GET shape, plus the state rules for merging (pure)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .times import normalize_time

TERMINAL = frozenset({"completed", "failed"})
STATUSES = ("pending", "running", "completed", "failed")
_RANK = {"pending": 0, "running": 1, "completed": 2, "failed": 2}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_ID = 255
# Deeper bodies are refused: far beyond any Runflow object, and every later step (storing,
# the API, the dashboard, events) walks the tree recursively.
MAX_DEPTH = 64


@dataclass(frozen=True)
class Callback:
    """One verified callback: `fields` uses GET /v1/evaluations names (`id`, `status_code`)."""

    kind: str  # "evaluation" | "run"
    event: str | None
    evaluation_id: str | None
    fields: dict[str, Any]


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:20]} is out of range")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One strict decoder for every body (json.loads with options builds a new one per call).
_decode = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant).decode


def _too_deep(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (iteratively: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _clean(value: Any) -> Any:
    """Replace unpaired surrogates (valid JSON escapes, but not storable as UTF-8)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {_clean(key): _clean(item) for key, item in value.items()}
    return value


def parse_body(body: bytes) -> dict[str, Any]:
    """Strict JSON object parsing; every refusal is a BadRequest with a one-line reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        payload = _decode(text)
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"body is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(payload, MAX_DEPTH):
        raise BadRequest(f"body is nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(body):
        cleaned: dict[str, Any] = _clean(payload)
        return cleaned
    return payload


def normalize(payload: dict[str, Any]) -> Callback:
    """Accept both body shapes of the contract (§3): the bare evaluation and the event envelope."""
    event = payload.get("event")
    if event is not None and not isinstance(event, str):
        raise BadRequest("event must be a string")
    if event and event.startswith("run."):
        return Callback("run", event, None, payload)
    fields = dict(payload)
    fields.pop("event", None)
    raw_id = fields.pop("evaluation_id", None) or fields.get("id")
    if raw_id is None or raw_id == "":
        raise BadRequest("body has no evaluation id (expected evaluation_id or id)")
    if not isinstance(raw_id, str) or len(raw_id) > _MAX_ID or not raw_id.isprintable():
        raise BadRequest(f"evaluation id must be a printable string of at most {_MAX_ID} chars")
    fields["id"] = raw_id
    if "status_code" not in fields and "status" in fields:
        fields["status_code"] = fields.pop("status")
    status = fields.get("status_code")
    if event in ("evaluation.completed", "evaluation.failed"):  # the event decides (§3)
        status = fields["status_code"] = event.removeprefix("evaluation.")
    if status is not None and (not isinstance(status, str) or status not in _RANK):
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {str(status)[:40]!r}")
    if event is None and status in TERMINAL:
        event = f"evaluation.{status}"
    return Callback("evaluation", event, raw_id, fields)


def stored_fields(body: bytes) -> dict[str, Any] | None:
    """The fields of a stored callback's body, or None if it no longer parses: it was applied,
    so it did, but a body edited by hand may not."""
    try:
        return normalize(parse_body(body)).fields
    except BadRequest:
        return None


def _newer_or_equal(incoming: dict[str, Any], existing: dict[str, Any]) -> bool:
    """Status rank first, then Runflow's own `updated_at`, else (the event envelope has none)
    `completed_at`, when both bodies give it; ties go to the later arrival. Runflow promises
    no order: a verdict's callback retried late must not undo the verdict that followed it
    (for good: the refetch that would repair it is refused as lagging)."""
    rank_in = _RANK.get(incoming.get("status_code") or "", -1)
    rank_old = _RANK.get(existing.get("status_code") or "", -1)
    if rank_in != rank_old:
        return rank_in > rank_old
    for key in ("updated_at", "completed_at"):
        stamp_in = normalize_time(incoming.get(key))
        stamp_old = normalize_time(existing.get(key))
        if stamp_in is not None and stamp_old is not None:
            return stamp_in >= stamp_old
    return True


# What only one verdict says (contract §4): Runflow's own GET of an evaluation with the other
# verdict says null for each (a failed one has no pass, score, issues, action or cost; a
# completed one no failure_code). Everything else (what was asked, times, feedback) is shared.
VERDICT_ONLY = {
    "completed": (
        "overall_passed",
        "weighted_pass_rate",
        "override_reason",
        "top_issues",
        "top_strengths",
        "check_summary",
        "analysis_modules_executed",
        "primary_action_code",
        "cost",
        "judges",
        "action",
        "gate_failures",
    ),
    "failed": ("failure_code",),
}


def merge(existing: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
    """The evaluation after `incoming`: newer values win, no key is lost, no state regresses.

    A terminal status never goes back to pending/running, and a superseded evaluation stays
    superseded, whatever order the bodies arrive in. A verdict that follows the other one
    (completed after failed, or failed after completed) keeps none of the other's own fields
    (VERDICT_ONLY) that it did not give itself, whichever body arrived first: kept, a failed
    evaluation showed as passed with a score (and a completed one as a failure) in every
    filter, statistic and event.
    """
    newer, older = (
        (incoming, existing) if _newer_or_equal(incoming, existing) else (existing, incoming)
    )
    merged = {**older, **newer}
    verdict, other = merged.get("status_code"), older.get("status_code")
    if verdict in TERMINAL and other in TERMINAL and verdict != other:
        for key in VERDICT_ONLY[other]:
            if key in older:
                merged[key] = newer.get(key)
    merged["superseded_at"] = existing.get("superseded_at") or incoming.get("superseded_at")
    return merged


def _int(value: Any) -> int | None:
    """An integer that fits a SQLite INTEGER (64 bits); JSON integers have no bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if -(2**63) <= value < 2**63 else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer such as 10**400: no float holds it
        return None


def _rate(value: Any) -> float | None:
    """A pass rate (0.0 to 1.0, the contract); anything else stays in the stored body only: a
    score of 1e308 overflowed PostgreSQL's sums and stopped applying."""
    rate = _float(value)
    return rate if rate is not None and 0.0 <= rate <= 1.0 else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _labels(value: Any) -> list[str]:
    """The string labels of a list, NUL as U+FFFD: PostgreSQL cannot read a label's "\\u0000"
    out of the stored JSON (the overview failed there); the delivery keeps the exact bytes."""
    if not isinstance(value, list):
        return []
    return [item.replace("\x00", "\ufffd") for item in value if isinstance(item, str)]


def columns(fields: dict[str, Any]) -> dict[str, Any]:
    """The indexed, typed columns of an evaluation row, derived from its latest fields."""
    passed = fields.get("overall_passed")
    feedback = fields.get("feedback_is_positive")
    return {
        "client_ref": _str(fields.get("client_ref")),
        "status": _str(fields.get("status_code")),
        "passed": None if not isinstance(passed, bool) else int(passed),
        "score": _rate(fields.get("weighted_pass_rate")),
        "task_type": _str(fields.get("task_type")),
        "failure_code": _str(fields.get("failure_code")),
        "top_issues": _labels(fields.get("top_issues")),
        "attempt_number": _int(fields.get("attempt_number")),
        "parent_evaluation_id": _str(fields.get("parent_evaluation_id")),
        "superseded_at": normalize_time(fields.get("superseded_at")),
        "created_at": normalize_time(fields.get("created_at")),
        "completed_at": normalize_time(fields.get("completed_at")),
        "run_id": _str(fields.get("run_id")),
        "image_url": _str(fields.get("generated_image_url")),
        "feedback_is_positive": None if not isinstance(feedback, bool) else int(feedback),
        "feedback_reason": _str(fields.get("feedback_reason")),
    }


# What the evaluation was asked to do: the same for each of its verdicts, unlike the verdict's
# own fields (status, passed, score, failure_code, issues, action, completed_at, …).
REQUEST_FIELDS = (
    "client_ref",
    "task_type",
    "task_description",
    "generation_prompt",
    "generated_image_url",
    "input_attributes",
    "reference_images",
    "evaluation_instructions",
    "run_id",
    "parent_evaluation_id",
    "attempt_number",
    "org_id",
    "job_class_code",
    "source_code",
    "submitted_at",
    "created_at",
)


def verdict_fields(own: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """An older verdict as its own callback told it, for its event once a newer verdict is the
    stored state: only what the evaluation was asked to do comes from the state, where the
    callback does not say it (an envelope carries few fields)."""
    asked = {
        key: state[key]
        for key in REQUEST_FIELDS
        if own.get(key) is None and state.get(key) is not None
    }
    return {**own, **asked} if asked else own


def judge_issues(fields: dict[str, Any]) -> list[tuple[str | None, str | None, str | None, str]]:
    """(judge, category, subcategory, detail) for every issue of the `judges` embed."""
    found = []
    judges = fields.get("judges")
    for judge in judges if isinstance(judges, list) else []:
        if not isinstance(judge, dict) or not isinstance(judge.get("issues"), list):
            continue
        for issue in judge["issues"]:
            if isinstance(issue, dict):
                found.append(
                    (
                        _str(judge.get("name")),
                        _str(issue.get("category")),
                        _str(issue.get("subcategory")),
                        str(issue.get("detail") or ""),
                    )
                )
    return found
