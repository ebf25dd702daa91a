"""Numbered migrations. Each runs once, in order, inside one IMMEDIATE transaction."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlite_utils import Database

from ..errors import ConfigError
from ..normalize import TERMINAL, VERDICT_ONLY, merge, stored_fields
from ..times import now
from . import rollups, search
from .apply import NO_FORWARDING, Forwarding, apply_evaluation, dumps, read_stored
from .client_refs import refresh_client_ref
from .dialect import pipelined

log = logging.getLogger("receiver.store")

# One unique key in arrival order: Runflow's ids are UUIDv7 (time-ordered), so a new delivery's
# entry lands beside the last ones instead of on a random leaf of a sha256 index, and each ack
# writes a page or two of index instead of one per callback. Same bytes, same id: the key still
# refuses exactly the bodies sha256 alone did. Run callbacks carry no evaluation id and keep
# a sha256 key of their own. The key also serves the lookups by evaluation id.
DELIVERY_KEY = (
    "CREATE UNIQUE INDEX idx_deliveries_evaluation_id_sha256 ON deliveries (evaluation_id, sha256)",
    "CREATE UNIQUE INDEX idx_deliveries_run_sha256 ON deliveries (sha256)"
    " WHERE evaluation_id IS NULL",
    "DROP INDEX idx_deliveries_sha256",
    "DROP INDEX idx_deliveries_evaluation_id",
)


def _v1_core(db: Database) -> None:
    db.table("deliveries").create(
        {
            "id": int,
            "received_at": str,
            "last_received_at": str,
            "receipts": int,
            "source": str,
            "request_id": str,
            "secret_index": int,
            "sha256": str,
            "kind": str,
            "event": str,
            "evaluation_id": str,
            "outcome": str,
            "headers": str,
            "body": bytes,
        },
        pk="id",
        not_null={"received_at", "sha256", "kind", "outcome", "body", "source", "receipts"},
    )
    db.table("deliveries").create_index(["sha256"], unique=True)
    db.table("deliveries").create_index(["evaluation_id"])
    db.table("deliveries").create_index(["received_at"])

    db.table("evaluations").create(
        {
            "id": str,
            "client_ref": str,
            "status": str,
            "event": str,
            "passed": int,
            "score": float,
            "task_type": str,
            "failure_code": str,
            "top_issues": str,
            "attempt_number": int,
            "parent_evaluation_id": str,
            "superseded": int,
            "superseded_at": str,
            "created_at": str,
            "completed_at": str,
            "received_at": str,
            "updated_at": str,
            "run_id": str,
            "image_url": str,
            "refetched": int,
            "feedback_is_positive": int,
            "feedback_reason": str,
            "source": str,
            "data": str,
        },
        pk="id",
        not_null={"received_at", "updated_at", "superseded", "refetched", "data"},
        defaults={"superseded": 0, "refetched": 0},
    )
    for column in ("client_ref", "status", "task_type", "failure_code", "passed"):
        db.table("evaluations").create_index([column, "received_at"])
    db.table("evaluations").create_index(["received_at", "id"])
    db.table("evaluations").create_index(["completed_at"])
    db.table("evaluations").create_index(["parent_evaluation_id"])

    db.table("issues").create(
        {
            "id": int,
            "evaluation_id": str,
            "judge": str,
            "category": str,
            "subcategory": str,
            "detail": str,
        },
        pk="id",
        not_null={"evaluation_id"},
    )
    db.table("issues").create_index(["evaluation_id"])
    db.table("issues").create_index(["category", "subcategory"])

    db.table("client_refs").create(
        {
            "client_ref": str,
            "current_evaluation_id": str,
            "latest_evaluation_id": str,
            "latest_status": str,
            "latest_passed": int,
            "latest_score": float,
            "evaluations": int,
            "updated_at": str,
        },
        pk="client_ref",
        not_null={"evaluations", "updated_at"},
    )

    db.table("outbox").create(
        {
            "id": int,
            "event_id": str,
            "sink": str,
            "evaluation_id": str,
            "delivery_id": int,
            "event_type": str,
            "state": str,
            "attempts": int,
            "next_attempt_at": str,
            "last_error": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"event_id", "sink", "state", "attempts", "created_at"},
        defaults={"state": "pending", "attempts": 0},
    )
    db.table("outbox").create_index(["sink", "event_id"], unique=True)
    db.table("outbox").create_index(["state", "next_attempt_at"])
    db.table("outbox").create_index(["evaluation_id"])

    db.table("quarantine").create(
        {
            "id": int,
            "received_at": str,
            "request_id": str,
            "reason": str,
            "sha256": str,
            "headers": str,
            "body": bytes,
        },
        pk="id",
        not_null={"received_at", "reason", "sha256", "body"},
    )
    db.table("quarantine").create_index(["received_at"])


def _v2_forwarding(db: Database) -> None:
    evaluations = db.table("evaluations")
    evaluations.add_column("refetch_state", str)  # NULL (not wanted) | pending | done | failed
    evaluations.add_column("refetch_attempts", int, not_null_default=0)
    evaluations.add_column("refetch_next_at", str)
    evaluations.add_column("refetch_error", str)
    evaluations.create_index(["refetch_state", "refetch_next_at"])
    db.table("outbox").create_index(["sink", "state", "next_attempt_at"])


def _v3_reconcile(db: Database) -> None:
    evaluations = db.table("evaluations")
    evaluations.add_column("next_poll_at", str)  # set while not terminal; NULL once it is
    evaluations.add_column("poll_attempts", int, not_null_default=0)
    evaluations.add_column("poll_error", str)
    evaluations.create_index(["next_poll_at"])


def _v4_client_ref_indexes(db: Database) -> None:
    """Keep client_ref upkeep O(log n): without these the planner walks the status index."""
    evaluations = db.table("evaluations")
    evaluations.create_index(["client_ref", "status", "superseded", "completed_at"])
    evaluations.create_index(["client_ref", "completed_at"])


def _v5_rollups(db: Database) -> None:
    """Per-day rollups for the overview, backfilled from the rows already stored."""
    rollups.create(db)
    rollups.rebuild(db.conn)


def _v6_list_indexes(db: Database) -> None:
    """List pages in O(page) at any size: each filter's index also holds received_at and id
    (the order and the cursor) and the other filters, which are then checked without reading
    rows. They replace v1's (column, received_at) indexes; failure_code's skips NULLs (most)."""
    others = ("status", "passed", "task_type", "failure_code")
    for lead in ("client_ref", *others):
        columns = ", ".join([lead, "received_at", "id", *(c for c in others if c != lead)])
        partial = " WHERE failure_code IS NOT NULL" if lead == "failure_code" else ""
        db.execute(
            f"CREATE INDEX IF NOT EXISTS idx_evaluations_{lead}_list"
            f" ON evaluations ({columns}){partial}"
        )
        db.execute(f"DROP INDEX IF EXISTS idx_evaluations_{lead}_received_at")


def _v7_search(db: Database) -> None:
    """A trigram index for `q`, filled from the rows already stored (the labels as JSON then)."""
    search.create(db, (*search.SEARCHED[:-1], "top_issues"))
    search.rebuild(db.conn)


def _v8_apply_queue(db: Database) -> None:
    """Accepted deliveries not yet applied (ingest.accept; apply.apply_queued)."""
    db.execute("CREATE TABLE apply_queue (delivery_id INTEGER PRIMARY KEY)")


def _v9_delivery_key(db: Database) -> None:
    """Deduplicate on (evaluation_id, sha256) instead of sha256 alone (DELIVERY_KEY)."""
    for statement in DELIVERY_KEY:
        db.execute(statement)


# Rows that later code writes otherwise, made as it would: an evaluation stuck before migration
# 3 gets its first reconciliation poll (3 added the column empty, so it was never polled); a
# score that is no pass rate (session 12) leaves the score column (the body keeps it).
REPAIRS = (
    "UPDATE evaluations SET next_poll_at = updated_at WHERE next_poll_at IS NULL"
    " AND poll_attempts = 0 AND status NOT IN ('completed', 'failed')",
    "UPDATE evaluations SET score = NULL WHERE score < 0 OR score > 1",
)


def _v10_repairs(db: Database) -> None:
    first_polls, scores = REPAIRS
    db.execute(first_polls)
    if db.execute(scores).rowcount:  # the rollups counted those scores
        rollups.rebuild(db.conn)


# Issue labels searched as plain text (search.issue_text), not as their JSON.
ISSUE_TEXT = (
    "ALTER TABLE evaluations ADD COLUMN issue_text TEXT",
    "UPDATE evaluations SET issue_text = (SELECT nullif(group_concat(value, char(10)), '')"
    " FROM json_each(evaluations.top_issues)) WHERE top_issues IS NOT NULL",
)


def repair_nul_labels(conn: sqlite3.Connection) -> int:
    """Labels stored before normalize made NUL U+FFFD: SQLite's JSON functions cut them at
    the NUL, PostgreSQL's refuse them (the overview failed). Returns how many rows changed."""
    found = conn.execute(
        "SELECT id, top_issues FROM evaluations WHERE top_issues LIKE '%u0000%'"
    ).fetchall()
    repaired = []
    for evaluation_id, text in found:
        labels: list[str] = json.loads(text)
        if any("\x00" in label for label in labels):
            cleaned = [label.replace("\x00", "\ufffd") for label in labels]
            repaired.append((dumps(cleaned), evaluation_id))
    conn.executemany("UPDATE evaluations SET top_issues = ? WHERE id = ?", repaired)
    return len(repaired)


