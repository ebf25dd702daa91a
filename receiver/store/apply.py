"""Applying a stored delivery to its evaluation, in the writer's transaction: merged under the
state rules, with its issues, rollups, text index, client_ref pointers, refetch and outbox
rows. Deliveries acknowledged first (ingest.accept) are applied from `apply_queue` in chunks
(apply_queued, store/backlog.py decides when)."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..events import event_id
from ..normalize import TERMINAL, columns, judge_issues, merge, normalize, parse_body
from ..sinkspec import SinkSpec
from ..times import now, shift
from .client_refs import refresh_client_ref
from .dialect import is_postgres, pipelined, serialize, transient
from .rollups import FACT_COLUMNS, Changes, Facts, add, track, write
from .search import SEARCHED, issue_text, reindex

log = logging.getLogger("receiver.store")
MAX_ID = 2**63 - 1

# Compact JSON for stored data and headers, one encoder for every call (json.dumps with
# options builds one per call).
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class Forwarding:
    """What the ingest transaction needs to queue work: the sinks, and whether to refetch."""

    sinks: tuple[SinkSpec, ...] = ()
    refetch: bool = False
    reconcile_after: float = 600.0  # seconds a non-terminal evaluation waits before a poll


NO_FORWARDING = Forwarding()


@dataclass(frozen=True)
class Applied:
    count: int
    more: bool  # whether more may be queued (the call took all it was allowed to)
    failed: tuple[int, ...] = ()


def apply_queued(
    conn: sqlite3.Connection,
    most: int,
    through: int | None = None,
    skip: frozenset[int] = frozenset(),
    forwarding: Forwarding = NO_FORWARDING,
    isolate: bool = True,
) -> Applied:
    """Apply up to `most` queued deliveries (those up to `through`, if given), oldest first,
    each as it would have been applied at its arrival. With `isolate`, each in a savepoint: a
    delivery whose apply raises is left queued and reported in `failed`, so the caller can
    skip it instead of retrying forever. Without, the first that raises fails the whole chunk
    (the caller rolls it back): a savepoint pair is two round trips per callback on
    PostgreSQL, for a failure that almost never comes."""
    upto = MAX_ID if through is None else through
    chosen, params = "q.delivery_id <= ?", [upto]
    if skip:  # the ids first: a parameter per skipped id would, past 32,766, fail every chunk
        queued = conn.execute(
            "SELECT delivery_id FROM apply_queue WHERE delivery_id <= ?"
            " ORDER BY delivery_id LIMIT ?",
            (upto, most + len(skip)),
        ).fetchall()
        wanted = [row[0] for row in queued if row[0] not in skip][:most]
        if not wanted:
            return Applied(0, False, ())
        chosen, params = f"q.delivery_id IN ({', '.join('?' * len(wanted))})", wanted
    # On PostgreSQL other servers apply the same queue: each takes its deliveries' rows, so a
    # chunk that read one while another server applied it skips it once that one commits,
    # instead of applying it a second time over the callbacks applied after it.
    lock = " FOR UPDATE OF q" if is_postgres(conn) else ""
    rows = conn.execute(
        "SELECT q.delivery_id, d.body, d.source, d.received_at"
        " FROM apply_queue q LEFT JOIN deliveries d ON d.id = q.delivery_id"
        f" WHERE {chosen} ORDER BY q.delivery_id LIMIT ?{lock}",
        (*params, most),
    ).fetchall()
    # Unisolated, any failure fails the chunk: PostgreSQL may then pipeline its statements,
    # and read the chunk's stored rows at once instead of waiting for one answer per callback.
    ahead = not isolate and is_postgres(conn)
    with contextlib.nullcontext() if isolate else pipelined(conn):
        parsed = {
            delivery_id: normalize(parse_body(bytes(body))).fields
            for delivery_id, body, _, _ in (rows if ahead else ())
            if body is not None
        }
        known = read_stored(conn, [fields["id"] for fields in parsed.values()])
        applied = []
        pruned = []  # pruned while queued: nothing left to apply
        failed = []
        rolled_up: Changes = {}  # the chunk's rollup changes, written once at its end
        for delivery_id, body, source, received_at in rows:
            if body is None:
                pruned.append(delivery_id)
                continue
            if isolate:
                conn.execute("SAVEPOINT apply")
            changes: Changes = {}
            try:
                apply_evaluation(
                    conn,
                    parsed.get(delivery_id) or normalize(parse_body(bytes(body))).fields,
                    source=source,
                    stamp=received_at,
                    forwarding=forwarding,
                    delivery_id=delivery_id,
                    rollup_changes=changes,
                    known=known,
                )
                if isolate:  # in its savepoint: a rollup that cannot be written fails it alone
                    write(conn, changes)
            except Exception as exc:
                if not isolate or not conn.in_transaction or transient(conn, exc):
                    # The chunk fails (SQLite may have rolled it back already); a conflict with
                    # another transaction or a lost connection is no fault of this delivery:
                    # the writer retries or fails the whole chunk, and it stays due.
                    raise
                conn.execute("ROLLBACK TO apply")
                log.exception("delivery %d could not be applied; it stays queued", delivery_id)
                failed.append(delivery_id)
            else:
                applied.append(delivery_id)
                if not isolate:
                    add(rolled_up, changes)
            if isolate:
                conn.execute("RELEASE apply")
        write(conn, rolled_up)
        dequeued = [(delivery_id,) for delivery_id in applied + pruned]  # one round trip on PG
        conn.executemany("DELETE FROM apply_queue WHERE delivery_id = ?", dequeued)
    return Applied(len(applied), len(rows) == most, tuple(failed))


# Whether a newer attempt names the evaluation as parent, then its stored row if any (all
# NULL if none): data, refetch_state, rowid, the searched and the rolled-up columns. One
# statement: one round trip on PostgreSQL.
_STORED = (
    "SELECT EXISTS (SELECT 1 FROM evaluations WHERE parent_evaluation_id = ?), e.data,"
    " e.refetch_state, e.rowid, "
    + ", ".join(f"e.{column}" for column in (*SEARCHED, *FACT_COLUMNS.split(", ")))
    + " FROM (SELECT 1) AS one LEFT JOIN evaluations AS e ON e.id = ?"
)
Stored = tuple[Any, ...]  # a _STORED row


def read_stored(conn: sqlite3.Connection, evaluation_ids: list[str]) -> dict[str, Stored]:
    """Lock the evaluations (in id order, so two servers' chunks take them in the same order)
    and read their _STORED rows, every statement sent before any answer is read (in a
    pipeline: one round trip), for apply_evaluation to take as `known`. One _STORED each, not
    one statement for all: a join on the ids is planned on the trigram index while the table
    has no statistics yet, and slows as it grows."""
    unique = sorted(set(evaluation_ids))
    serialize(conn, *(f"evaluation:{evaluation_id}" for evaluation_id in unique))
    sent = [
        (evaluation_id, conn.execute(_STORED, (evaluation_id,) * 2)) for evaluation_id in unique
    ]
    return {evaluation_id: tuple(cursor.fetchone()) for evaluation_id, cursor in sent}


def apply_evaluation(
    conn: sqlite3.Connection,
    fields: dict[str, Any],
    *,
    source: str,
    stamp: str,
    forwarding: Forwarding = NO_FORWARDING,
    delivery_id: int | None = None,
    refetched: bool = False,
    rollup_changes: Changes | None = None,
    known: dict[str, Stored] | None = None,
) -> None:
    """Merge `fields` into the stored evaluation under the state rules (design.md §8), and in
    the same transaction queue its refetch and one outbox row per matching sink. Given
    `rollup_changes`, its rollup changes are added there for the caller to write. `known`
    holds rows read ahead (read_stored); each is used once, since this write makes it stale.

    `stamp` is when the change happened (a delivery's arrival, even when it is applied later
    from the queue); updated_at is when the row is written, by this writer's clock inside its
    transaction. Writers take turns (one per SQLite file), so updated_at grows in commit
    order, and a reader asking for the rows changed since the newest it saw (list_changes)
    misses none, not even a callback applied late with an older stamp. Writers on PostgreSQL
    overlap: their readers ask from a little earlier (static/app.js)."""
    evaluation_id = fields["id"]
    ahead = None if known is None else known.pop(evaluation_id, None)
    if ahead is None:
        serialize(conn, f"evaluation:{evaluation_id}")
        ahead = conn.execute(_STORED, (evaluation_id, evaluation_id)).fetchone()
    has_newer_attempt, *stored = ahead
    row = stored if stored[0] is not None else None
    before_data = json.loads(row[0]) if row else None
    merged = merge(before_data, fields) if before_data is not None else fields
    cols = columns(merged)
    status = cols["status"]
    written = now()
    values = {
        **cols,
        "id": evaluation_id,
        "event": f"evaluation.{status}" if status in ("completed", "failed") else None,
        "top_issues": dumps(cols["top_issues"]),
        "issue_text": issue_text(cols["top_issues"]),
        "superseded": int(cols["superseded_at"] is not None or bool(has_newer_attempt)),
        "updated_at": written,
        "data": dumps(merged),
    }
    # A verdict's full object; not a poll of one still running, nor a GET that lags behind
    # the callback (the merged status is the callback's then).
    if refetched and fields.get("status_code") in TERMINAL:
        values.update(refetched=1, refetch_state="done", refetch_error=None)
    elif before_data is not None and before_data.get("status_code") in TERMINAL - {status}:
        # The other verdict's refetch says nothing of this one: refetched again, from scratch,
        # or, with refetch off, not at all (its state was the other verdict's: "done" said this
        # one had been refetched).
        values.update(
            refetched=0,
            refetch_state="pending" if forwarding.refetch else None,
            refetch_next_at=stamp if forwarding.refetch else None,
            refetch_attempts=0,
            refetch_error=None,
        )
    elif forwarding.refetch and status in TERMINAL and (row is None or row[1] is None):
        values.update(refetch_state="pending", refetch_next_at=stamp)
    if status in TERMINAL:
        values.update(next_poll_at=None)
    elif row is None or source != "poll":
        values.update(next_poll_at=shift(stamp, forwarding.reconcile_after))
    if row is None:
        values.update(received_at=stamp, source=source)
        names = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        # The rowid only keys SQLite's FTS5 (reindex does nothing on PostgreSQL), and is read
        # without RETURNING: on SQLite that made this INSERT 2.5 times as costly (~85 against
        # ~33 µs with the table's indexes), on PostgreSQL an answer to wait for.
        cursor = conn.execute(f"INSERT INTO evaluations ({names}) VALUES ({marks})", values)
        rowid = 0 if is_postgres(conn) else cursor.lastrowid
        assert rowid is not None  # SQLite sets it for every row inserted
    else:
        rowid = row[2]
        # Superseded stays superseded: a newer attempt applied meanwhile by another server
        # (PostgreSQL) marked it after this row was read.
        assignments = ", ".join(
            "superseded = CASE WHEN superseded = 1 THEN 1 ELSE :superseded END"
            if name == "superseded"
            else f"{name} = :{name}"
            for name in values
            if name != "id"
        )
        conn.execute(f"UPDATE evaluations SET {assignments} WHERE id = :id", values)
    issues = None
    # Also when merge dropped the judges of the other verdict: their issues are not this one's.
    dropped = before_data is not None and bool(before_data.get("judges")) and not merged["judges"]
    if "judges" in fields or dropped:
        replaced = conn.execute(
            "DELETE FROM issues WHERE evaluation_id = ? RETURNING category, subcategory",
            (evaluation_id,),
        ).fetchall()
        found = judge_issues(merged)
        conn.executemany(
            "INSERT INTO issues (evaluation_id, judge, category, subcategory, detail)"
            " VALUES (?, ?, ?, ?, ?)",
            [(evaluation_id, *issue) for issue in found],
        )
        issues = (replaced, [(category, sub) for _, category, sub, _ in found])
    before = Facts.from_row(row[8:]) if row else None
    after = Facts.from_columns(row[8] if row else stamp, values)
    track(conn, evaluation_id, before, after, issues, rollup_changes)
    searched = (evaluation_id, *(values[name] for name in SEARCHED[1:]))
    reindex(conn, rowid, row[3:8] if row else None, searched)
    refs = {cols["client_ref"], row[4] if row else None}
    parent = cols["parent_evaluation_id"]
    if parent:
        if known is not None:
            known.pop(parent, None)  # it now has a newer attempt, and may be superseded below
        supersede = (
            "UPDATE evaluations SET superseded = 1, updated_at = ? WHERE id = ? AND superseded = 0"
            " RETURNING client_ref"
        )
        superseding = conn.execute(supersede, (written, parent)).fetchone()
        if superseding is None and is_postgres(conn):
            # Another server may be inserting the parent, having read it before this attempt
            # existed (so not superseded): once its lock is ours, its row is there to mark.
            serialize(conn, f"evaluation:{parent}")
            superseding = conn.execute(supersede, (written, parent)).fetchone()
        if superseding:
            refs.add(superseding[0])
    for client_ref in refs - {None}:
        refresh_client_ref(conn, client_ref, stamp)
    if status in TERMINAL:
        queue_forwards(conn, evaluation_id, cols, forwarding.sinks, delivery_id, stamp)


def queue_forwards(
    conn: sqlite3.Connection,
    evaluation_id: str,
    cols: dict[str, Any],
    sinks: tuple[SinkSpec, ...],
    delivery_id: int | None,
    stamp: str,
) -> list[str]:
    """One outbox row per sink that wants this verdict (their names are returned). The event
    id is stable, so a verdict seen again (replayed callback, refetch, poll) never queues a
    second forward."""
    event = f"evaluation.{cols['status']}"
    passed = None if cols["passed"] is None else bool(cols["passed"])
    wanted = [
        spec.name
        for spec in sinks
        if spec.matches(event, cols["status"], passed, cols["task_type"], cols["client_ref"])
    ]
    conn.executemany(
        "INSERT INTO outbox (event_id, sink, evaluation_id, delivery_id, event_type, state,"
        " attempts, next_attempt_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?) ON CONFLICT (sink, event_id) DO NOTHING",
        [
            (
                event_id(evaluation_id, event),
                name,
                evaluation_id,
                delivery_id,
                event,
                stamp,
                stamp,
                stamp,
            )
            for name in wanted
        ],
    )
    return wanted
