"""Operator tasks on the database: an online, consistent backup; retention (prune)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

from ..errors import BadRequest
from ..times import now
from . import rollups
from .client_refs import refresh_client_ref
from .dialect import is_postgres, serialize


def backup(source: str, target: Path) -> dict[str, int]:
    """Copy the live database with SQLite's backup API: one consistent snapshot while the
    receiver keeps writing (WAL readers never block the writer). The copy is checked before
    it is reported. Returns row counts of the copy."""
    if target.exists():
        raise BadRequest(f"{target} exists; choose a new path (a backup never overwrites)")
    partial = target.with_name(target.name + ".partial")
    try:  # a path that cannot be written is the user's to change: one line, no traceback
        target.parent.mkdir(parents=True, exist_ok=True)
        dst = sqlite3.connect(partial)
    except (OSError, sqlite3.Error) as exc:
        raise BadRequest(f"cannot write {target}: {exc}") from None
    try:
        # A URI: `?`, `#` and `%` in the path are its syntax unless quoted (a folder `x#y` made
        # the backup read a new empty file `x`).
        src = sqlite3.connect(f"file:{quote(source)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        dst.close()
        partial.unlink(missing_ok=True)
        raise BadRequest(f"cannot read {source}: {exc}") from None
    try:
        src.backup(dst, pages=0)
        dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
        if verdict != "ok":
            raise BadRequest(f"the backup failed its integrity check: {verdict}")
        counts = {
            table: dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("evaluations", "deliveries", "outbox")
        }
    except sqlite3.Error as exc:  # not a database, or not receiver's: one line
        partial.unlink(missing_ok=True)
        raise BadRequest(f"cannot back up {source}: {exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        dst.close()
        src.close()
    partial.rename(target)
    return counts


def prune_batch(conn: sqlite3.Connection, cutoff: str, limit: int) -> dict[str, int]:
    """Delete up to `limit` evaluations last touched before `cutoff` with everything that
    belongs to them, never one that still has work to do: a callback acknowledged but not yet
    applied (its delivery would go with the others, and the verdict with it), a pending
    forward, a pending refetch, or a reconciliation poll scheduled. Their client_refs are
    recomputed."""
    doomed = _prunable(conn, cutoff, limit)
    if doomed and is_postgres(conn):  # other servers write meanwhile: lock, as applying does,
        serialize(conn, *(f"evaluation:{evaluation_id}" for evaluation_id in sorted(doomed)))
        doomed = _prunable(conn, cutoff, limit, among=doomed)  # then look again
    counts = {"evaluations": len(doomed), "deliveries": 0, "forwards": 0}
    if not doomed:
        return counts
    marks = ", ".join("?" * len(doomed))
    # A forward made pending since the look (a retry from another process, on PostgreSQL) is
    # not deleted, and keeps its evaluation: it is to be sent.
    counts["forwards"] = conn.execute(
        f"DELETE FROM outbox WHERE evaluation_id IN ({marks}) AND state <> 'pending'", doomed
    ).rowcount
    sending = {
        row[0]
        for row in conn.execute(
            f"SELECT DISTINCT evaluation_id FROM outbox WHERE evaluation_id IN ({marks})", doomed
        )
    }
    if sending:
        doomed = [evaluation_id for evaluation_id in doomed if evaluation_id not in sending]
        counts["evaluations"] = len(doomed)
        if not doomed:
            return counts
        marks = ", ".join("?" * len(doomed))
    refs = {
        row[0]
        for row in conn.execute(
            f"SELECT DISTINCT client_ref FROM evaluations WHERE id IN ({marks})"
            " AND client_ref IS NOT NULL",
            doomed,
        )
    }
    rollups.forget(conn, doomed)  # statistics and the text index follow the rows
    counts["deliveries"] = conn.execute(  # not one acknowledged since (it stays, and applies)
        f"DELETE FROM deliveries WHERE evaluation_id IN ({marks})"
        " AND id NOT IN (SELECT delivery_id FROM apply_queue)",
        doomed,
    ).rowcount
    conn.execute(f"DELETE FROM issues WHERE evaluation_id IN ({marks})", doomed)
    conn.execute(f"DELETE FROM evaluations WHERE id IN ({marks})", doomed)
    stamp = now()
    for client_ref in refs:
        refresh_client_ref(conn, client_ref, stamp)
    return counts


# The evaluations last touched before the cutoff (the one parameter) with no work left.
PRUNABLE = (
    "SELECT id FROM evaluations e WHERE updated_at < ?"
    " AND next_poll_at IS NULL AND refetch_state IS NOT 'pending'"
    " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.evaluation_id = e.id"
    "  AND o.state = 'pending')"
    " AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN apply_queue q"
    "  ON q.delivery_id = d.id WHERE d.evaluation_id = e.id)"
)


def _prunable(
    conn: sqlite3.Connection, cutoff: str, limit: int, among: list[str] | None = None
) -> list[str]:
    only = "" if among is None else f" AND id IN ({', '.join('?' * len(among))})"
    return [
        row[0]
        for row in conn.execute(
            f"{PRUNABLE}{only} LIMIT ?",
            (cutoff, *(among or ()), limit),
        )
    ]


def prune_counts(conn: sqlite3.Connection, cutoff: str) -> dict[str, int]:
    """What a prune at `cutoff` would delete now, counted as prune_batch and prune_loose
    count it, deleting nothing (`receiver prune --dry-run`)."""
    queries = {
        "evaluations": (f"SELECT count(*) FROM ({PRUNABLE}) doomed", (cutoff,)),
        "deliveries": (
            f"SELECT count(*) FROM deliveries WHERE (evaluation_id IN ({PRUNABLE})"
            " AND id NOT IN (SELECT delivery_id FROM apply_queue))"
            " OR (evaluation_id IS NULL AND last_received_at < ?)",
            (cutoff, cutoff),
        ),
        "forwards": (
            f"SELECT count(*) FROM outbox WHERE evaluation_id IN ({PRUNABLE})",
            (cutoff,),
        ),
        "quarantine": ("SELECT count(*) FROM quarantine WHERE received_at < ?", (cutoff,)),
    }
    return {
        name: int(conn.execute(sql, params).fetchone()[0])
        for name, (sql, params) in queries.items()
    }


def prune_loose(conn: sqlite3.Connection, cutoff: str) -> dict[str, int]:
    """Deliveries that belong to no evaluation (run callbacks) and quarantined bodies."""
    return {
        "deliveries": conn.execute(
            "DELETE FROM deliveries WHERE evaluation_id IS NULL AND last_received_at < ?",
            (cutoff,),
        ).rowcount,
        "quarantine": conn.execute(
            "DELETE FROM quarantine WHERE received_at < ?", (cutoff,)
        ).rowcount,
    }
