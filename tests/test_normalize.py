from __future__ import annotations

import itertools
from typing import Any

import pytest

from receiver.errors import BadRequest
from receiver.normalize import (
    MAX_DEPTH,
    VERDICT_ONLY,
    Callback,
    columns,
    judge_issues,
    merge,
    normalize,
    parse_body,
)

from .helpers import fixture

COMPLETED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
FAILED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e22"


# parse_body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", {}),
        (b'{"id": "e-1"}', {"id": "e-1"}),
        (b' \n{"a": [1, 2.5, true, null]}\n ', {"a": [1, 2.5, True, None]}),
        ('{"d": "Größe ✓"}'.encode(), {"d": "Größe ✓"}),
        (b'{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
        (b'{"a": 1, "a": 2}', {"a": 2}),
        (b'{"s": "bad\\ud800ref"}', {"s": "bad\ufffdref"}),
        (
            b'{"bad\\udfff": ["x\\udbff", {"k": "\\ud800"}]}',
            {"bad\ufffd": ["x\ufffd", {"k": "\ufffd"}]},
        ),
        (b'{"ok": "\\ud83d\\ude00"}', {"ok": "\U0001f600"}),
    ],
    ids=[
        "empty-object",
        "object",
        "whitespace-and-types",
        "utf8",
        "big-int",
        "duplicate-key-last-wins",
        "lone-surrogate",
        "lone-surrogates-everywhere",
        "surrogate-pair-kept",
    ],
)
def test_parse_body_accepts(body: bytes, expected: dict[str, Any]) -> None:
    assert parse_body(body) == expected


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is not valid JSON"),
        (b"not json", "body is not valid JSON"),
        (b'{"a": 1', "body is not valid JSON"),
        (b'{"a": 1} trailing', "body is not valid JSON"),
        (b"\xff{}", "body is not valid UTF-8 (byte 0)"),
        (b'{"a": "\xc3"}', "body is not valid UTF-8 (byte 7)"),
        (b'{"x": NaN}', "NaN is not valid JSON"),
        (b'{"x": Infinity}', "Infinity is not valid JSON"),
        (b'{"x": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"x": 1e999}', "out of range"),
        (b'{"x": -1e999}', "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[]", "body must be a JSON object, got list"),
        (b"null", "body must be a JSON object, got NoneType"),
        (b"42", "body must be a JSON object, got int"),
        (b'"text"', "body must be a JSON object, got str"),
    ],
    ids=[
        "empty",
        "not-json",
        "truncated",
        "trailing-garbage",
        "bad-utf8-start",
        "bad-utf8-inside",
        "nan",
        "infinity",
        "minus-infinity",
        "huge",
        "huge-negative",
        "deep-nesting",
        "array",
        "null",
        "number",
        "string",
    ],
)
def test_parse_body_refuses_with_one_line(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_body(body)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
    assert len(message) < 300
    assert caught.value.status == 400


@pytest.mark.parametrize("pad", [b"", b'"pad":[{},{}],'], ids=["alone", "with-siblings"])
@pytest.mark.parametrize(
    ("levels", "refused"),
    [(MAX_DEPTH - 1, False), (MAX_DEPTH, False), (MAX_DEPTH + 1, True), (MAX_DEPTH + 5, True)],
)
def test_nesting_is_counted_from_the_body_itself(levels: int, refused: bool, pad: bytes) -> None:
    """The body object is level 1: MAX_DEPTH levels in all pass, one more is refused, whether
    or not shallow siblings give the body more brackets than levels."""
    body = b"{" + pad + b'"a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"
    if not refused:
        assert "a" in parse_body(body)
        return
    with pytest.raises(BadRequest, match=f"nested more than {MAX_DEPTH} levels deep"):
        parse_body(body)


# normalize


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"id": "e-1", "status_code": "completed", "overall_passed": True},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed", "overall_passed": True},
            ),
        ),
        (
            {"id": "e-1", "status_code": "failed", "failure_code": "timed_out"},
            Callback(
                "evaluation",
                "evaluation.failed",
                "e-1",
                {"id": "e-1", "status_code": "failed", "failure_code": "timed_out"},
            ),
        ),
        (
            {"id": "e-1", "status_code": "running"},
            Callback("evaluation", None, "e-1", {"id": "e-1", "status_code": "running"}),
        ),
        (
            {"id": "e-1", "status_code": "pending"},
            Callback("evaluation", None, "e-1", {"id": "e-1", "status_code": "pending"}),
        ),
        (
            {"id": "e-1"},
            Callback("evaluation", None, "e-1", {"id": "e-1"}),
        ),
        (
            {"id": "e-1", "status_code": None},
            Callback("evaluation", None, "e-1", {"id": "e-1", "status_code": None}),
        ),
        (
            {"event": "evaluation.completed", "evaluation_id": "e-1", "status": "completed"},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed"},
            ),
        ),
        (
            {"event": "evaluation.failed", "evaluation_id": "e-1", "status": "failed"},
            Callback(
                "evaluation", "evaluation.failed", "e-1", {"id": "e-1", "status_code": "failed"}
            ),
        ),
        (
            {"event": "evaluation.completed", "evaluation_id": "e-1"},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed"},
            ),
        ),
        (
            {"event": "evaluation.failed", "evaluation_id": "e-1", "status": None},
            Callback(
                "evaluation", "evaluation.failed", "e-1", {"id": "e-1", "status_code": "failed"}
            ),
        ),
        (  # contradictory: the event decides (contract §3); it was forwarded as completed
            {"event": "evaluation.failed", "evaluation_id": "e-1", "status": "completed"},
            Callback(
                "evaluation", "evaluation.failed", "e-1", {"id": "e-1", "status_code": "failed"}
            ),
        ),
        (
            {"event": "evaluation.completed", "evaluation_id": "e-1", "status": "running"},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed"},
            ),
        ),
        (
            {"evaluation_id": "e-1", "status": "completed"},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed"},
            ),
        ),
        (
            {"event": "evaluation.completed", "evaluation_id": "e-1", "id": "evt-9"},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed"},
            ),
        ),
        (
            {"evaluation_id": "", "id": "e-1", "status_code": "running"},
            Callback("evaluation", None, "e-1", {"id": "e-1", "status_code": "running"}),
        ),
        (
            {"id": "e-1", "status_code": "completed", "status": "whatever", "x-new": {"a": 1}},
            Callback(
                "evaluation",
                "evaluation.completed",
                "e-1",
                {"id": "e-1", "status_code": "completed", "status": "whatever", "x-new": {"a": 1}},
            ),
        ),
    ],
    ids=[
        "bare-completed",
        "bare-failed",
        "bare-running-no-event",
        "bare-pending-no-event",
        "bare-no-status",
        "bare-null-status",
        "envelope-completed",
        "envelope-failed",
        "envelope-status-from-event",
        "envelope-null-status-from-event",
        "envelope-event-over-a-contradicting-status",
        "envelope-event-over-a-running-status",
        "envelope-without-event",
        "envelope-id-is-not-the-evaluation",
        "empty-evaluation-id-falls-back-to-id",
        "unknown-fields-kept",
    ],
)
def test_normalize_evaluation_shapes(payload: dict[str, Any], expected: Callback) -> None:
    assert normalize(payload) == expected


