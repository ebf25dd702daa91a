"""Storing a verified callback: its delivery row (the same bytes again only count a receipt),
queued to be applied after the ack (apply.py), or applied in the same transaction."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field

from ..normalize import Callback
from ..times import now
from .apply import NO_FORWARDING, Forwarding, Stored, apply_evaluation, dumps
from .dialect import Later, is_postgres


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


def ingest(
    conn: sqlite3.Connection,
    delivery: Delivery,
    forwarding: Forwarding = NO_FORWARDING,
    known: dict[str, Stored] | None = None,
) -> Receipt:
    """Store one delivery and apply it to its evaluation in the same transaction (polls, and
    any caller that must read the result at once); `known` as apply_evaluation takes it."""
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
            known=known,
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
            dumps(delivery.headers),
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


def quarantine(
    conn: sqlite3.Connection,
    body: bytes,
    reason: str,
    headers: dict[str, str],
    request_id: str | None,
) -> int:
    """Keep a signed body we could not parse, for inspection, once: the same bytes again
    are counted (`receipts`, `last_received_at`). Returns its quarantine id."""
    stamp = now()
    (quarantine_id,) = conn.execute(
        "INSERT INTO quarantine (received_at, request_id, reason, sha256, headers, body)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET"
        " receipts = quarantine.receipts + 1, last_received_at = excluded.received_at"
        " RETURNING id",
        (stamp, request_id, reason, hashlib.sha256(body).hexdigest(), dumps(headers), body),
    ).fetchone()
    return int(quarantine_id)
