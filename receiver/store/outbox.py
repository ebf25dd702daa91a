"""Claiming and finishing work: forwards (outbox rows) and refetches.

A claim moves `next_attempt_at` past a lease, inside one write transaction, so no two workers
(threads or processes on one database) ever hold the same row; a worker that dies simply lets
its lease run out and the row becomes due again.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, NotFound
from ..normalize import TERMINAL, merge, stored_fields, verdict_fields
from .apply import Forwarding, Stored, apply_evaluation, queue_forwards, read_stored
from .dialect import is_postgres, serialize
from .ingest import Delivery, ingest

# The embeds a refetch adds (Runflow's GET ?embed=…): a polled body with one of them is as full
# as a refetch.
EMBEDS = ("judges", "action", "gate_failures")


def _skip_locked(conn: sqlite3.Connection, table: str) -> str:
    """On PostgreSQL rows another replica is claiming right now are passed over, not waited
    for (SQLite has one writer at a time: nothing to skip)."""
    return f" FOR UPDATE OF {table} SKIP LOCKED" if is_postgres(conn) else ""


@dataclass(frozen=True)
class Claim:
    """A forward to attempt now, with the fields to build its event from: the evaluation's
    state while the verdict is current, else the verdict's own callback (own_verdict).
    `superseded` names the current verdict when this one has no callback of its own to be
    built from: the worker skips it instead of sending the newer state under its type."""

    outbox_id: int
    sink: str
    event_type: str
    attempts: int
    fields: dict[str, Any]
    refetched: bool
    received_at: str
    superseded: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: state `done`, `skipped`, `dead`, or `pending` (retry at `at`)."""

    outbox_id: int
    state: str
    at: str
    error: str | None = None


def claim_forwards(
    conn: sqlite3.Connection,
    sink: str,
    *,
    now: str,
    lease_until: str,
    refetch_cutoff: str,
    limit: int,
) -> list[Claim]:
    """Due rows of `sink` whose evaluation is ready: refetched, not refetching, or waited for
    longer than the refetch budget (`refetch_cutoff`), oldest first; a verdict a newer one
    followed never waits, as the refetch pending is the newer one's. A verdict that is still
    the evaluation's status is built from its state, as merged from every callback and
    refetch; one a newer verdict followed before it was sent (failed, then completed) from its
    own callback (own_verdict), since the state now describes the newer one."""
    claimed = conn.execute(
        "UPDATE outbox SET next_attempt_at = :lease WHERE id IN ("
        " SELECT o.id FROM outbox o JOIN evaluations e ON e.id = o.evaluation_id"
        " WHERE o.sink = :sink AND o.state = 'pending' AND o.next_attempt_at <= :now"
        " AND (e.refetch_state IS NOT 'pending' OR o.created_at <= :cutoff"
        " OR o.event_type <> e.event)"
        f" ORDER BY o.next_attempt_at, o.id LIMIT :limit{_skip_locked(conn, 'o')})"
        " RETURNING id, event_type, attempts, evaluation_id, delivery_id",
        {"lease": lease_until, "sink": sink, "now": now, "cutoff": refetch_cutoff, "limit": limit},
    ).fetchall()
    claims = []
    for outbox_id, event_type, attempts, evaluation_id, delivery_id in sorted(claimed):
        data, refetched, received_at, status = conn.execute(
            "SELECT data, refetched, received_at, status FROM evaluations WHERE id = ?",
            (evaluation_id,),
        ).fetchone()
        fields = json.loads(data)
        built = (bool(refetched), received_at)
        superseded = None
        if event_type != f"evaluation.{status}":  # a newer verdict came before it was sent
            own = own_verdict(conn, delivery_id, event_type)
            if own is None:
                superseded = f"evaluation.{status}"
            else:
                fields, built = verdict_fields(own[0], fields), own[1:]
        claims.append(Claim(outbox_id, sink, event_type, attempts, fields, *built, superseded))
    return claims


def own_verdict(
    conn: sqlite3.Connection, delivery_id: int | None, event_type: str
) -> tuple[dict[str, Any], bool, str] | None:
    """The fields of the callback that brought the verdict `event_type` (the outbox row's
    delivery), whether it is a full GET with embeds (a reconciliation poll that found them),
    and when it arrived. None when no stored callback says that verdict: it came from a
    refetch (no delivery), or the row was queued by a delivery of another status (a replay
    for a sink added later)."""
    if delivery_id is None:
        return None
    row = conn.execute(
        "SELECT body, source, received_at FROM deliveries WHERE id = ?", (delivery_id,)
    ).fetchone()
    if row is None:
        return None
    body, source, received_at = row
    fields = stored_fields(bytes(body))
    if fields is None or f"evaluation.{fields.get('status_code')}" != event_type:
        return None
    refetched = source == "poll" and any(key in fields for key in EMBEDS)
    return fields, refetched, received_at