@pytest.mark.parametrize(
    "event", ["run.completed", "run.failed", "run.cancelled", "run.partial_succeeded"]
)
def test_run_callbacks_are_kind_run_and_kept_whole(event: str) -> None:
    payload = {"event": event, "run_id": "r-1", "status": "succeeded", "metadata": None}
    assert normalize(payload) == Callback("run", event, None, payload)


@pytest.mark.parametrize(
    ("name", "kind", "event", "evaluation_id", "status"),
    [
        (
            "evaluation-completed.json",
            "evaluation",
            "evaluation.completed",
            COMPLETED_ID,
            "completed",
        ),
        (
            "evaluation-completed-envelope.json",
            "evaluation",
            "evaluation.completed",
            COMPLETED_ID,
            "completed",
        ),
        ("evaluation-failed.json", "evaluation", "evaluation.failed", FAILED_ID, "failed"),
        ("evaluation-failed-envelope.json", "evaluation", "evaluation.failed", FAILED_ID, "failed"),
        (
            "get-evaluation-embedded.json",
            "evaluation",
            "evaluation.completed",
            COMPLETED_ID,
            "completed",
        ),
        ("run-completed.json", "run", "run.completed", None, "succeeded"),
    ],
)
def test_normalize_every_fixture(
    name: str, kind: str, event: str, evaluation_id: str | None, status: str
) -> None:
    callback = normalize(parse_body(fixture(name)))
    assert (callback.kind, callback.event, callback.evaluation_id) == (kind, event, evaluation_id)
    assert callback.fields.get("status_code", callback.fields.get("status")) == status
    if kind == "evaluation":
        assert callback.fields["id"] == evaluation_id
        assert "evaluation_id" not in callback.fields
        assert "event" not in callback.fields


