"""A client_ref's pointers (`client_refs`): its current and latest evaluation and how many it
has, recomputed whenever one of its evaluations changes."""

from __future__ import annotations

import sqlite3

from .dialect import is_postgres, serialize

_UPDATE_CLIENT_REF = (
    "ON CONFLICT (client_ref) DO UPDATE SET"
    " current_evaluation_id = excluded.current_evaluation_id,"
    " latest_evaluation_id = excluded.latest_evaluation_id,"
    " latest_status = excluded.latest_status, latest_passed = excluded.latest_passed,"
    " latest_score = excluded.latest_score, evaluations = excluded.evaluations,"
    " updated_at = excluded.updated_at"
)
# A client_ref's pointers in one statement (one round trip on PostgreSQL): current = its
# newest completed, not superseded evaluation (Runflow's own definition); latest = its newest
# verdict, else its newest evaluation; and how many it has. No row when it has none. A verdict
# without completed_at comes after every dated one (the newest received first), as a second
# choice of its own: `ORDER BY completed_at DESC NULLS LAST` matches no index there (a
# backward scan gives NULLS FIRST), so each refresh sorted every row of the client_ref, on a
# growing table without statistics through a worse plan: 6.7 times as long (session 15). A
# tie on completed_at goes to the later received (then the larger id) on both backends: the
# index gives ties in rowid order on SQLite, in no set order on PostgreSQL; the sort is of the
# tied rows only (PostgreSQL's incremental sort, SQLite's sorter for the right part).
_REFRESH_CLIENT_REF = f"""
INSERT INTO client_refs (client_ref, current_evaluation_id, latest_evaluation_id,
  latest_status, latest_passed, latest_score, evaluations, updated_at)
SELECT :ref,
  COALESCE(
    (SELECT id FROM evaluations WHERE client_ref = :ref AND status = 'completed'
     AND superseded = 0 AND completed_at IS NOT NULL
     ORDER BY completed_at DESC, received_at DESC, id DESC LIMIT 1),
    (SELECT id FROM evaluations WHERE client_ref = :ref AND status = 'completed'
     AND superseded = 0 AND completed_at IS NULL ORDER BY received_at DESC LIMIT 1)),
  latest.id, latest.status, latest.passed, latest.score, counted.n, :stamp
FROM (SELECT count(*) AS n FROM evaluations WHERE client_ref = :ref) AS counted
LEFT JOIN (
  SELECT id, status, passed, score FROM (
    SELECT * FROM (SELECT 0 AS rank, id, status, passed, score FROM evaluations
      WHERE client_ref = :ref AND status IN ('completed', 'failed')
      AND completed_at IS NOT NULL
      ORDER BY completed_at DESC, received_at DESC, id DESC LIMIT 1) AS dated
    UNION ALL
    SELECT * FROM (SELECT 1 AS rank, id, status, passed, score FROM evaluations
      WHERE client_ref = :ref AND status IN ('completed', 'failed')
      AND completed_at IS NULL ORDER BY received_at DESC LIMIT 1) AS undated
    UNION ALL
    SELECT * FROM (SELECT 2 AS rank, id, status, passed, score FROM evaluations
      WHERE client_ref = :ref ORDER BY received_at DESC LIMIT 1) AS newest
  ) AS candidates ORDER BY rank LIMIT 1
) AS latest ON TRUE
WHERE counted.n > 0
{_UPDATE_CLIENT_REF}
"""
_DROP_CLIENT_REF = (
    "DELETE FROM client_refs WHERE client_ref = :ref"
    " AND NOT EXISTS (SELECT 1 FROM evaluations WHERE client_ref = :ref)"
)


def refresh_client_ref(conn: sqlite3.Connection, client_ref: str, stamp: str) -> None:
    """Recompute a client_ref's pointers (dropping its row once it has no evaluation). On
    PostgreSQL in two statements whose answers nobody waits for (in a pipelined chunk, no
    round trip of their own); on SQLite, where a statement costs no round trip, in four
    simpler ones (the one statement is 6 % slower to apply there)."""
    serialize(conn, f"client_ref:{client_ref}")
    if is_postgres(conn):
        params = {"ref": client_ref, "stamp": stamp}
        conn.execute(_REFRESH_CLIENT_REF, params)
        conn.execute(_DROP_CLIENT_REF, params)
        return
    count = conn.execute(
        "SELECT count(*) FROM evaluations WHERE client_ref = ?", (client_ref,)
    ).fetchone()[0]
    if not count:
        conn.execute("DELETE FROM client_refs WHERE client_ref = ?", (client_ref,))
        return
    current = conn.execute(
        "SELECT id FROM evaluations WHERE client_ref = ? AND status = 'completed'"
        " AND superseded = 0 ORDER BY completed_at DESC NULLS LAST, received_at DESC, id DESC"
        " LIMIT 1",
        (client_ref,),
    ).fetchone()
    latest = (
        conn.execute(
            "SELECT id, status, passed, score FROM evaluations WHERE client_ref = ?"
            " AND status IN ('completed', 'failed')"
            " ORDER BY completed_at DESC NULLS LAST, received_at DESC, id DESC LIMIT 1",
            (client_ref,),
        ).fetchone()
        or conn.execute(
            "SELECT id, status, passed, score FROM evaluations WHERE client_ref = ?"
            " ORDER BY received_at DESC LIMIT 1",
            (client_ref,),
        ).fetchone()
    )
    conn.execute(
        "INSERT INTO client_refs (client_ref, current_evaluation_id, latest_evaluation_id,"
        " latest_status, latest_passed, latest_score, evaluations, updated_at)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?, ?) {_UPDATE_CLIENT_REF}",
        (client_ref, current[0] if current else None, *latest, count, stamp),
    )