def has_due(conn: sqlite3.Connection, sink: str, now: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM outbox WHERE sink = ? AND state = 'pending' AND next_attempt_at <= ?"
        " LIMIT 1",
        (sink, now),
    ).fetchone()
    return row is not None


def finish_forwards(
    conn: sqlite3.Connection, outcomes: list[Outcome], stamp: str, held: str | None = None
) -> list[Outcome]:
    """Record attempts of rows claimed under the lease `held` (None: rows nobody claimed);
    returns the outcomes recorded. A row whose lease ran out and that another worker claimed
    meanwhile is that worker's to record (and count): a late answer here (a stalled process)
    must not overwrite it. The rows still held are locked first (PostgreSQL: FOR UPDATE), so
    what is returned is what was written."""
    if not outcomes:
        return []
    marks = ", ".join("?" * len(outcomes))
    lock = " FOR UPDATE" if is_postgres(conn) else ""
    still_held = {
        row[0]
        for row in conn.execute(
            f"SELECT id FROM outbox WHERE id IN ({marks}) AND state = 'pending'"
            f" AND next_attempt_at = coalesce(?, next_attempt_at) ORDER BY id{lock}",
            (*(o.outbox_id for o in outcomes), held),
        )
    }
    recorded = [o for o in outcomes if o.outbox_id in still_held]
    conn.executemany(
        "UPDATE outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
        " last_error = ?, updated_at = ? WHERE id = ?",
        [(o.state, o.at, o.error, stamp, o.outbox_id) for o in recorded],
    )
    return recorded


def lease_forwards(conn: sqlite3.Connection, ids: list[int], held: str, until: str) -> set[int]:
    """Move the lease of claimed rows still pending and still held (their lease is `held`: not
    run out and claimed by another worker meanwhile) to `until`: later, while a slow batch
    is still being sent; now, to give back rows a stopping worker did not send. Returns the
    ids moved."""
    if not ids:
        return set()
    marks = ", ".join("?" * len(ids))
    return {
        row[0]
        for row in conn.execute(
            f"UPDATE outbox SET next_attempt_at = ? WHERE id IN ({marks})"
            " AND state = 'pending' AND next_attempt_at = ? RETURNING id",
            (until, *ids, held),
        ).fetchall()
    }


def claim_refetches(
    conn: sqlite3.Connection, *, now: str, lease_until: str, limit: int
) -> list[tuple[str, int]]:
    """(evaluation id, attempts so far) of due refetches."""
    return [
        (row[0], row[1])
        for row in conn.execute(
            "UPDATE evaluations SET refetch_next_at = :lease WHERE id IN ("
            " SELECT id FROM evaluations WHERE refetch_state = 'pending'"
            " AND refetch_next_at <= :now ORDER BY refetch_next_at"
            f" LIMIT :limit{_skip_locked(conn, 'evaluations')})"
            " RETURNING id, refetch_attempts",
            {"lease": lease_until, "now": now, "limit": limit},
        ).fetchall()
    ]


def refetched(
    conn: sqlite3.Connection, fields: dict[str, Any], forwarding: Forwarding, stamp: str
) -> str | None:
    """Store the refetched object as the evaluation's state (the source of truth), unless it
    is behind the stored verdict (lagging): then nothing is stored, and why is returned."""
    known, stale = behind(conn, fields)
    if stale is None:
        apply_evaluation(
            conn,
            fields,
            source="refetch",
            stamp=stamp,
            forwarding=forwarding,
            refetched=True,
            known=known,
        )
    return stale


def poll_answered(
    conn: sqlite3.Connection, delivery: Delivery, forwarding: Forwarding
) -> str | None:
    """Ingest a reconciliation poll's answer as a callback, unless it is behind the stored
    verdict: a poll claimed while the evaluation ran can answer after newer callbacks came.
    Then nothing is stored (not even the delivery), and why is returned."""
    known, stale = behind(conn, delivery.callback.fields)
    if stale is None:
        ingest(conn, delivery, forwarding, known)
    return stale