def _v11_issue_text(db: Database) -> None:
    if repair_nul_labels(db.conn):
        rollups.rebuild(db.conn)
    for statement in ISSUE_TEXT:
        db.execute(statement)
    db.execute(f"DROP TABLE {search.TABLE}")
    search.create(db)
    search.rebuild(db.conn)


# Live tables follow the writes: evaluations by updated_at (the receiver's clock at the row's
# last write), then id, so `changed_since` and its cursor read only the rows changed since.
CHANGES_INDEX = (
    "CREATE INDEX IF NOT EXISTS idx_evaluations_updated_at_id ON evaluations (updated_at, id)",
)


def _v12_changes(db: Database) -> None:
    """The changes index (CHANGES_INDEX)."""
    for statement in CHANGES_INDEX:
        db.execute(statement)


# Rows an older merge wrote, before it kept each verdict to its own fields (VERDICT_ONLY): a
# completed evaluation with a failure_code, or a failed one with a pass, a score or top issue
# labels. Each kind is read from an index that holds its columns, not the table: failure_code's
# partial list index, which has only the rows with a failure_code (`status || ''` keeps SQLite
# from walking every completed row of status's instead), and status's for the failed rows.
STALE_VERDICTS = (
    "SELECT id FROM evaluations WHERE failure_code IS NOT NULL AND status || '' = 'completed'"
    " UNION SELECT id FROM evaluations WHERE status = 'failed'"
    " AND (passed IS NOT NULL OR score IS NOT NULL OR top_issues <> '[]')"
)


