"""The OpenAPI 3.1 document of the HTTP interface (design.md §4), kept by hand so it is exact."""

from __future__ import annotations

from typing import Any

from . import __version__
from .normalize import STATUSES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "error")
_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}
_FILTER_PARAMS: list[dict[str, Any]] = [
    {"name": "client_ref", "in": "query", "schema": {**_STR, "minLength": 1, "maxLength": 255}},
    {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
    {
        "name": "passed",
        "in": "query",
        "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
    },
    {"name": "task_type", "in": "query", "schema": {**_STR, "minLength": 1, "maxLength": 255}},
    {"name": "failure_code", "in": "query", "schema": {**_STR, "minLength": 1, "maxLength": 255}},
    {
        "name": "since",
        "in": "query",
        "description": "received at or after: ISO 8601 time or a duration ago (24h, 7d)",
        "schema": _STR,
    },
    {"name": "until", "in": "query", "description": "received before; same forms", "schema": _STR},
    {
        "name": "q",
        "in": "query",
        "description": "text search: part of the id, client_ref, task type, failure code or a"
        " top issue label (ASCII case ignored)",
        "schema": {**_STR, "maxLength": 200, "pattern": "^[^\\u0000]*$"},
    },
]

_ITEM = {
    "type": "object",
    "required": [
        "id",
        "client_ref",
        "status",
        "event",
        "passed",
        "score",
        "task_type",
        "failure_code",
        "top_issues",
        "attempt_number",
        "superseded",
        "completed_at",
        "received_at",
        "refetched",
        "feedback",
    ],
    "properties": {
        "id": _STR,
        "client_ref": _NULL_STR,
        "status": {"type": ["string", "null"], "enum": [*STATUSES, None]},
        "event": _NULL_STR,
        "passed": {"type": ["boolean", "null"]},
        "score": {"type": ["number", "null"]},
        "task_type": _NULL_STR,
        "failure_code": _NULL_STR,
        "top_issues": {"type": "array", "items": _STR},
        "attempt_number": {"type": ["integer", "null"]},
        "parent_evaluation_id": _NULL_STR,
        "superseded": {"type": "boolean"},
        "superseded_at": _NULL_STR,
        "created_at": _NULL_STR,
        "completed_at": _NULL_STR,
        "received_at": _STR,
        "updated_at": {**_STR, "description": "the receiver's clock at its last write of it"},
        "run_id": _NULL_STR,
        "image_url": _NULL_STR,
        "refetched": {"type": "boolean"},
        "source": _NULL_STR,
        "feedback": {
            "type": ["object", "null"],
            "properties": {"is_positive": {"type": ["boolean", "null"]}, "reason": _NULL_STR},
        },
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["ok", "error"],
        "properties": {"ok": {"const": False}, "error": _STR},
    },
    "Receipt": {
        "type": "object",
        "required": ["ok", "outcome", "delivery_id", "evaluation_id"],
        "properties": {
            "ok": {"const": True},
            "outcome": {"enum": ["stored", "duplicate", "ignored"]},
            "delivery_id": {"type": "integer"},
            "evaluation_id": _NULL_STR,
        },
    },
    "Evaluation": _ITEM,
    "EvaluationPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("Evaluation")},
            "next_cursor": _NULL_STR,
        },
    },
    "EvaluationDetail": {
        "type": "object",
        "required": ["evaluation", "issues", "deliveries", "forwards"],
        "properties": {
            "evaluation": {
                "allOf": [_ref("Evaluation")],
                "properties": {
                    "runflow": {"type": "object", "description": "latest Runflow object"},
                    "refetch": {
                        "type": ["object", "null"],
                        "description": "where its refetch stands; null when none is wanted",
                        "properties": {
                            "state": {"enum": ["pending", "done", "failed"]},
                            "attempts": {"type": "integer"},
                            "next_at": _NULL_STR,
                            "error": _NULL_STR,
                        },
                    },
                },
            },
            "issues": {"type": "array", "items": {"type": "object"}},
            "deliveries": {"type": "array", "items": {"type": "object"}},
            "forwards": {"type": "array", "items": {"type": "object"}},
        },
    },
    "ClientRef": {
        "type": "object",
        "required": ["client_ref", "current", "latest", "total", "evaluations"],
        "properties": {
            "client_ref": _STR,
            "current": {"oneOf": [_ref("Evaluation"), {"type": "null"}]},
            "latest": {"oneOf": [_ref("Evaluation"), {"type": "null"}]},
            "total": {"type": "integer"},
            "evaluations": {"type": "array", "items": _ref("Evaluation")},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["total", "by_status", "pass_rate", "mean_score", "score_distribution"],
        "properties": {
            "total": {"type": "integer"},
            "by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
            "passed": {"type": "integer"},
            "not_passed": {"type": "integer"},
            "pass_rate": {"type": ["number", "null"]},
            "mean_score": {"type": ["number", "null"]},
            "score_distribution": {"type": "array", "items": {"type": "object"}},
            "failure_codes": {"type": "array", "items": {"type": "object"}},
            "top_issue_categories": {"type": "array", "items": {"type": "object"}},
            "top_issues": {"type": "array", "items": {"type": "object"}},
            "per_day": {"type": "array", "items": {"type": "object"}},
            "per_task_type": {"type": "array", "items": {"type": "object"}},
        },
    },
}


SCHEMAS["Forward"] = {
    "type": "object",
    "required": ["id", "sink", "event_id", "event_type", "evaluation_id", "state", "attempts"],
    "properties": {
        "id": {"type": "integer"},
        "sink": _STR,
        "event_id": _STR,
        "event_type": _STR,
        "evaluation_id": _STR,
        "delivery_id": {"type": ["integer", "null"]},
        "state": {"enum": ["pending", "done", "dead", "skipped"]},
        "attempts": {"type": "integer"},
        "next_attempt_at": _NULL_STR,
        "last_error": _NULL_STR,
        "created_at": _STR,
        "updated_at": _NULL_STR,
    },
}
SCHEMAS["ForwardPage"] = {
    "type": "object",
    "required": ["items", "next_cursor"],
    "properties": {"items": {"type": "array", "items": _ref("Forward")}, "next_cursor": _NULL_STR},
}


def _post(summary: str, ok: dict[str, Any], name: str) -> Any:
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "integer"}}
            ],
            # 403: with the session cookie and no X-CSRF-Token; 503: the store is down
            "responses": {"200": ok, **dict.fromkeys(("400", "401", "403", "404", "503"), _ERROR)},
        }
    }


def _get(summary: str, ok: dict[str, Any], params: list[dict[str, Any]] | None = None) -> Any:
    return {
        "get": {
            "summary": summary,
            "parameters": params or [],
            "responses": {"200": ok, **dict.fromkeys(("400", "401", "404", "503"), _ERROR)},
        }
    }