def test_normalize_does_not_change_its_input() -> None:
    payload = {"event": "evaluation.completed", "evaluation_id": "e-1", "status": "completed"}
    copy = dict(payload)
    normalize(payload)
    assert payload == copy


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({}, "no evaluation id"),
        ({"status_code": "completed"}, "no evaluation id"),
        ({"id": ""}, "no evaluation id"),
        ({"id": None, "evaluation_id": None}, "no evaluation id"),
        ({"event": "evaluation.completed"}, "no evaluation id"),
        ({"id": 42}, "evaluation id must be a printable string"),
        ({"evaluation_id": 42}, "evaluation id must be a printable string"),
        ({"id": ["e-1"]}, "evaluation id must be a printable string"),
        ({"id": "x" * 256}, "evaluation id must be a printable string"),
        ({"id": "e\n1"}, "evaluation id must be a printable string"),
        ({"id": "e-1", "status_code": "done"}, "status must be one of pending, running"),
        ({"id": "e-1", "status": "succeeded"}, "status must be one of"),
        ({"id": "e-1", "status_code": 2}, "status must be one of"),
        ({"id": "e-1", "status_code": ["completed"]}, "status must be one of"),
        ({"id": "e-1", "status": {"code": "completed"}}, "status must be one of"),
        ({"id": "e-1", "event": 5}, "event must be a string"),
        ({"id": "e-1", "event": ["run.completed"]}, "event must be a string"),
    ],
    ids=[
        "empty",
        "no-id",
        "empty-id",
        "null-ids",
        "event-only",
        "int-id",
        "int-evaluation-id",
        "list-id",
        "id-too-long",
        "id-with-newline",
        "unknown-status",
        "run-status-without-run-event",
        "int-status",
        "list-status",
        "object-status",
        "int-event",
        "list-event",
    ],
)
def test_normalize_refuses(payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        normalize(payload)
    assert reason in str(caught.value)


def test_an_id_of_255_characters_is_accepted() -> None:
    assert normalize({"id": "x" * 255}).evaluation_id == "x" * 255


# merge


def _at(second: int) -> str:
    return f"2026-11-20T09:00:{second:02d}+00:00"


# A completed verdict with every field only a completed one has (normalize.VERDICT_ONLY).
COMPLETED_OWN: dict[str, Any] = {
    "status_code": "completed",
    "overall_passed": True,
    "weighted_pass_rate": 0.9,
    "override_reason": None,
    "top_issues": ["Collar asymmetry"],
    "top_strengths": ["Lighting matches prompt"],
    "check_summary": {"passed": 3, "failed": 0, "total": 3},
    "analysis_modules_executed": 3,
    "primary_action_code": "accept",
    "cost": "0.0400",
    "judges": [{"name": "anatomy", "issues": [{"category": "anatomy"}]}],
    "action": {"primary_action": "accept"},
    "gate_failures": [{"output_key": "k", "module": "m", "reason": "r"}],
    "completed_at": _at(5),
}


@pytest.mark.parametrize(
    ("existing", "incoming", "expected"),
    [
        (
            {"id": "e", "status_code": "pending", "updated_at": _at(1)},
            {"id": "e", "status_code": "running", "updated_at": _at(2)},
            {"id": "e", "status_code": "running", "updated_at": _at(2), "superseded_at": None},
        ),
        (
            {"id": "e", "status_code": "completed", "score": 0.7, "updated_at": _at(5)},
            {"id": "e", "status_code": "running", "updated_at": _at(9), "run_id": "r"},
            {
                "id": "e",
                "status_code": "completed",
                "score": 0.7,
                "updated_at": _at(5),
                "run_id": "r",
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "failed", "updated_at": _at(5)},
            {"id": "e", "status_code": "pending", "updated_at": _at(9)},
            {"id": "e", "status_code": "failed", "updated_at": _at(5), "superseded_at": None},
        ),
        (
            {"id": "e", "status_code": "running", "updated_at": _at(9)},
            {"id": "e", "status_code": "completed", "updated_at": _at(5)},
            {"id": "e", "status_code": "completed", "updated_at": _at(5), "superseded_at": None},
        ),
        (
            {"id": "e", "status_code": "completed", "score": 0.1, "updated_at": _at(1)},
            {"id": "e", "status_code": "completed", "score": 0.9, "updated_at": _at(2)},
            {
                "id": "e",
                "status_code": "completed",
                "score": 0.9,
                "updated_at": _at(2),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "score": 0.9, "updated_at": _at(2)},
            {"id": "e", "status_code": "completed", "score": 0.1, "updated_at": _at(1)},
            {
                "id": "e",
                "status_code": "completed",
                "score": 0.9,
                "updated_at": _at(2),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "updated_at": "2026-11-20T10:00:00+01:00"},
            {
                "id": "e",
                "status_code": "completed",
                "score": 0.5,
                "updated_at": "2026-11-20T09:30:00Z",
            },
            {
                "id": "e",
                "status_code": "completed",
                "score": 0.5,
                "updated_at": "2026-11-20T09:30:00Z",
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "failed", "updated_at": _at(2)},
            {"id": "e", "status_code": "completed", "updated_at": _at(1)},
            {"id": "e", "status_code": "failed", "updated_at": _at(2), "superseded_at": None},
        ),
        (
            {"id": "e", "status_code": "completed", "score": 0.1, "updated_at": _at(1)},
            {"id": "e", "status_code": "completed", "score": 0.9},
            {
                "id": "e",
                "status_code": "completed",
                "score": 0.9,
                "updated_at": _at(1),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "score": 0.1},
            {"id": "e", "status_code": "completed", "score": 0.9},
            {"id": "e", "status_code": "completed", "score": 0.9, "superseded_at": None},
        ),
        (
            {"id": "e", "status_code": "completed", "a": 1, "top_issues": ["x"]},
            {"id": "e", "status_code": "completed", "b": 2, "judges": []},
            {
                "id": "e",
                "status_code": "completed",
                "a": 1,
                "b": 2,
                "top_issues": ["x"],
                "judges": [],
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "superseded_at": _at(3), "updated_at": _at(3)},
            {"id": "e", "status_code": "completed", "superseded_at": None, "updated_at": _at(4)},
            {"id": "e", "status_code": "completed", "superseded_at": _at(3), "updated_at": _at(4)},
        ),
        (
            {"id": "e", "status_code": "completed", "superseded_at": _at(3), "updated_at": _at(9)},
            {"id": "e", "status_code": "completed", "updated_at": _at(4)},
            {"id": "e", "status_code": "completed", "superseded_at": _at(3), "updated_at": _at(9)},
        ),
        (
            {"id": "e", "status_code": "completed", "updated_at": _at(9)},
            {"id": "e", "status_code": "completed", "superseded_at": _at(3), "updated_at": _at(4)},
            {"id": "e", "status_code": "completed", "superseded_at": _at(3), "updated_at": _at(9)},
        ),
        (
            {"id": "e", "status_code": "completed", "overall_passed": True},
            {"id": "e", "status_code": "pending", "overall_passed": None, "client_ref": "c"},
            {
                "id": "e",
                "status_code": "completed",
                "overall_passed": True,
                "client_ref": "c",
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "failed", "failure_code": "timed_out", "client_ref": "c"},
            {"id": "e", "status_code": "completed", "overall_passed": True},
            {
                "id": "e",
                "status_code": "completed",
                "overall_passed": True,
                "failure_code": None,
                "client_ref": "c",
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "overall_passed": True, "updated_at": _at(5)},
            {
                "id": "e",
                "status_code": "failed",
                "failure_code": "timed_out",
                "updated_at": _at(4),
            },
            {
                "id": "e",
                "status_code": "completed",
                "overall_passed": True,
                "failure_code": None,
                "updated_at": _at(5),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "failed", "failure_code": "timed_out"},
            {"id": "e", "status_code": "completed", "failure_code": "processing_failed"},
            {
                "id": "e",
                "status_code": "completed",
                "failure_code": "processing_failed",
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "running", "failure_code": "timed_out"},
            {"id": "e", "status_code": "failed"},
            {
                "id": "e",
                "status_code": "failed",
                "failure_code": "timed_out",
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "client_ref": "c", "feedback_is_positive": True, **COMPLETED_OWN},
            {"id": "e", "status_code": "failed", "failure_code": "timed_out"},
            {
                "id": "e",
                "status_code": "failed",
                "failure_code": "timed_out",
                "client_ref": "c",
                "feedback_is_positive": True,
                "completed_at": _at(5),
                **dict.fromkeys(COMPLETED_OWN.keys() - {"status_code", "completed_at"}),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "failed", "failure_code": "timed_out", "updated_at": _at(6)},
            {**COMPLETED_OWN, "id": "e", "updated_at": _at(5)},
            {
                "id": "e",
                "status_code": "failed",
                "failure_code": "timed_out",
                "completed_at": _at(5),
                "updated_at": _at(6),
                **dict.fromkeys(COMPLETED_OWN.keys() - {"status_code", "completed_at"}),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "overall_passed": True, "updated_at": _at(5)},
            {"id": "e", "status_code": "failed", "weighted_pass_rate": 0.2, "updated_at": _at(5)},
            {
                "id": "e",
                "status_code": "failed",
                "overall_passed": None,
                "weighted_pass_rate": 0.2,
                "updated_at": _at(5),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "running", "top_issues": ["x"], "cost": "0.01"},
            {"id": "e", "status_code": "failed"},
            {
                "id": "e",
                "status_code": "failed",
                "top_issues": ["x"],
                "cost": "0.01",
                "superseded_at": None,
            },
        ),
        (  # envelopes (no updated_at): Runflow retried the failed callback's delivery late
            {"id": "e", "status_code": "completed", "overall_passed": True, "completed_at": _at(5)},
            {"id": "e", "status_code": "failed", "failure_code": "t", "completed_at": _at(4)},
            {
                "id": "e",
                "status_code": "completed",
                "overall_passed": True,
                "failure_code": None,
                "completed_at": _at(5),
                "superseded_at": None,
            },
        ),
        (
            {"id": "e", "status_code": "completed", "overall_passed": True, "completed_at": _at(4)},
            {"id": "e", "status_code": "failed", "failure_code": "t", "completed_at": _at(5)},
            {
                "id": "e",
                "status_code": "failed",
                "overall_passed": None,
                "failure_code": "t",
                "completed_at": _at(5),
                "superseded_at": None,
            },
        ),
    ],
    ids=[
        "pending-to-running",
        "completed-never-back-to-running",
        "failed-never-back-to-pending",
        "late-completed-beats-newer-running",
        "newer-updated-at-wins",
        "older-updated-at-loses",
        "updated-at-compared-as-time-not-text",
        "terminal-vs-terminal-by-updated-at",
        "incoming-without-updated-at-wins-tie",
        "no-updated-at-later-arrival-wins",
        "no-key-lost",
        "superseded-sticky-against-newer-null",
        "superseded-sticky-when-incoming-lacks-it",
        "superseded-taken-from-older-body",
        "losing-body-only-adds-missing-keys",
        "completed-after-failed-drops-its-failure-code",
        "late-failed-adds-no-failure-code-to-completed",
        "completed-keeps-a-failure-code-it-gives",
        "failed-keeps-an-earlier-failure-code",
        "failed-after-completed-drops-its-verdict",
        "late-completed-adds-no-verdict-to-failed",
        "failed-keeps-a-score-it-gives-on-a-tie",
        "failed-keeps-what-a-running-body-said",
        "no-updated-at-an-older-verdict-arriving-late-loses",
        "no-updated-at-the-newer-completed-at-wins",
    ],
)
def test_merge_table(
    existing: dict[str, Any], incoming: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert merge(existing, incoming) == expected


def test_merge_does_not_change_its_inputs() -> None:
    existing = {"id": "e", "status_code": "running"}
    incoming = {"id": "e", "status_code": "completed"}
    merge(existing, incoming)
    assert existing == {"id": "e", "status_code": "running"}
    assert incoming == {"id": "e", "status_code": "completed"}


BODIES: list[dict[str, Any]] = [
    {"id": "e", "status_code": "pending", "updated_at": _at(1), "client_ref": "c"},
    {"id": "e", "status_code": "running", "updated_at": _at(2), "run_id": "r-1"},
    {
        "id": "e",
        "status_code": "completed",
        "updated_at": _at(3),
        "overall_passed": False,
        "weighted_pass_rate": 0.4,
    },
    {"id": "e", "status_code": "completed", "updated_at": _at(4), "weighted_pass_rate": 0.6},
    {"id": "e", "status_code": "running", "updated_at": _at(8), "superseded_at": _at(7)},
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(BODIES)))))
def test_merge_gives_the_same_state_in_any_arrival_order(order: tuple[int, ...]) -> None:
    state = BODIES[order[0]]
    for index in order[1:]:
        state = merge(state, BODIES[index])
    assert state == {
        "id": "e",
        "status_code": "completed",
        "updated_at": _at(4),
        "client_ref": "c",
        "run_id": "r-1",
        "overall_passed": False,
        "weighted_pass_rate": 0.6,
        "superseded_at": _at(7),
    }


