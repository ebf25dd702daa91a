"""An evaluation's attempts: its root (parents up) and every re-evaluation from there down."""

from __future__ import annotations

import sqlite3
from typing import Any

from .queries import ITEM_COLUMNS, item

MAX_DEPTH = 50


def lineage(conn: sqlite3.Connection, evaluation_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "WITH RECURSIVE"
        " up(id, parent, depth) AS ("
        "  SELECT id, parent_evaluation_id, 0 FROM evaluations WHERE id = :id"
        "  UNION ALL SELECT e.id, e.parent_evaluation_id, up.depth + 1"
        "  FROM evaluations e JOIN up ON e.id = up.parent WHERE up.depth < :max),"
        " root(id) AS (SELECT id FROM up ORDER BY depth DESC LIMIT 1),"
        " down(id, depth) AS ("
        "  SELECT id, 0 FROM root"
        "  UNION ALL SELECT e.id, down.depth + 1"
        "  FROM evaluations e JOIN down ON e.parent_evaluation_id = down.id"
        "  WHERE down.depth < :max)"
        f" SELECT {ITEM_COLUMNS} FROM evaluations WHERE id IN (SELECT id FROM down)"
        " ORDER BY attempt_number NULLS FIRST, received_at",  # SQLite's order, on PostgreSQL too
        {"id": evaluation_id, "max": MAX_DEPTH},
    ).fetchall()
    return [item(row) for row in rows]
