"""The overview numbers (GET /api/stats, `receiver stats`, the dashboard).

Every figure is an aggregate over "facts": per-day rows of the rollup tables where the filter
allows, evaluation rows where it does not. Both kinds have the same columns and go through the
same aggregate queries, so an answer from rollups equals a scan of the rows.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Any

from . import search
from .filters import EvaluationFilter

STORED_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
MIDNIGHT = "T00:00:00.000000Z"

# The facts of each kind: columns, then a SELECT from the rollups and one from the rows.
FACTS = {
    "daily": (
        "day, task_type, status, passed, failure_code, score_bucket, count, score_sum",
        "SELECT day, task_type, status, passed, failure_code, score_bucket, count, score_sum"
        " FROM rollup_daily{where}",
        "SELECT substr(coalesce(e.completed_at, e.received_at), 1, 10), e.task_type, e.status,"
        " e.passed, e.failure_code, min(CAST(e.score * 10 AS INTEGER), 9), 1, e.score"
        " FROM evaluations e{where}",
    ),
    "categories": (
        "category, subcategory, count",
        "SELECT category, subcategory, count FROM rollup_issue_categories{where}",
        "SELECT i.category, i.subcategory, 1 FROM issues i"
        " JOIN evaluations e ON e.id = i.evaluation_id{where}",
    ),
    "labels": (
        "label, count",
        "SELECT label, count FROM rollup_issue_labels{where}",
        "SELECT j.value, 1 FROM evaluations e, json_each(e.top_issues) j{where}",
    ),
}


def _sum_if(condition: str) -> str:
    return f"sum(CASE WHEN {condition} THEN count ELSE 0 END)"


FAILED = "status = 'failed'"
VERDICT = (
    f"sum(count) AS total, {_sum_if('passed = 1')} AS passed,"
    f" {_sum_if('passed = 0')} AS not_passed, {_sum_if(FAILED)} AS failed,"
    f" round(1.0 * {_sum_if('passed = 1')}"
    f" / nullif({_sum_if('passed IS NOT NULL')}, 0), 4) AS pass_rate,"
    f" round(total(score_sum) / nullif({_sum_if('score_bucket IS NOT NULL')}, 0), 4)"
    " AS mean_score"
)


@dataclass(frozen=True)
class Plan:
    """Where the facts come from: rollup rows of `received_day` in [first_day, end_day) (None:
    open; no rollups at all when `rollups` is False) plus evaluation rows per (clause, params)."""

    rollups: bool
    first_day: str | None
    end_day: str | None
    rows: tuple[tuple[str, dict[str, Any]], ...]


def _day_after(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def plan(where: EvaluationFilter, exact: bool = False, candidates: list[int] | None = None) -> Plan:
    """Rollups answer filters on status, passed, task_type and failure_code, and whole days of
    since/until; the rest of a partial first or last day comes from the rows (indexed by
    received_at: at most two days of them). client_ref and q, or a bound not in the stored
    time form, need the rows (an indexed scan: client_ref, q's text index; else all rows)."""
    scan = Plan(False, None, None, (where.where("e", candidates=candidates),))
    since, until = where.since, where.until
    bounds = [bound for bound in (since, until) if bound is not None]
    if exact or where.client_ref is not None or where.q:
        return scan
    if not all(STORED_TIME.fullmatch(bound) for bound in bounds):
        return scan
    first = None if since is None else since[:10]
    if since is not None and not since.endswith(MIDNIGHT):
        try:
            first = _day_after(since[:10])
        except (ValueError, OverflowError):
            return scan
    end = None if until is None else until[:10]
    if first is not None and end is not None and first >= end:
        return scan  # within one or two partial days: their rows
    dims = replace(where, since=None, until=None)
    edges = []
    if since is not None and first is not None and not since.endswith(MIDNIGHT):
        edges.append((since, first + MIDNIGHT))
    if until is not None and end is not None and not until.endswith(MIDNIGHT):
        edges.append((end + MIDNIGHT, until))
    rows = []
    for n, (low, high) in enumerate(edges):
        clause, params = dims.where("e")
        clause += f"{' AND' if clause else ' WHERE'} e.received_at >= :low{n}"
        clause += f" AND e.received_at < :high{n}"
        rows.append((clause, {**params, f"low{n}": low, f"high{n}": high}))
    return Plan(True, first, end, tuple(rows))


def _facts(kind: str, chosen: Plan, where: EvaluationFilter) -> tuple[str, dict[str, Any]]:
    """`WITH facts(…) AS (…)` for one kind of facts, and its parameters."""
    columns, from_rollups, from_rows = FACTS[kind]
    arms = []
    params: dict[str, Any] = {}
    if chosen.rollups:
        clause, params = replace(where, since=None, until=None).where()
        if chosen.first_day is not None:
            clause += f"{' AND' if clause else ' WHERE'} received_day >= :first_day"
            params["first_day"] = chosen.first_day
        if chosen.end_day is not None:
            clause += f"{' AND' if clause else ' WHERE'} received_day < :end_day"
            params["end_day"] = chosen.end_day
        arms.append(from_rollups.format(where=clause))
    for clause, clause_params in chosen.rows:
        arms.append(from_rows.format(where=clause))
        params.update(clause_params)
    return f"WITH facts({columns}) AS ({' UNION ALL '.join(arms)}) ", params


def _all(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def stats(
    conn: sqlite3.Connection, where: EvaluationFilter, *, exact: bool = False
) -> dict[str, Any]:
    """Counts, pass rate, score distribution, top issues, per day and per task type.

    See `plan` for which filters the rollups answer; `exact` forces the scan of the rows
    (same output: for tests, benchmarks and checking the rollups).
    """
    found = search.candidates(conn, where.q) if where.q else None
    chosen = plan(where, exact, found)
    daily, params = _facts("daily", chosen, where)

    def grouped(kind: str, select: str, group: str, order: str, limit: int) -> list[Any]:
        facts, kind_params = (daily, params) if kind == "daily" else _facts(kind, chosen, where)
        return _all(
            conn,
            f"{facts}SELECT {select} FROM facts GROUP BY {group} ORDER BY {order} LIMIT {limit}",
            kind_params,
        )

    total, passed, not_passed, mean = conn.execute(
        f"{daily}SELECT coalesce(sum(count), 0), sum(CASE WHEN passed = 1 THEN count END),"
        " sum(CASE WHEN passed = 0 THEN count END),"
        " total(score_sum) / sum(CASE WHEN score_bucket IS NOT NULL THEN count END) FROM facts",
        params,
    ).fetchone()
    by_status = conn.execute(
        f"{daily}SELECT coalesce(status, 'unknown'), sum(count) FROM facts GROUP BY 1", params
    ).fetchall()
    buckets = dict(
        conn.execute(
            f"{daily}SELECT score_bucket, sum(count) FROM facts"
            " WHERE score_bucket IS NOT NULL GROUP BY 1",
            params,
        ).fetchall()
    )
    passed, not_passed = passed or 0, not_passed or 0
    rated = passed + not_passed
    return {
        "total": total,
        "by_status": dict(by_status),
        "passed": passed,
        "not_passed": not_passed,
        "pass_rate": round(passed / rated, 4) if rated else None,
        "mean_score": None if mean is None else round(mean, 4),
        "score_distribution": [
            {"from": i / 10, "to": (i + 1) / 10, "count": buckets.get(i, 0)} for i in range(10)
        ],
        "failure_codes": grouped(
            "daily",
            "failure_code, sum(count) AS count",
            "failure_code HAVING failure_code IS NOT NULL",
            "count DESC, failure_code",
            20,
        ),
        "top_issue_categories": grouped(
            "categories",
            "category, subcategory, sum(count) AS count",
            "category, subcategory",
            "count DESC, category NULLS FIRST, subcategory NULLS FIRST",  # as SQLite, everywhere
            20,
        ),
        "top_issues": grouped(
            "labels", "label, sum(count) AS count", "label", "count DESC, label", 20
        ),
        "per_day": grouped("daily", f"day, {VERDICT}", "day", "day DESC", 90),
        "per_task_type": grouped(
            "daily", f"task_type, {VERDICT}", "task_type", "total DESC, task_type NULLS FIRST", 20
        ),
    }
