"""Read queries for the API, dashboard and CLI: one WHERE builder, keyset pagination."""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from dataclasses import replace
from typing import Any

from ..errors import BadRequest
from . import search
from .filters import EvaluationFilter
from .stats import stats

__all__ = [
    "EvaluationFilter",
    "get_client_ref",
    "get_evaluation",
    "list_changes",
    "list_evaluations",
    "stats",
]

ITEM_COLUMNS = (
    "id, client_ref, status, event, passed, score, task_type, failure_code, top_issues,"
    " attempt_number, parent_evaluation_id, superseded, superseded_at, created_at,"
    " completed_at, received_at, updated_at, run_id, image_url, refetched,"
    " feedback_is_positive, feedback_reason, source"
)


REFETCH_KEYS = ("refetch_state", "refetch_attempts", "refetch_next_at", "refetch_error")
REFETCH_COLUMNS = ", ".join(REFETCH_KEYS)


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


def encode_cursor(*position: str) -> str:
    raw = json.dumps(list(position)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CHANGED = "changed"  # the first part of a cursor into the changes (list_changes)


def decode_cursor(cursor: str, changes: bool = False) -> tuple[str, str]:
    """(received_at, id), or for `changes` (updated_at, id): a cursor of the other kind is as
    invalid as garbage, since its position means nothing in the other order."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = json.loads(raw)
        kind = [CHANGED] if changes else []
        if isinstance(position, list) and position[: len(kind)] == kind:
            at, evaluation_id = position[len(kind) :]
            if isinstance(at, str) and isinstance(evaluation_id, str):
                at.encode(), evaluation_id.encode()  # a lone surrogate cannot be bound
                return at, evaluation_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise BadRequest("cursor is not valid: pass next_cursor from the previous page unchanged")


# Equality filters in the order their indexes narrow best (client_ref: ~100 rows per value).
LEADS = ("client_ref", "failure_code", "task_type", "status", "passed")


def list_evaluations(
    conn: sqlite3.Connection,
    where: EvaluationFilter,
    limit: int,
    cursor: str | None = None,
    newest_first: bool = True,
) -> tuple[list[dict[str, Any]], str | None]:
    """By time received (newest first unless asked); `next_cursor` is None on the last page.
    With `changed_since`, the changes instead (list_changes).

    One index drives the walk: the text index's candidates when `q` has few, else the first
    equality filter in LEADS order (each is indexed with received_at, id and the other
    filters, so those are checked without reading rows), else received_at (search.FEW).
    """
    if where.changed_since is not None:
        return list_changes(conn, where, limit, cursor)
    position = decode_cursor(cursor) if cursor is not None else None
    if position is not None:
        # A bound the cursor already implies is dropped, or the planner may seek from it.
        if newest_first and where.until is not None and position[0] < where.until:
            where = replace(where, until=None)
        if not newest_first and where.since is not None and position[0] >= where.since:
            where = replace(where, since=None)
    sql, params = _where(conn, where, LEADS, "received_at")
    if position is not None:
        params["c_at"], params["c_id"] = position
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


def _where(
    conn: sqlite3.Connection, where: EvaluationFilter, leads: tuple[str, ...], otherwise: str
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause with one index to drive it: the text index's candidates when `q` has
    few, else the first of `leads` that is filtered on, else `otherwise`."""
    lead = next((name for name in leads if getattr(where, name) is not None), otherwise)
    found = search.candidates(conn, where.q, search.MANY) if where.q else None
    if found is not None and len(found) > search.MANY:
        found = None
    if found is not None and len(found) <= search.FEW:
        lead = "rowid"
    return where.where(candidates=found, lead=lead)


def list_changes(
    conn: sqlite3.Connection,
    where: EvaluationFilter,
    limit: int,
    cursor: str | None = None,
    *,
    flag: bool = False,
) -> tuple[list[dict[str, Any]], str | None]:
    """Evaluations written at or after `where.changed_since` (updated_at: the receiver's clock
    at the row's last write), oldest change first, each as it is now; `next_cursor` follows
    on, None on the last page. A row changed again moves to the end, so following the pages
    (or asking again from the newest updated_at seen) misses no change.

    The changes index drives, so a poll reads only what changed since; a client_ref (a few
    thousand rows at most) or few text candidates drive instead, and their rows are sorted.
    With `flag`, only the time bounds (since, until, changed_since) choose the rows and each
    item says in `matches` whether it passes the other filters: a live table learns that a
    row it shows no longer does.
    """
    assert where.changed_since is not None
    position = decode_cursor(cursor, changes=True) if cursor is not None else None
    if position is not None and position[0] >= where.changed_since:
        where = replace(where, changed_since=None)  # implied: the planner seeks from the cursor
    bounds = EvaluationFilter(
        since=where.since, until=where.until, changed_since=where.changed_since
    )
    sql, params = _where(conn, bounds if flag else where, ("client_ref",), "updated_at")
    selected = ITEM_COLUMNS
    if flag:  # tested on the few rows changed: LIKE alone, no text index searched first
        test, tested = replace(where, since=None, until=None, changed_since=None).where()
        matches = f"CASE WHEN {test.removeprefix(' WHERE ')} THEN 1 ELSE 0 END" if test else "1"
        selected += f", {matches} AS matches"
        params.update(tested)
    if position is not None:
        params["c_at"], params["c_id"] = position
        sql += (" AND " if sql else " WHERE ") + "(updated_at, id) > (:c_at, :c_id)"
    params["limit"] = limit + 1
    rows = conn.execute(
        f"SELECT {selected} FROM evaluations{sql} ORDER BY updated_at, id LIMIT :limit", params
    ).fetchall()
    items = [item(row) for row in rows[:limit]]
    for each in items if flag else ():
        each["matches"] = bool(each["matches"])
    if len(rows) <= limit:
        return items, None
    return items, encode_cursor(CHANGED, items[-1]["updated_at"], items[-1]["id"])


def has_evaluation(conn: sqlite3.Connection, evaluation_id: str) -> bool:
    found = conn.execute("SELECT 1 FROM evaluations WHERE id = ?", (evaluation_id,)).fetchone()
    return found is not None


def get_evaluation(conn: sqlite3.Connection, evaluation_id: str) -> dict[str, Any] | None:
    """The evaluation, its latest Runflow object, its issues, deliveries and forwards."""
    row = conn.execute(
        f"SELECT {ITEM_COLUMNS}, data, {REFETCH_COLUMNS} FROM evaluations WHERE id = ?",
        (evaluation_id,),
    ).fetchone()
    if row is None:
        return None
    evaluation = item(row)
    evaluation["runflow"] = json.loads(evaluation.pop("data"))
    state, attempts, next_at, error = (evaluation.pop(name) for name in REFETCH_KEYS)
    # Where the refetch stands (None: none is wanted), so one that fails is seen where users
    # look, not only in the worker's log and a metric.
    evaluation["refetch"] = (
        None
        if state is None
        else {"state": state, "attempts": attempts, "next_at": next_at, "error": error}
    )
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
