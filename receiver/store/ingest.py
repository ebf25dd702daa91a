"""The ingest transaction: delivery, evaluation, issues and client_ref rows, all or nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from ..events import event_id
from ..normalize import TERMINAL, Callback, columns, judge_issues, merge, normalize, parse_body
from ..sinkspec import SinkSpec
from ..times import now, shift
from .dialect import Later, is_postgres, pipelined, serialize
from .rollups import FACT_COLUMNS, Changes, Facts, add, track, write
from .search import SEARCHED, reindex

log = logging.getLogger("receiver.store")
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class Forwarding:
    """What the ingest transaction needs to queue work: the sinks, and whether to refetch."""

    sinks: tuple[SinkSpec, ...] = ()
    refetch: bool = False
    reconcile_after: float = 600.0  # seconds a non-terminal evaluation waits before a poll


NO_FORWARDING = Forwarding()


@dataclass(frozen=True)
class Delivery:
    """A verified callback as received: exact bytes plus what we know of its arrival."""

    body: bytes
    callback: Callback
    headers: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None
    secret_index: int | None = None
    source: str = "webhook"  # webhook | poll
    refetched: bool = False  # the body is a full GET with the configured embeds (a poll)


@dataclass(frozen=True)
class Receipt:
    outcome: str  # "stored" | "duplicate" | "ignored"
    delivery_id: int
    evaluation_id: str | None

    @property
    def applies(self) -> bool:
        """Whether this delivery is new and changes an evaluation."""
        return self.outcome == "stored" and self.evaluation_id is not None


# Compact JSON, one encoder for every call (json.dumps with options builds one per call).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def ingest(
    conn: sqlite3.Connection, delivery: Delivery, forwarding: Forwarding = NO_FORWARDING
) -> Receipt:
    """Store one delivery and apply it to its evaluation in the same transaction (polls, and
    any caller that must read the result at once)."""
    receipt, stamp = record(conn, delivery)
    if receipt.applies:
        apply_evaluation(
            conn,
            delivery.callback.fields,
            source=delivery.source,
            stamp=stamp,
            forwarding=forwarding,
            delivery_id=receipt.delivery_id,
            refetched=delivery.refetched,
        )
    return receipt


def accept(conn: sqlite3.Connection, delivery: Delivery) -> Receipt:
    """Store one delivery and queue it to be applied (apply_queued) after the ack: the
    delivery row and its queue row commit together, so an acknowledged callback is always
    either applied or still queued, never lost. On PostgreSQL both rows go in one statement
    (one round trip)."""
    return accept_later(conn, delivery).read()


def accept_later(conn: sqlite3.Connection, delivery: Delivery) -> Later[Receipt]:
    """`accept` with its statement sent now and its receipt read later (store/writer.py)."""
    queued = is_postgres(conn)
    recorded = record_later(conn, delivery, queue=queued)

    def read() -> Receipt:
        receipt, _ = recorded.read()
        if receipt.applies and not queued:
            conn.execute("INSERT INTO apply_queue (delivery_id) VALUES (?)", (receipt.delivery_id,))
        return receipt

    return Later(read)


# schema.DELIVERY_KEY's two unique keys, by whether the callback has an evaluation id: the
# conflict target of the insert and the duplicate's row.
_KEYS = {
    True: ("(evaluation_id, sha256)", "evaluation_id = ? AND sha256 = ?"),
    False: ("(sha256) WHERE evaluation_id IS NULL", "evaluation_id IS NULL AND sha256 = ?"),
}


def record(
    conn: sqlite3.Connection, delivery: Delivery, queue: bool = False
) -> tuple[Receipt, str]:
    """The delivery row, and when it arrived. The same bytes again only count a receipt
    (replays are harmless). With `queue` (PostgreSQL only: data-modifying WITH), a new row
    that applies is queued by the same statement."""
    return record_later(conn, delivery, queue).read()


def record_later(
    conn: sqlite3.Connection, delivery: Delivery, queue: bool = False
) -> Later[tuple[Receipt, str]]:
    """`record` with its INSERT sent now and its answer read later."""
    callback = delivery.callback
    digest = hashlib.sha256(delivery.body).hexdigest()
    stamp = now()
    outcome = "ignored" if callback.kind == "run" else "stored"
    evaluation_id = callback.evaluation_id
    target, row = _KEYS[evaluation_id is not None]
    insert = (
        "INSERT INTO deliveries (received_at, last_received_at, receipts, source, request_id,"
        " secret_index, sha256, kind, event, evaluation_id, outcome, headers, body)"
        " VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        f" ON CONFLICT {target} DO NOTHING RETURNING id"
    )
    if queue and Receipt(outcome, 0, evaluation_id).applies:
        insert = (
            f"WITH stored AS ({insert}), queued AS (INSERT INTO apply_queue (delivery_id)"
            " SELECT id FROM stored) SELECT id FROM stored"
        )
    sent = conn.execute(  # one statement for a new body, the common case
        insert,
        (
            stamp,
            stamp,
            delivery.source,
            delivery.request_id,
            delivery.secret_index,
            digest,
            callback.kind,
            callback.event,
            evaluation_id,
            outcome,
            _dumps(delivery.headers),
            delivery.body,
        ),
    )

    def read() -> tuple[Receipt, str]:
        inserted = sent.fetchone()
        if inserted is not None:
            return Receipt(outcome, inserted[0], evaluation_id), stamp
        (delivery_id,) = conn.execute(
            f"UPDATE deliveries SET receipts = receipts + 1, last_received_at = ? WHERE {row}"
            " RETURNING id",
            (stamp, digest) if evaluation_id is None else (stamp, evaluation_id, digest),
        ).fetchone()
        return Receipt("duplicate", delivery_id, evaluation_id), stamp

    return Later(read)


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
    skipped = f" AND q.delivery_id NOT IN ({', '.join('?' * len(skip))})" if skip else ""
    rows = conn.execute(
        "SELECT q.delivery_id, d.body, d.source, d.received_at"
        " FROM apply_queue q LEFT JOIN deliveries d ON d.id = q.delivery_id"
        f" WHERE q.delivery_id <= ?{skipped} ORDER BY q.delivery_id LIMIT ?",
        (MAX_ID if through is None else through, *sorted(skip), most),
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
            except Exception:
                if not isolate or not conn.in_transaction:
                    raise  # the chunk fails (SQLite may have rolled it back already)
                conn.execute("ROLLBACK TO apply")
                log.exception("delivery %d could not be applied; it stays queued", delivery_id)
                failed.append(delivery_id)
            else:
                applied.append(delivery_id)
                add(rolled_up, changes)
            if isolate:
                conn.execute("RELEASE apply")
        write(conn, rolled_up)
        dequeued = [(delivery_id,) for delivery_id in applied + pruned]  # one round trip on PG
        conn.executemany("DELETE FROM apply_queue WHERE delivery_id = ?", dequeued)
    return Applied(len(applied), len(rows) == most, tuple(failed))


@dataclass(frozen=True)
class Applied:
    count: int
    more: bool  # whether more may be queued (the call took all it was allowed to)
    failed: tuple[int, ...] = ()


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
    holds rows read ahead (read_stored); each is used once, since this write makes it stale."""
    evaluation_id = fields["id"]
    ahead = None if known is None else known.pop(evaluation_id, None)
    if ahead is None:
        serialize(conn, f"evaluation:{evaluation_id}")
        ahead = conn.execute(_STORED, (evaluation_id, evaluation_id)).fetchone()
    has_newer_attempt, *stored = ahead
    row = stored if stored[0] is not None else None
    merged = merge(json.loads(row[0]), fields) if row else fields
    cols = columns(merged)
    status = cols["status"]
    values = {
        **cols,
        "id": evaluation_id,
        "event": f"evaluation.{status}" if status in ("completed", "failed") else None,
        "top_issues": _dumps(cols["top_issues"]),
        "superseded": int(cols["superseded_at"] is not None or bool(has_newer_attempt)),
        "updated_at": stamp,
        "data": _dumps(merged),
    }
    if refetched:
        values.update(refetched=1, refetch_state="done", refetch_error=None)
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
        insert = f"INSERT INTO evaluations ({names}) VALUES ({marks})"
        if is_postgres(conn):  # no answer to wait for: the rowid only keys SQLite's FTS5
            conn.execute(insert, values)
            rowid = 0  # unread: reindex does nothing on PostgreSQL
        else:
            (rowid,) = conn.execute(f"{insert} RETURNING rowid", values).fetchone()
    else:
        rowid = row[2]
        assignments = ", ".join(f"{name} = :{name}" for name in values if name != "id")
        conn.execute(f"UPDATE evaluations SET {assignments} WHERE id = :id", values)
    issues = None
    if "judges" in fields:
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
        superseding = conn.execute(
            "UPDATE evaluations SET superseded = 1, updated_at = ? WHERE id = ? AND superseded = 0"
            " RETURNING client_ref",
            (stamp, parent),
        ).fetchone()
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
) -> None:
    """One outbox row per sink that wants this verdict. The event id is stable, so a verdict
    seen again (replayed callback, refetch, poll) never queues a second forward."""
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
# verdict, else its newest evaluation; and how many it has. No row when it has none.
_REFRESH_CLIENT_REF = f"""
INSERT INTO client_refs (client_ref, current_evaluation_id, latest_evaluation_id,
  latest_status, latest_passed, latest_score, evaluations, updated_at)
SELECT :ref,
  (SELECT id FROM evaluations WHERE client_ref = :ref AND status = 'completed'
   AND superseded = 0 ORDER BY completed_at DESC LIMIT 1),
  latest.id, latest.status, latest.passed, latest.score, counted.n, :stamp
FROM (SELECT count(*) AS n FROM evaluations WHERE client_ref = :ref) AS counted
LEFT JOIN (
  SELECT id, status, passed, score FROM (
    SELECT * FROM (SELECT 0 AS rank, id, status, passed, score FROM evaluations
      WHERE client_ref = :ref AND status IN ('completed', 'failed')
      ORDER BY completed_at DESC LIMIT 1) AS verdict
    UNION ALL
    SELECT * FROM (SELECT 1 AS rank, id, status, passed, score FROM evaluations
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
        " AND superseded = 0 ORDER BY completed_at DESC LIMIT 1",
        (client_ref,),
    ).fetchone()
    latest = (
        conn.execute(
            "SELECT id, status, passed, score FROM evaluations WHERE client_ref = ?"
            " AND status IN ('completed', 'failed') ORDER BY completed_at DESC LIMIT 1",
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


def quarantine(
    conn: sqlite3.Connection,
    body: bytes,
    reason: str,
    headers: dict[str, str],
    request_id: str | None,
) -> int:
    """Keep a signed body we could not parse, for inspection; returns its quarantine id."""
    (quarantine_id,) = conn.execute(
        "INSERT INTO quarantine (received_at, request_id, reason, sha256, headers, body)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (now(), request_id, reason, hashlib.sha256(body).hexdigest(), _dumps(headers), body),
    ).fetchone()
    return int(quarantine_id)