# columns


def test_columns_of_the_completed_fixture() -> None:
    fields = normalize(parse_body(fixture("evaluation-completed.json"))).fields
    assert columns(fields) == {
        "client_ref": "customer-job-123",
        "status": "completed",
        "passed": 0,
        "score": 0.62,
        "task_type": "headshot",
        "failure_code": None,
        "top_issues": ["Left hand has six fingers", "Collar asymmetry"],
        "attempt_number": 1,
        "parent_evaluation_id": None,
        "superseded_at": None,
        "created_at": "2026-11-20T09:14:02.118000Z",
        "completed_at": "2026-11-20T09:14:43.352000Z",
        "run_id": None,
        "image_url": "https://cdn.example.com/renders/job-123.png",
        "feedback_is_positive": None,
        "feedback_reason": None,
    }


def test_columns_of_the_failed_envelope() -> None:
    fields = normalize(parse_body(fixture("evaluation-failed-envelope.json"))).fields
    found = columns(fields)
    assert (found["status"], found["failure_code"], found["passed"], found["score"]) == (
        "failed",
        "invalid_media",
        None,
        None,
    )
    assert found["top_issues"] == []
    assert found["completed_at"] == "2026-11-20T09:15:03.500000Z"


@pytest.mark.parametrize(
    ("fields", "column", "expected"),
    [
        ({}, "client_ref", None),
        ({"client_ref": ""}, "client_ref", None),
        ({"client_ref": 7}, "client_ref", None),
        ({"client_ref": "team/job 1"}, "client_ref", "team/job 1"),
        ({"overall_passed": True}, "passed", 1),
        ({"overall_passed": False}, "passed", 0),
        ({"overall_passed": None}, "passed", None),
        ({"overall_passed": "true"}, "passed", None),
        ({"overall_passed": 1}, "passed", None),
        ({"weighted_pass_rate": 1}, "score", 1.0),
        ({"weighted_pass_rate": 0.25}, "score", 0.25),
        ({"weighted_pass_rate": True}, "score", None),
        ({"weighted_pass_rate": "0.5"}, "score", None),
        ({"attempt_number": 2}, "attempt_number", 2),
        ({"attempt_number": True}, "attempt_number", None),
        ({"attempt_number": 2.0}, "attempt_number", None),
        ({"top_issues": None}, "top_issues", []),
        ({"top_issues": "x"}, "top_issues", []),
        ({"top_issues": ["a", 1, None, "b"]}, "top_issues", ["a", "b"]),
        ({"completed_at": "2026-11-20T09:14:43Z"}, "completed_at", "2026-11-20T09:14:43.000000Z"),
        (
            {"completed_at": "2026-11-20T10:14:43.5+01:00"},
            "completed_at",
            "2026-11-20T09:14:43.500000Z",
        ),
        ({"completed_at": "2026-11-20"}, "completed_at", "2026-11-20T00:00:00.000000Z"),
        ({"completed_at": "yesterday"}, "completed_at", None),
        ({"completed_at": 1700000000}, "completed_at", None),
        (
            {"superseded_at": "2026-11-20T09:14:43+00:00"},
            "superseded_at",
            "2026-11-20T09:14:43.000000Z",
        ),
        ({"generated_image_url": "https://x/y.png"}, "image_url", "https://x/y.png"),
        ({"feedback_is_positive": False}, "feedback_is_positive", 0),
        ({"feedback_is_positive": "no"}, "feedback_is_positive", None),
        ({"feedback_reason": "blurry"}, "feedback_reason", "blurry"),
    ],
)
def test_columns_table(fields: dict[str, Any], column: str, expected: object) -> None:
    found = columns(fields)
    assert found[column] == expected
    assert type(found[column]) is type(expected)


