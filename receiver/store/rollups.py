"""Rollups: small per-day count tables the overview reads instead of every evaluation.

Each table is keyed by the dimensions the overview filters on (`received_day`, `task_type`,
`status`, `passed`, `failure_code`) plus what it counts. The ingest transaction moves an
evaluation's contribution whenever a rolled-up column changes, so the tables always equal a
GROUP BY over the rows; a migration backfills them from existing rows (`rebuild`).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, NamedTuple

from sqlite_utils import Database

from . import search

DIMS = ("received_day", "task_type", "status", "passed", "failure_code")

# table: (key columns after DIMS, measures); every table counts in `count`.
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rollup_daily": (("day", "score_bucket"), ("count", "score_sum")),
    "rollup_issue_categories": (("category", "subcategory"), ("count",)),
    "rollup_issue_labels": (("label",), ("count",)),
}
TYPES = {"passed": int, "score_bucket": int, "count": int, "score_sum": float}
NOT_NULL = {"received_day", "day", "label", "count", "score_sum"}

# NULLs are never equal in a unique index, so nullable key columns are indexed through
# coalesce() with a value they never hold: ingest stores empty strings as NULL, a bucket is <= 9.
NULL_AS = {
    "task_type": "''",
    "status": "''",
    "passed": "-1",
    "failure_code": "''",
    "score_bucket": "10",
    "category": "''",
    "subcategory": "''",
}

# The backfill: the same rows GROUP BY, columns in key order (DIMS first).
SOURCES = {
    "rollup_daily": (
        "SELECT substr(received_at, 1, 10), task_type, status, passed, failure_code,"
        " substr(coalesce(completed_at, received_at), 1, 10),"
        " min(CAST(score * 10 AS INTEGER), 9), count(*), total(score)"
        " FROM evaluations GROUP BY 1, 2, 3, 4, 5, 6, 7"
    ),
    "rollup_issue_categories": (
        "SELECT substr(e.received_at, 1, 10), e.task_type, e.status, e.passed, e.failure_code,"
        " i.category, i.subcategory, count(*)"
        " FROM issues i JOIN evaluations e ON e.id = i.evaluation_id GROUP BY 1, 2, 3, 4, 5, 6, 7"
    ),
    "rollup_issue_labels": (
        "SELECT substr(e.received_at, 1, 10), e.task_type, e.status, e.passed, e.failure_code,"
        " j.value, count(*) FROM evaluations e, json_each(e.top_issues) j"
        " WHERE j.value IS NOT NULL GROUP BY 1, 2, 3, 4, 5, 6"
    ),
}

Key = tuple[str | int | None, ...]
Issue = tuple[str | None, str | None]  # (category, subcategory)

# The columns of an evaluation row that the rollups count (what ingest reads before a change).
FACT_COLUMNS = (
    "received_at, completed_at, task_type, status, passed, score, failure_code, top_issues"
)
_FROM_COLUMNS = FACT_COLUMNS.split(", ")[1:]


def _columns(table: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    extra, measures = TABLES[table]
    return (*DIMS, *extra), measures


def _conflict_target(table: str) -> str:
    keys, _ = _columns(table)
    return ", ".join(f"coalesce({k}, {NULL_AS[k]})" if k in NULL_AS else k for k in keys)


def create(db: Database) -> None:
    """The rollup tables (plain rowid tables, readable in Datasette) and their unique keys."""
    for table in TABLES:
        keys, measures = _columns(table)
        db.table(table).create(
            {name: TYPES.get(name, str) for name in (*keys, *measures)},
            not_null={name for name in (*keys, *measures) if name in NOT_NULL},
            if_not_exists=True,
        )
        db.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS {table}_key ON {table} ({_conflict_target(table)})"
        )


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute every rollup from the rows (the migration's backfill; also after bulk loads)."""
    for table, source in SOURCES.items():
        keys, measures = _columns(table)
        conn.execute(f"DELETE FROM {table}")
        conn.execute(f"INSERT INTO {table} ({', '.join((*keys, *measures))}) {source}")


def score_bucket(score: float | None) -> int | None:
    """`min(CAST(score * 10 AS INTEGER), 9)` exactly as SQLite computes it (truncation,
    saturating at the 64-bit limits), so a Python-made key meets the backfill's."""
    if score is None:
        return None
    scaled = score * 10
    if scaled >= 9:
        return 9
    if scaled <= -(2.0**63) or math.isinf(scaled):
        return -(2**63)
    return int(scaled)