def behind(
    conn: sqlite3.Connection, fields: dict[str, Any]
) -> tuple[dict[str, Stored], str | None]:
    """The stored row of the evaluation a GET answered (locked, for apply_evaluation's
    `known`), and why the GET is behind its verdict (lagging), or None."""
    known = read_stored(conn, [fields["id"]])
    data = known[fields["id"]][1]
    return known, None if data is None else lagging(conn, fields, json.loads(data))


def lagging(conn: sqlite3.Connection, fields: dict[str, Any], stored: dict[str, Any]) -> str | None:
    """Why the GET `fields` is behind the stored verdict, or None. Behind: it answers the
    other verdict, and a callback applied to this evaluation said that one before the stored
    one followed it (Runflow's GET can lag its callbacks; stored, a tie without `updated_at`
    would go to the GET, the later arrival, and turn the evaluation back), or the GET is older
    by `updated_at`. A verdict no callback said is news (Runflow tried again): stored."""
    verdict, current = fields.get("status_code"), stored.get("status_code")
    if verdict not in TERMINAL or current not in TERMINAL or verdict == current:
        return None
    said = conn.execute(
        "SELECT 1 FROM deliveries d WHERE d.evaluation_id = ? AND d.event = ?"
        " AND NOT EXISTS (SELECT 1 FROM apply_queue q WHERE q.delivery_id = d.id) LIMIT 1",
        (fields["id"], f"evaluation.{verdict}"),
    ).fetchone()
    if said is None and merge(stored, fields).get("status_code") == verdict:
        return None
    return f"Runflow still answers {verdict}, not yet the {current} verdict that followed it"


def refetch_failed(
    conn: sqlite3.Connection,
    evaluation_id: str,
    error: str,
    retry_at: str | None,
    stamp: str,
    held: str,
    attempt: bool = True,
) -> bool:
    """Schedule another try at `retry_at`, or give up (`retry_at` None): state `failed`; it
    counts as an attempt unless `attempt` is false (a 429). Only while the refetch is still
    the one claimed with lease `held` (whether it was recorded is returned): a verdict that
    followed started it over, or `receiver refetch` stored it, while the GET was on the way,
    and its failure is no longer theirs."""
    cursor = conn.execute(
        "UPDATE evaluations SET refetch_attempts = refetch_attempts + ?, refetch_error = ?,"
        " refetch_next_at = ?, refetch_state = ?, updated_at = ?"
        " WHERE id = ? AND refetch_state = 'pending' AND refetch_next_at = ?",
        (
            int(attempt),
            error,
            retry_at,
            "pending" if retry_at else "failed",
            stamp,
            evaluation_id,
            held,
        ),
    )
    return bool(cursor.rowcount)


def request_refetch(conn: sqlite3.Connection, evaluation_id: str, stamp: str) -> None:
    cursor = conn.execute(
        "UPDATE evaluations SET refetch_state = 'pending', refetch_next_at = ?,"
        " refetch_attempts = 0, refetch_error = NULL WHERE id = ?",
        (stamp, evaluation_id),
    )
    if not cursor.rowcount:
        raise NotFound(f"no evaluation {evaluation_id!r}")


def claim_polls(
    conn: sqlite3.Connection, *, now: str, lease_until: str, limit: int
) -> list[tuple[str, int]]:
    """(evaluation id, polls so far) of evaluations known but not terminal for too long."""
    return [
        (row[0], row[1])
        for row in conn.execute(
            "UPDATE evaluations SET next_poll_at = :lease WHERE id IN ("
            " SELECT id FROM evaluations WHERE next_poll_at <= :now"
            f" ORDER BY next_poll_at LIMIT :limit{_skip_locked(conn, 'evaluations')})"
            " RETURNING id, poll_attempts",
            {"lease": lease_until, "now": now, "limit": limit},
        ).fetchall()
    ]


def polls_due(conn: sqlite3.Connection, now: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM evaluations WHERE next_poll_at <= ? LIMIT 1", (now,)
    ).fetchone()
    return row is not None


def polled(
    conn: sqlite3.Connection, evaluation_id: str, error: str | None, next_at: str | None, stamp: str
) -> None:
    """Record a poll; `next_at` None stops polling (terminal, or Runflow does not know it)."""
    conn.execute(
        "UPDATE evaluations SET poll_attempts = poll_attempts + 1, poll_error = ?,"
        " next_poll_at = CASE WHEN status IN ('completed', 'failed') THEN NULL ELSE ? END,"
        " updated_at = ? WHERE id = ?",
        (error, next_at, stamp, evaluation_id),
    )


FORWARD_COLUMNS = (
    "id, sink, event_id, event_type, evaluation_id, delivery_id, state, attempts,"
    " next_attempt_at, last_error, created_at, updated_at"
)
STATES = ("pending", "done", "dead", "skipped")


def list_forwards(
    conn: sqlite3.Connection,
    *,
    state: str | None,
    sink: str | None,
    limit: int,
    after: int | None = None,
) -> list[dict[str, Any]]:
    """Newest first; `after` is the last id of the previous page."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("state", state), ("sink", sink)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if after is not None:
        clauses.append("id < ?")
        params.append(after)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {FORWARD_COLUMNS} FROM outbox{where} ORDER BY id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        dict(zip(FORWARD_COLUMNS.replace(" ", "").split(","), row, strict=True)) for row in rows
    ]


def _configured(sink: str, sinks: Collection[str]) -> None:
    """Only a configured sink's forwards are made pending: no worker loop sends the others,
    so they would stay pending for ever (and keep their evaluation from being pruned)."""
    if sink not in sinks:
        raise BadRequest(f"sink {sink!r} is not configured: nothing would send its forwards")


def retry_forward(
    conn: sqlite3.Connection, outbox_id: int, stamp: str, sinks: Collection[str]
) -> dict[str, Any]:
    """Send a dead (or done) forward again, from attempt zero."""
    row = conn.execute("SELECT state, sink FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
    if row is None:
        raise NotFound(f"no forward {outbox_id}")
    if row[0] == "pending":
        raise BadRequest(f"forward {outbox_id} is already pending")
    _configured(row[1], sinks)
    changed = conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
        " last_error = NULL, updated_at = ? WHERE id = ?",
        (stamp, stamp, outbox_id),
    ).rowcount
    if not changed:  # pruned meanwhile, by another process (PostgreSQL)
        raise NotFound(f"no forward {outbox_id}")
    return {"id": outbox_id, "state": "pending"}


def retry_dead(
    conn: sqlite3.Connection, stamp: str, sinks: Collection[str], sink: str | None = None
) -> int:
    """Send every dead forward of `sink`, or of every configured sink, again."""
    if sink is not None:
        _configured(sink, sinks)
    names = [sink] if sink is not None else sorted(sinks)
    if not names:
        return 0
    cursor = conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
        " last_error = NULL, updated_at = ? WHERE state = 'dead'"
        f" AND sink IN ({', '.join('?' * len(names))})",
        (stamp, stamp, *names),
    )
    return cursor.rowcount


def replay_delivery(
    conn: sqlite3.Connection, delivery_id: int, forwarding: Forwarding, stamp: str
) -> int:
    """Forward the verdict of a stored delivery's evaluation again to every sink that wants it
    (same event ids, so consumers that dedupe see it once). Returns how many were queued."""
    row = conn.execute(
        "SELECT evaluation_id FROM deliveries WHERE id = ?", (delivery_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no delivery {delivery_id}")
    if row[0] is None:
        raise BadRequest(f"delivery {delivery_id} is not an evaluation callback; nothing to replay")
    serialize(conn, f"evaluation:{row[0]}")  # as prune does: its rows must not go meanwhile
    evaluation = conn.execute(
        "SELECT status, passed, task_type, client_ref FROM evaluations WHERE id = ?", (row[0],)
    ).fetchone()
    if evaluation is None:  # its callback is not applied (yet, or it failed to apply)
        raise BadRequest(f"evaluation {row[0]} is not stored yet; nothing to replay")
    status, passed, task_type, client_ref = evaluation
    if status not in ("completed", "failed"):
        raise BadRequest(f"evaluation {row[0]} has no verdict yet ({status}); nothing to replay")
    cols = {"status": status, "passed": passed, "task_type": task_type, "client_ref": client_ref}
    wanted = queue_forwards(conn, row[0], cols, forwarding.sinks, delivery_id, stamp)
    if not wanted:
        return 0
    # Only those sinks: a removed sink's row would stay pending with no loop to send it.
    cursor = conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
        " last_error = NULL, updated_at = ? WHERE evaluation_id = ? AND event_type = ?"
        f" AND sink IN ({', '.join('?' * len(wanted))})",
        (stamp, stamp, row[0], f"evaluation.{status}", *wanted),
    )
    return cursor.rowcount


def outbox_depth(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Per sink: how many forwards are in each state."""
    depth: dict[str, dict[str, int]] = {}
    for sink, state, number in conn.execute(
        "SELECT sink, state, count(*) FROM outbox GROUP BY sink, state"
    ):
        depth.setdefault(sink, {})[state] = number
    return depth