# judge_issues


def test_judge_issues_of_the_embedded_fixture() -> None:
    fields = parse_body(fixture("get-evaluation-embedded.json"))
    assert judge_issues(fields) == [
        ("anatomy", "anatomy", "hands", "Left hand has six fingers"),
        ("wardrobe", "garment", "collar", "Collar asymmetry <@U123> & <!channel>"),
    ]


@pytest.mark.parametrize(
    ("judges", "expected"),
    [
        (None, []),
        ("judges", []),
        ({"issues": [{"detail": "x"}]}, []),
        ([], []),
        (["not a judge", 5, None], []),
        ([{"name": "a"}], []),
        ([{"name": "a", "issues": None}], []),
        ([{"name": "a", "issues": "text"}], []),
        ([{"name": "a", "issues": ["text", 1, None]}], []),
        ([{"issues": [{}]}], [(None, None, None, "")]),
        ([{"name": "", "issues": [{"detail": None}]}], [(None, None, None, "")]),
        ([{"name": "a", "issues": [{"detail": 3}]}], [("a", None, None, "3")]),
        (
            [
                {"name": "a", "issues": [{"category": "c", "subcategory": "s", "detail": "d"}]},
                {"name": "b", "issues": [{"category": "c2"}, {"detail": "d2"}]},
            ],
            [("a", "c", "s", "d"), ("b", "c2", None, ""), ("b", None, None, "d2")],
        ),
    ],
    ids=[
        "null",
        "string",
        "object",
        "empty",
        "not-objects",
        "no-issues-key",
        "null-issues",
        "string-issues",
        "issues-not-objects",
        "empty-issue",
        "empty-name-null-detail",
        "detail-not-string",
        "several-judges",
    ],
)
def test_judge_issues_table(judges: object, expected: list[tuple[Any, ...]]) -> None:
    assert judge_issues({"judges": judges}) == expected


def test_the_merge_table_covers_every_field_only_a_completed_verdict_has() -> None:
    assert set(VERDICT_ONLY["completed"]) == COMPLETED_OWN.keys() - {"status_code", "completed_at"}