class Facts(NamedTuple):
    """The rolled-up columns of one evaluation row (a tuple: cheap to build and compare)."""

    received_at: str
    completed_at: str | None
    task_type: str | None
    status: str | None
    passed: int | None
    score: float | None
    failure_code: str | None
    top_issues: str | None  # the stored JSON text: compared as is, parsed only when counted

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Facts:
        """From columns in FACT_COLUMNS order (a row of evaluations, or the values to store)."""
        return cls(*row)

    @classmethod
    def from_columns(cls, received_at: str, values: Mapping[str, Any]) -> Facts:
        """From the values an evaluation row is about to be written with."""
        return cls(received_at, *(values[name] for name in _FROM_COLUMNS))

    @property
    def dims(self) -> Key:
        return (self.received_at[:10], self.task_type, self.status, self.passed, self.failure_code)

    def rows(self, issues: list[Issue], only_issues: bool) -> list[tuple[str, Key, float]]:
        """(table, key, score) of every rollup row this evaluation counts in."""
        dims = self.dims
        found = [("rollup_issue_categories", (*dims, *issue), 0.0) for issue in issues]
        if only_issues:
            return found
        day = (self.completed_at or self.received_at)[:10]
        score = 0.0 if self.score is None else self.score
        found.append(("rollup_daily", (*dims, day, score_bucket(self.score)), score))
        labels = json.loads(self.top_issues) if self.top_issues else ()
        found += [
            ("rollup_issue_labels", (*dims, label), 0.0)
            for label in labels
            if isinstance(label, str)
        ]
        return found


@cache
def _upsert(table: str, returning: bool) -> str:
    keys, measures = _columns(table)
    names = (*keys, *measures)
    sets = ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in measures)
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        f" ON CONFLICT ({_conflict_target(table)}) DO UPDATE SET {sets}"
        + (" RETURNING rowid, count" if returning else "")
    )


Changes = dict[tuple[str, Key], list[float]]  # (table, key) -> [count, score_sum] to add


def _count(changes: Changes, sign: int, facts: Facts, issues: list[Issue], only: bool) -> None:
    for table, key, score in facts.rows(issues, only):
        change = changes.setdefault((table, key), [0, 0.0])
        change[0] += sign
        change[1] += sign * score


def add(into: Changes, changes: Changes) -> None:
    """Fold `changes` into `into` (the net changes of several evaluations)."""
    for key, (count, score_sum) in changes.items():
        change = into.setdefault(key, [0, 0.0])
        change[0] += count
        change[1] += score_sum


def write(conn: sqlite3.Connection, changes: Changes) -> None:
    """Add the net changes; a row whose count drops to zero is deleted."""
    for (table, key), (count, score_sum) in changes.items():
        if not count and not score_sum:
            continue
        measures = (int(count), score_sum) if table == "rollup_daily" else (int(count),)
        if count >= 0:
            conn.execute(_upsert(table, False), (*key, *measures))
            continue
        rowid, total = conn.execute(_upsert(table, True), (*key, *measures)).fetchone()
        if total <= 0:
            conn.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))


def track(
    conn: sqlite3.Connection,
    evaluation_id: str,
    before: Facts | None,
    after: Facts,
    issues: tuple[list[Issue], list[Issue]] | None = None,
    changes: Changes | None = None,
) -> None:
    """Move one evaluation's contribution from `before` (None: a new row) to `after`.

    `issues` is (old, new) when its issue rows were just replaced; otherwise they are read
    only if the dimensions they are counted under changed. Only rows whose count or score
    sum changes are written. Given `changes`, the moves are added there instead, for the
    caller to `write` once for many evaluations (most of a chunk shares its rollup rows).
    """
    if before == after and issues is None:
        return
    if issues is None:
        kept: list[Issue] = []
        if before is not None and before.dims != after.dims:
            kept = conn.execute(
                "SELECT category, subcategory FROM issues WHERE evaluation_id = ?",
                (evaluation_id,),
            ).fetchall()
        issues = (kept, kept)
    only_issues = before == after  # then only the issue rows were replaced
    mine: Changes = {} if changes is None else changes
    if before is not None:
        _count(mine, -1, before, issues[0], only_issues)
    _count(mine, 1, after, issues[1], only_issues)
    if changes is None:
        write(conn, mine)


def forget(conn: sqlite3.Connection, evaluation_ids: Sequence[str]) -> None:
    """Take evaluations out of the rollups and the text index: call it in the transaction
    that deletes their rows (retention), before the DELETE."""
    marks = ", ".join("?" * len(evaluation_ids))
    issues: dict[str, list[Issue]] = {}
    for evaluation_id, category, subcategory in conn.execute(
        f"SELECT evaluation_id, category, subcategory FROM issues WHERE evaluation_id IN ({marks})",
        evaluation_ids,
    ):
        issues.setdefault(evaluation_id, []).append((category, subcategory))
    changes: Changes = {}
    for evaluation_id, *columns in conn.execute(
        f"SELECT id, {FACT_COLUMNS} FROM evaluations WHERE id IN ({marks})", evaluation_ids
    ):
        _count(changes, -1, Facts.from_row(columns), issues.get(evaluation_id, []), False)
    write(conn, changes)
    search.forget(conn, evaluation_ids)