def _folded(said: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The stored callbacks and polls merged in arrival order, as applying them does now."""
    folded: dict[str, Any] | None = None
    for fields in said:
        folded = fields if folded is None else merge(folded, fields)
    return folded


def _fixed(
    conn: sqlite3.Connection, evaluation_ids: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows that change, as merge now leaves them: (those whose fields change, those whose
    verdict changes). A verdict changes where the callbacks, merged by the current rules, say
    the other one over what the row says (the envelope's event over its status, a late
    callback's completed_at over its arrival): the row merged with them, so what no callback
    said (a refetch, feedback) stays where it still may. Every statement is sent before any
    answer is read (in a pipeline on PostgreSQL: one round trip, not two a row)."""
    sent = [
        (
            conn.execute("SELECT data FROM evaluations WHERE id = ?", (evaluation_id,)),
            conn.execute(
                "SELECT body FROM deliveries WHERE evaluation_id = ? ORDER BY id",
                (evaluation_id,),
            ),
        )
        for evaluation_id in evaluation_ids
    ]
    changed, turned = [], []
    for row, bodies in sent:
        data: dict[str, Any] = json.loads(row.fetchone()[0])
        said = [
            fields
            for (body,) in bodies.fetchall()
            if (fields := stored_fields(bytes(body))) is not None
        ]
        verdict = data.get("status_code")
        folded = _folded(said)
        if folded is not None and {verdict, folded.get("status_code")} == TERMINAL:
            merged = merge(data, folded)
            if merged.get("status_code") != verdict:
                turned.append(merged)
                continue
        other = "failed" if verdict == "completed" else "completed"
        own = _folded([fields for fields in said if fields.get("status_code") == verdict]) or {}
        fixed = {**data, **{key: own.get(key) for key in VERDICT_ONLY[other] if key in data}}
        if fixed != data:
            changed.append(fixed)
    return changed, turned


REPAIR_CHUNK = 500  # rows a pipeline, and a rollup write, take at once
REFETCH_AGAIN = Forwarding(refetch=True)  # no sinks: nothing is forwarded


def repair_verdicts(conn: sqlite3.Connection, candidates: str = STALE_VERDICTS) -> None:
    """Rewrite the rows `candidates` finds as merge now leaves them: the other verdict's
    fields as this verdict's own callbacks said them, else null (a refetch is not stored, and
    Runflow's GET says null for them), or the other verdict where the callbacks now say it
    (_fixed). Written through apply_evaluation, so the columns, issue rows, rollups, text
    index and client_ref pointers follow as for a callback, and with no sinks: no forward is
    queued, an event already sent is not sent again. A row whose verdict turns is refetched
    again (dropped at the start of a service with refetch off) and named in a warning.
    In chunks, as apply_queued applies callbacks: reads sent ahead, the rollups written once a
    chunk (row by row, 10,000 stale rows of 200,000 took 65 s on PostgreSQL)."""
    stamp = now()
    stale = [evaluation_id for (evaluation_id,) in conn.execute(candidates).fetchall()]
    turned_ids = []
    for start in range(0, len(stale), REPAIR_CHUNK):
        with pipelined(conn):
            changed, turned = _fixed(conn, stale[start : start + REPAIR_CHUNK])
            known = read_stored(conn, [fields["id"] for fields in (*changed, *turned)])
            rolled_up: rollups.Changes = {}
            for fields, forwarding in (
                *((fields, NO_FORWARDING) for fields in changed),
                *((fields, REFETCH_AGAIN) for fields in turned),
            ):
                apply_evaluation(
                    conn,
                    fields,
                    source="migration",
                    stamp=stamp,
                    forwarding=forwarding,
                    rollup_changes=rolled_up,
                    known=known,
                )
            rollups.write(conn, rolled_up)
        turned_ids += [fields["id"] for fields in turned]
    if turned_ids:
        shown = ", ".join(turned_ids[:5])
        more = len(turned_ids) - 5
        log.warning(
            "%d evaluation(s) now have the verdict their callbacks say by the current rules,"
            " not the one forwarded before (%s%s): `receiver replay DELIVERY_ID` with one of"
            " each one's deliveries (`receiver show ID`) forwards it",
            len(turned_ids),
            shown,
            f" and {more} more" if more > 0 else "",
        )


def _v13_verdicts(db: Database) -> None:
    repair_verdicts(db.conn)


# Rows older versions merged by rules changed since (session 16): an envelope read by its
# status over its event ({event: evaluation.failed, status: completed} stored as completed), a
# verdict's callback delivered late winning by arrival over the completed_at of the one that
# followed it. Migration 13, run by them, left those rows as they were, or run by this one on
# an older schema, without the fields of the verdict the callbacks now say. Candidates: the
# evaluations with a verdict callback other than their verdict (one pass over deliveries: 19 s
# for 1,000,000 on this machine, from a cold cache).
OTHER_VERDICTS = (
    "SELECT DISTINCT d.evaluation_id FROM deliveries d JOIN evaluations e"
    " ON e.id = d.evaluation_id WHERE d.event IN ('evaluation.completed', 'evaluation.failed')"
    " AND d.event <> e.event"
)
# Migration 10 took scores that are no pass rate out of the rows, not out of the client_ref
# pointers that had copied them.
STALE_SCORES = "SELECT client_ref FROM client_refs WHERE latest_score < 0 OR latest_score > 1"


def repair_merges(conn: sqlite3.Connection) -> None:
    repair_verdicts(conn, OTHER_VERDICTS)
    stamp = now()
    for (client_ref,) in conn.execute(STALE_SCORES).fetchall():
        refresh_client_ref(conn, client_ref, stamp)


def _v16_merges(db: Database) -> None:
    repair_merges(db.conn)


# A signed body that cannot be used is kept once, its repeats counted in `receipts` (Runflow
# tries a 400 again, and each try added a row: a replayed body, as many as its sender liked).
# The repeats already kept fold into their first row.
QUARANTINE_ONCE = (
    "UPDATE quarantine SET"
    " receipts = (SELECT count(*) FROM quarantine q WHERE q.sha256 = quarantine.sha256),"
    " last_received_at ="
    " (SELECT max(q.received_at) FROM quarantine q WHERE q.sha256 = quarantine.sha256)"
    " WHERE id IN (SELECT min(id) FROM quarantine GROUP BY sha256 HAVING count(*) > 1)",
    "DELETE FROM quarantine WHERE id NOT IN (SELECT min(id) FROM quarantine GROUP BY sha256)",
    "CREATE UNIQUE INDEX idx_quarantine_sha256 ON quarantine (sha256)",
)


def _v14_quarantine_once(db: Database) -> None:
    db.execute("ALTER TABLE quarantine ADD COLUMN receipts INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE quarantine ADD COLUMN last_received_at TEXT")
    for statement in QUARANTINE_ONCE:
        db.execute(statement)


# What the service forwards (store/service.py), for the CLI to compare its own with.
SERVICE = (
    "CREATE TABLE service (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL)"
)


def _v15_service(db: Database) -> None:
    db.execute(SERVICE)


MIGRATIONS: list[tuple[int, str, Callable[[Database], None]]] = [
    (1, "core tables", _v1_core),
    (2, "refetch state and outbox claiming", _v2_forwarding),
    (3, "reconciliation schedule", _v3_reconcile),
    (4, "client_ref indexes", _v4_client_ref_indexes),
    (5, "overview rollups", _v5_rollups),
    (6, "list indexes", _v6_list_indexes),
    (7, "text search", _v7_search),
    (8, "apply queue", _v8_apply_queue),
    (9, "delivery key in arrival order", _v9_delivery_key),
    (10, "repairs: first polls, scores", _v10_repairs),
    (11, "issue labels searched as text", _v11_issue_text),
    (12, "changes index", _v12_changes),
    (13, "verdicts keep only their own fields", _v13_verdicts),
    (14, "quarantined bodies kept once", _v14_quarantine_once),
    (15, "the service's forwarding", _v15_service),
    (16, "verdicts merged by the current rules", _v16_merges),
]


def refuse_newer(done: set[int], known: int) -> None:
    """An older receiver must not run on a schema a newer one made: its queries may be wrong
    there, or slow (a lookup its indexes no longer serve)."""
    if done and max(done) > known:
        raise ConfigError(
            f"RECEIVER_DATABASE: a newer receiver migrated it (schema version {max(done)};"
            f" this one knows up to {known}): run that one, or restore a backup"
        )


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the missing migrations; returns the versions applied (empty when up to date).

    `BEGIN IMMEDIATE` serialises concurrent starters (several processes on one file).
    """
    db = Database(conn, execute_plugins=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM migrations")}
        refuse_newer(done, MIGRATIONS[-1][0])
        applied = []
        for version, name, step in MIGRATIONS:
            if version in done:
                continue
            step(db)
            conn.execute(
                "INSERT INTO migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, now()),
            )
            applied.append(version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied
