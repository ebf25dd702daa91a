"""Read queries for the API, dashboard and CLI: one WHERE builder, keyset pagination."""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from dataclasses import dataclass, fields
from typing import Any

from ..errors import BadRequest

ITEM_COLUMNS = (
    "id, client_ref, status, event, passed, score, task_type, failure_code, top_issues,"
    " attempt_number, parent_evaluation_id, superseded, superseded_at, created_at,"
    " completed_at, received_at, updated_at, run_id, image_url, refetched,"
    " feedback_is_positive, feedback_reason, source"
)


@dataclass(frozen=True)
class EvaluationFilter:
    """Every filter of GET /api/evaluations; None means "any"."""

    client_ref: str | None = None
    status: str | None = None
    passed: bool | None = None
    task_type: str | None = None
    failure_code: str | None = None
    since: str | None = None  # stored time form, compared with received_at
    until: str | None = None
    q: str | None = None

    def where(self, alias: str = "") -> tuple[str, dict[str, Any]]:
        """` WHERE …` (or "") and its parameters; `alias` qualifies columns in joins."""
        a = f"{alias}." if alias else ""
        clauses = []
        params: dict[str, Any] = {}
        for name in ("client_ref", "status", "task_type", "failure_code"):
            value = getattr(self, name)
            if value is not None:
                clauses.append(f"{a}{name} = :{name}")
                params[name] = value
        if self.passed is not None:
            clauses.append(f"{a}passed = :passed")
            params["passed"] = int(self.passed)
        if self.since is not None:
            clauses.append(f"{a}received_at >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append(f"{a}received_at < :until")
            params["until"] = self.until
        if self.q:
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params["q"] = pattern + "%"
            clauses.append(
                "("
                + " OR ".join(
                    f"{a}{column} LIKE :q ESCAPE '\\'"
                    for column in ("id", "client_ref", "task_type", "failure_code", "top_issues")
                )
                + ")"
            )
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def item(row: sqlite3.Row) -> dict[str, Any]:
    """An evaluation as the API shows it (design.md §4)."""
    data = dict(row)
    for flag in ("passed", "superseded", "refetched"):
        if data[flag] is not None:
            data[flag] = bool(data[flag])
    data["top_issues"] = json.loads(data["top_issues"] or "[]")
    positive = data.pop("feedback_is_positive")
    reason = data.pop("feedback_reason")
    data["feedback"] = (
        None
        if positive is None and reason is None
        else {"is_positive": None if positive is None else bool(positive), "reason": reason}
    )
    return data


def encode_cursor(received_at: str, evaluation_id: str) -> str:
    raw = json.dumps([received_at, evaluation_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        received_at, evaluation_id = json.loads(raw)
        if isinstance(received_at, str) and isinstance(evaluation_id, str):
            return received_at, evaluation_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise BadRequest("cursor is not valid: pass next_cursor from the previous page unchanged")


def list_evaluations(
    conn: sqlite3.Connection,
    where: EvaluationFilter,
    limit: int,
    cursor: str | None = None,
    newest_first: bool = True,
) -> tuple[list[dict[str, Any]], str | None]:
    """By time received (newest first unless asked); `next_cursor` is None on the last page."""
    sql, params = where.where()
    if cursor is not None:
        params["c_at"], params["c_id"] = decode_cursor(cursor)
        beyond = "<" if newest_first else ">"
        sql += (" AND " if sql else " WHERE ") + f"(received_at, id) {beyond} (:c_at, :c_id)"
    params["limit"] = limit + 1
    order = "DESC" if newest_first else "ASC"
    rows = conn.execute(
        f"SELECT {ITEM_COLUMNS} FROM evaluations{sql}"
        f" ORDER BY received_at {order}, id {order} LIMIT :limit",
        params,
    ).fetchall()
    items = [item(row) for row in rows[:limit]]
    more = len(rows) > limit
    next_cursor = encode_cursor(items[-1]["received_at"], items[-1]["id"]) if more else None
    return items, next_cursor


def get_evaluation(conn: sqlite3.Connection, evaluation_id: str) -> dict[str, Any] | None:
    """The evaluation, its latest Runflow object, its issues, deliveries and forwards."""
    row = conn.execute(
        f"SELECT {ITEM_COLUMNS}, data FROM evaluations WHERE id = ?", (evaluation_id,)
    ).fetchone()
    if row is None:
        return None
    evaluation = item(row)
    evaluation["runflow"] = json.loads(evaluation.pop("data"))
    issues = conn.execute(
        "SELECT judge, category, subcategory, detail FROM issues WHERE evaluation_id = ?"
        " ORDER BY id",
        (evaluation_id,),
    ).fetchall()
    deliveries = conn.execute(
        "SELECT id, received_at, last_received_at, receipts, source, request_id, secret_index,"
        " sha256, kind, event, outcome, headers, body FROM deliveries WHERE evaluation_id = ?"
        " ORDER BY id",
        (evaluation_id,),
    ).fetchall()
    forwards = conn.execute(
        "SELECT id, sink, event_id, event_type, state, attempts, next_attempt_at, last_error,"
        " created_at, updated_at FROM outbox WHERE evaluation_id = ? ORDER BY id",
        (evaluation_id,),
    ).fetchall()
    return {
        "evaluation": evaluation,
        "issues": [dict(issue) for issue in issues],
        "deliveries": [delivery_dict(row) for row in deliveries],
        "forwards": [dict(forward) for forward in forwards],
    }


def delivery_dict(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["headers"] = json.loads(data["headers"] or "{}")
    data["body"] = bytes(data["body"]).decode("utf-8", "replace")
    return data


def get_client_ref(
    conn: sqlite3.Connection, client_ref: str, limit: int = 500
) -> dict[str, Any] | None:
    pointer = conn.execute(
        "SELECT current_evaluation_id, latest_evaluation_id, evaluations FROM client_refs"
        " WHERE client_ref = ?",
        (client_ref,),
    ).fetchone()
    if pointer is None:
        return None
    rows = conn.execute(
        f"SELECT {ITEM_COLUMNS} FROM evaluations WHERE client_ref = ?"
        " ORDER BY received_at DESC, id DESC LIMIT ?",
        (client_ref, limit),
    ).fetchall()
    by_id = {row["id"]: item(row) for row in rows}

    def lookup(evaluation_id: str | None) -> dict[str, Any] | None:
        if evaluation_id is None:
            return None
        if evaluation_id not in by_id:
            found = conn.execute(
                f"SELECT {ITEM_COLUMNS} FROM evaluations WHERE id = ?", (evaluation_id,)
            ).fetchone()
            return item(found) if found else None
        return by_id[evaluation_id]

    return {
        "client_ref": client_ref,
        "current": lookup(pointer["current_evaluation_id"]),
        "latest": lookup(pointer["latest_evaluation_id"]),
        "total": pointer["evaluations"],
        "evaluations": list(by_id.values()),
    }


def stats(conn: sqlite3.Connection, where: EvaluationFilter) -> dict[str, Any]:
    """Counts, pass rate, score distribution, top issues, per day and per task type."""
    sql, params = where.where()
    totals = conn.execute(
        "SELECT count(*) AS total, sum(passed = 1) AS passed, sum(passed = 0) AS not_passed,"
        f" avg(score) AS mean_score FROM evaluations{sql}",
        params,
    ).fetchone()
    by_status = dict(
        conn.execute(
            f"SELECT coalesce(status, 'unknown'), count(*) FROM evaluations{sql} GROUP BY 1",
            params,
        ).fetchall()
    )
    buckets = dict(
        conn.execute(
            "SELECT min(cast(score * 10 AS INTEGER), 9), count(*) FROM evaluations"
            f"{sql}{' AND' if sql else ' WHERE'} score IS NOT NULL GROUP BY 1",
            params,
        ).fetchall()
    )

    def grouped(select: str, group: str, order: str = "count DESC", limit: int = 20) -> list[Any]:
        rows = conn.execute(
            f"SELECT {select} FROM evaluations{sql}"
            f" GROUP BY {group} ORDER BY {order} LIMIT {limit}",
            params,
        ).fetchall()
        return [dict(row) for row in rows]

    verdict = (
        "count(*) AS total, coalesce(sum(passed = 1), 0) AS passed,"
        " coalesce(sum(passed = 0), 0) AS not_passed,"
        " coalesce(sum(status = 'failed'), 0) AS failed,"
        " round(1.0 * sum(passed = 1) / nullif(sum(passed IS NOT NULL), 0), 4) AS pass_rate,"
        " round(avg(score), 4) AS mean_score"
    )
    joined, _ = where.where("e")
    categories = conn.execute(
        "SELECT i.category, i.subcategory, count(*) AS count FROM issues i"
        " JOIN evaluations e ON e.id = i.evaluation_id"
        f"{joined} GROUP BY 1, 2 ORDER BY count DESC LIMIT 20",
        params,
    ).fetchall()
    labels = conn.execute(
        "SELECT j.value AS label, count(*) AS count FROM evaluations e, json_each(e.top_issues) j"
        f"{joined} GROUP BY 1 ORDER BY count DESC LIMIT 20",
        params,
    ).fetchall()
    rated = (totals["passed"] or 0) + (totals["not_passed"] or 0)
    return {
        "total": totals["total"],
        "by_status": by_status,
        "passed": totals["passed"] or 0,
        "not_passed": totals["not_passed"] or 0,
        "pass_rate": round(totals["passed"] / rated, 4) if rated else None,
        "mean_score": None if totals["mean_score"] is None else round(totals["mean_score"], 4),
        "score_distribution": [
            {"from": i / 10, "to": (i + 1) / 10, "count": buckets.get(i, 0)} for i in range(10)
        ],
        "failure_codes": grouped(
            "failure_code, count(*) AS count", "failure_code HAVING failure_code IS NOT NULL"
        ),
        "top_issue_categories": [dict(row) for row in categories],
        "top_issues": [dict(row) for row in labels],
        "per_day": grouped(
            f"substr(coalesce(completed_at, received_at), 1, 10) AS day, {verdict}",
            "day",
            order="day DESC",
            limit=90,
        ),
        "per_task_type": grouped(f"task_type, {verdict}", "task_type", order="total DESC"),
    }
