"""Text search (`q`): a trigram FTS5 index over the searched columns finds candidate rows, so a
rare substring no longer means LIKE over every row; LIKE still decides (exact semantics).

`evaluations_fts` is an external-content table over `evaluations` keyed by its rowid, kept in
step by the ingest transaction (`reindex`). VACUUM may renumber the rowids of a table without
an INTEGER PRIMARY KEY: after one, `rebuild` the index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlite_utils import Database

from .dialect import is_postgres

# top_issues is searched as issue_text, its labels one per line: in its JSON text `[` or `","`
# matched every row and a label's `"` or `\\` was never found as typed (migration 11).
SEARCHED = ("id", "client_ref", "task_type", "failure_code", "issue_text")
TABLE = "evaluations_fts"
# How a list page uses the candidates: up to FEW it fetches them and sorts; up to MANY it walks
# its usual index in time order and skips rows that are not candidates without reading them;
# beyond, matches are so common that a walk testing LIKE on each row fills a page early.
FEW = 5000
MANY = 20000

# The candidates go in as one JSON array: the index is searched once per request, however many
# statements (the overview runs eight) use them.
CANDIDATES = "rowid IN (SELECT value FROM json_each(:candidates))"


def issue_text(labels: Sequence[str]) -> str | None:
    """The issue labels as searched: one per line (a `q` with a line break may span two)."""
    return "\n".join(labels) or None


def create(db: Database, columns: Sequence[str] = SEARCHED) -> None:
    db.execute(
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5({', '.join(columns)},"
        " content='evaluations', content_rowid='rowid', tokenize='trigram', columnsize=0)"
    )


def rebuild(conn: sqlite3.Connection) -> None:
    """Index every row again (after the migration adds the table, bulk loads or a VACUUM)."""
    conn.execute(f"INSERT INTO {TABLE}({TABLE}) VALUES ('rebuild')")


def reindex(
    conn: sqlite3.Connection,
    rowid: int,
    before: Sequence[Any] | None,
    after: Sequence[Any] | None,
) -> None:
    """Replace the row's entry when a searched column changed (values in SEARCHED order;
    None: no entry before, or none after). PostgreSQL's trigram indexes follow by themselves."""
    if is_postgres(conn):
        return
    if before is not None and after is not None and tuple(before) == tuple(after):
        return
    names = ", ".join(SEARCHED)
    marks = ", ".join("?" * len(SEARCHED))
    if before is not None:
        conn.execute(
            f"INSERT INTO {TABLE}({TABLE}, rowid, {names}) VALUES ('delete', ?, {marks})",
            (rowid, *before),
        )
    if after is not None:
        conn.execute(f"INSERT INTO {TABLE}(rowid, {names}) VALUES (?, {marks})", (rowid, *after))


def forget(conn: sqlite3.Connection, evaluation_ids: Sequence[str]) -> None:
    """Drop the entries of rows about to be deleted (with the values they were indexed by)."""
    if is_postgres(conn):
        return
    marks = ", ".join("?" * len(evaluation_ids))
    rows = conn.execute(
        f"SELECT rowid, {', '.join(SEARCHED)} FROM evaluations WHERE id IN ({marks})",
        evaluation_ids,
    ).fetchall()
    for rowid, *values in rows:
        reindex(conn, rowid, values, None)


def phrase(text: str | None) -> str | None:
    """The FTS5 query matching `text` anywhere (a trigram phrase), or None when the index
    cannot help: under three characters there is no trigram to look up, and FTS5 reads its
    query as a C string (a NUL would end it)."""
    if not text or len(text) < 3 or "\x00" in text:
        return None
    return '"' + text.replace('"', '""') + '"'


def candidates(
    conn: sqlite3.Connection, text: str | None, limit: int | None = None
) -> list[int] | None:
    """Rowids of the rows whose searched columns may contain `text` (a superset of LIKE's
    matches), at most `limit` + 1 of them; None when the index cannot help, and always on
    PostgreSQL, whose trigram indexes serve the ILIKE itself."""
    query = None if is_postgres(conn) else phrase(text)
    if query is None:
        return None
    sql = f"SELECT rowid FROM {TABLE} WHERE {TABLE} MATCH ?"
    rows = conn.execute(
        sql if limit is None else f"{sql} LIMIT {int(limit) + 1}", (query,)
    ).fetchall()
    return [row[0] for row in rows]