def document() -> dict[str, Any]:
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/webhooks/runflow": {
            "post": {
                "summary": "Runflow callback (authenticated by its Runflow-Signature)",
                "security": [],
                "parameters": [
                    {"name": "Runflow-Signature", "in": "header", "schema": _STR},
                    {"name": "Runflow-Request-Id", "in": "header", "schema": _STR},
                ],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": _json(_ref("Receipt"), "stored durably"),
                    **{code: _ERROR for code in ("400", "401", "408", "413")},
                    "503": {
                        **_json(
                            _ref("Error"),
                            "not stored (Runflow retries): the store cannot write, or did not"
                            " commit within 5 s",
                        ),
                        "headers": {
                            "Retry-After": {
                                "description": "seconds; sent when the commit took too long",
                                "schema": {"type": "integer"},
                            }
                        },
                    },
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "liveness",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "readiness: the store can commit",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "ready"), "503": _ERROR},
            }
        },
        "/metrics": {
            "get": {
                "summary": (
                    "Prometheus metrics (text format; OpenMetrics when the Accept header asks). "
                    "Bearer RECEIVER_METRICS_TOKEN or RECEIVER_DASHBOARD_TOKEN"
                ),
                "responses": {
                    "200": {
                        "description": "the exposition",
                        "content": {
                            "text/plain": {"schema": _STR},
                            "application/openmetrics-text": {"schema": _STR},
                        },
                    },
                    "401": _ERROR,
                },
            }
        },
        "/api/evaluations": _get(
            "Evaluations, newest received first; with changed_since, oldest change first",
            _json(_ref("EvaluationPage"), "a page"),
            [
                *_FILTER_PARAMS,
                {
                    "name": "changed_since",
                    "in": "query",
                    "description": "written at or after (updated_at, the receiver's clock at"
                    " its last write of the evaluation: a verdict, refetch, feedback,"
                    " superseding); same forms as since. The answer is ordered by updated_at,"
                    " then id; follow next_cursor for more, or ask again from the newest"
                    " updated_at seen (on PostgreSQL with several processes writing, from 2 s"
                    " before it: their commits need not land in the order of their clocks)",
                    "schema": _STR,
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                },
                {"name": "cursor", "in": "query", "schema": _STR},
            ],
        ),
        "/api/evaluations/{evaluation_id}": _get(
            "One evaluation with its deliveries and forwards",
            _json(_ref("EvaluationDetail"), "found"),
            [{"name": "evaluation_id", "in": "path", "required": True, "schema": _STR}],
        ),
        "/api/evaluations/{evaluation_id}/feedback": {
            "patch": {
                "summary": "Rate an evaluation in Runflow (true up, false down, null clears)",
                "parameters": [
                    {"name": "evaluation_id", "in": "path", "required": True, "schema": _STR}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["is_positive"],
                                "additionalProperties": False,
                                "properties": {
                                    "is_positive": {"type": ["boolean", "null"]},
                                    "reason": {
                                        "type": ["string", "null"],
                                        "minLength": 1,
                                        "maxLength": 2000,
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["ok", "evaluation"],
                            "properties": {"ok": {"const": True}, "evaluation": _ref("Evaluation")},
                        },
                        "stored",
                    ),
                    **dict.fromkeys(
                        ("400", "401", "403", "404", "408", "413", "501", "502", "503"), _ERROR
                    ),
                },
            }
        },
        "/api/client-refs/{client_ref}": _get(
            "A client_ref's current evaluation and history",
            _json(_ref("ClientRef"), "found"),
            [{"name": "client_ref", "in": "path", "required": True, "schema": _STR}],
        ),
        "/api/stats": _get("Counts and rates", _json(_ref("Stats"), "statistics"), _FILTER_PARAMS),
        "/api/forwards": _get(
            "Forwards (outbox rows), newest first",
            _json(_ref("ForwardPage"), "a page"),
            [
                {
                    "name": "state",
                    "in": "query",
                    "schema": {"enum": ["pending", "done", "dead", "skipped"]},
                },
                {
                    "name": "sink",
                    "in": "query",
                    "schema": {**_STR, "minLength": 1, "maxLength": 255},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                },
                {
                    "name": "cursor",
                    "in": "query",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            ],
        ),
        "/api/forwards/{forward_id}/retry": _post(
            "Send a dead (or done) forward again",
            _json(
                {
                    "type": "object",
                    "required": ["ok", "forward"],
                    "properties": {"ok": {"const": True}, "forward": {"type": "object"}},
                },
                "queued",
            ),
            "forward_id",
        ),
        "/api/deliveries/{delivery_id}/replay": _post(
            "Forward a stored delivery's verdict again to every sink that wants it",
            _json(
                {
                    "type": "object",
                    "required": ["ok", "queued"],
                    "properties": {"ok": {"const": True}, "queued": {"type": "integer"}},
                },
                "queued",
            ),
            "delivery_id",
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "receiver", "version": __version__},
        "paths": paths,
        "security": auth,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
