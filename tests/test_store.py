from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from sqlite_utils import Database

from receiver.errors import BadRequest, ConfigError, StoreUnavailable
from receiver.events import build_event
from receiver.normalize import normalize, parse_body
from receiver.sinkspec import SinkSpec
from receiver.store import Delivery, EvaluationFilter, Receipt, Store, rollups
from receiver.store import apply as apply_module
from receiver.store.apply import NO_FORWARDING, Forwarding, apply_queued
from receiver.store.dialect import Later
from receiver.store.ingest import accept
from receiver.store.outbox import claim_forwards, refetched, replay_delivery
from receiver.store.queries import list_changes
from receiver.store.schema import MIGRATIONS
from receiver.store.stats import stats as scan_stats
from receiver.times import now, shift

from .database import POSTGRES, connect, database_for, sqlite_only, waiting_for_a_lock
from .helpers import fixture

COMPLETED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
VERSIONS = [version for version, _, _ in MIGRATIONS]
TABLES = {
    "migrations",
    "deliveries",
    "evaluations",
    "issues",
    "client_refs",
    "outbox",
    "quarantine",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def path(tmp_path: Path) -> str:
    return database_for(tmp_path / "receiver.db")


@pytest.fixture
def store(path: str) -> Iterator[Store]:
    opened = Store(path)
    opened.open()
    try:
        yield opened
    finally:
        opened.close()


def body_of(value: dict[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def delivery(value: dict[str, Any] | bytes, **extra: Any) -> Delivery:
    body = body_of(value)
    return Delivery(body=body, callback=normalize(parse_body(body)), **extra)


async def ingest_all(store: Store, *values: dict[str, Any] | bytes) -> list[Receipt]:
    """Ingest one after the other (each acknowledged before the next is sent)."""
    return [await store.ingest(delivery(value)) for value in values]


def query(path: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def evaluation(
    evaluation_id: str,
    status: str = "completed",
    *,
    client_ref: str | None = "ref-1",
    second: int = 0,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "id": evaluation_id,
        "status_code": status,
        "client_ref": client_ref,
        "completed_at": f"2026-11-20T09:00:{second:02d}+00:00"
        if status in ("completed", "failed")
        else None,
        "updated_at": f"2026-11-20T09:00:{second:02d}+00:00",
        **fields,
    }


def pointers(path: str, client_ref: str) -> tuple[Any, ...] | None:
    found = query(
        path,
        "SELECT current_evaluation_id, latest_evaluation_id, latest_status, evaluations"
        " FROM client_refs WHERE client_ref = ?",
        client_ref,
    )
    return found[0] if found else None


def row(path: str, evaluation_id: str) -> dict[str, Any]:
    conn = connect(path)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM evaluations WHERE id = ?", (evaluation_id,)).fetchone()
        assert found is not None, evaluation_id
        return dict(found)
    finally:
        conn.close()


# schema and migrations


@sqlite_only
@pytest.mark.anyio
async def test_migration_10_repairs_what_earlier_versions_wrote(path: str) -> None:
    """An evaluation stuck before migration 3 (its poll column added empty) gets its first
    reconciliation poll; a score that is no pass rate leaves the score column and the
    rollups."""
    store = Store(path)
    store.open()
    try:
        await ingest_all(
            store,
            evaluation("stuck", "running"),
            evaluation("rated", weighted_pass_rate=0.5),
            evaluation("odd", weighted_pass_rate=0.5),
        )
    finally:
        store.close()
    conn = connect(path)
    conn.execute("UPDATE evaluations SET next_poll_at = NULL WHERE id = 'stuck'")
    conn.execute("UPDATE evaluations SET score = 62.0 WHERE id = 'odd'")
    rollups.rebuild(conn)  # as the version before counted it
    conn.execute("DELETE FROM migrations WHERE version = 10")
    conn.commit()
    conn.close()
    assert Store(path).migrate() == [10]
    assert [
        tuple(r) for r in query(path, "SELECT id, next_poll_at FROM evaluations WHERE id = 'stuck'")
    ] == [("stuck", row(path, "stuck")["updated_at"])]
    assert row(path, "odd")["score"] is None
    assert Store(path).stats(EvaluationFilter())["mean_score"] == 0.5


def migrated_to(path: str, last: int) -> None:
    """The schema as a receiver of version `last` left it, on either backend."""
    if POSTGRES:
        from receiver.store import pg_schema

        conn = connect(path)
        conn.execute("DROP SCHEMA public CASCADE")  # the test database comes migrated
        conn.execute("CREATE SCHEMA public")
        conn.execute(
            "CREATE TABLE migrations (version bigint PRIMARY KEY, name text, applied_at text)"
        )
        for version, name, statements in pg_schema.MIGRATIONS[:last]:
            for statement in statements:
                if isinstance(statement, str):
                    cast(Any, conn).raw.execute(statement)  # as written: not translated
                else:
                    statement(cast(Any, conn))
            conn.execute("INSERT INTO migrations VALUES (?, ?, 'x')", (version, name))
        conn.close()
        return
    db = Database(sqlite3.connect(path))
    for version, name, step in MIGRATIONS[:last]:
        step(db)
        db["migrations"].insert({"version": version, "name": name, "applied_at": "x"})
    db.conn.commit()
    db.conn.close()


@pytest.mark.anyio
async def test_migration_11_searches_labels_written_before_as_text(path: str) -> None:
    """Rows written as JSON only get their searchable text; a label's NUL, which the JSON
    functions cut (SQLite) or refuse (PostgreSQL), becomes U+FFFD as normalize now makes it;
    the rollups are rebuilt (on PostgreSQL they may still count a score migration 10 cleared
    from the rows)."""
    migrated_to(path, 10)
    conn = connect(path)
    labelled = [
        ("e-1", '["5\\" crop","a\\u0000b"]', 0.5),
        ("e-2", '["Left hand"]', 62.0),
        ("e-3", None, None),
        ("e-4", "[]", None),
    ]
    for evaluation_id, labels, score in labelled:
        conn.execute(
            "INSERT INTO evaluations (id, status, top_issues, score, received_at, updated_at,"
            " data) VALUES (?, 'completed', ?, ?, '2026-11-20T09:00:00.000000Z',"
            " '2026-11-20T09:00:00.000000Z', '{}')",
            (evaluation_id, labels, score),
        )
    if POSTGRES:  # as a receiver before migration 10 counted it, and 10 cleared only the row
        conn.execute("UPDATE evaluations SET top_issues = '[]' WHERE id = 'e-1'")
        rollups.rebuild(conn)
        conn.execute("UPDATE evaluations SET score = NULL WHERE id = 'e-2'")
        conn.execute("UPDATE evaluations SET top_issues = ? WHERE id = 'e-1'", (labelled[0][1],))
    else:
        conn.execute("UPDATE evaluations SET score = NULL WHERE id = 'e-2'")
        rollups.rebuild(conn)
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.migrate() == [version for version in VERSIONS if version >= 11]
    for text, found in (('5" crop', ["e-1"]), ("left", ["e-2"]), ("[", []), ('","', [])):
        assert [item["id"] for item in store.list_evaluations(EvaluationFilter(q=text))[0]] == (
            found
        ), text
    overview = store.stats(EvaluationFilter())
    assert [label["label"] for label in overview["top_issues"]] == [
        '5" crop',
        "Left hand",
        "a\ufffdb",
    ]
    assert overview["mean_score"] == 0.5
    conn = connect(path)
    try:
        assert overview == scan_stats(conn, EvaluationFilter(), exact=True)
    finally:
        conn.close()


# Migration 13: rows the merge before it wrote, each verdict keeping the other's fields.
COMPLETED_VERDICT = {
    "overall_passed": True,
    "weighted_pass_rate": 0.9,
    "top_issues": ["Collar asymmetry"],
    "cost": "0.0400",
    "judges": [{"name": "anatomy", "issues": [{"category": "anatomy", "detail": "hand"}]}],
}
CF_VERDICT = {**COMPLETED_VERDICT, "weighted_pass_rate": 0.5}  # counted: mean 0.8, not 0.9


@pytest.mark.anyio
async def test_migration_13_gives_each_verdict_only_its_own_fields(path: str) -> None:
    """A failed evaluation that kept a completed verdict's pass, score, labels, cost and
    judges, and a completed one that kept a failed verdict's failure_code, are rewritten as
    merge now leaves them: their columns, issues, statistics, search, client_ref pointers and
    API answer follow; no forward is queued or queued again, and no other row is touched."""
    sink = SinkSpec(name="s", type="http", url="https://a.example.com/hooks")
    store = Store(path, forwarding=Forwarding(sinks=(sink,)))
    store.open()
    try:
        await ingest_all(
            store,
            evaluation("cf", client_ref="ref-cf", second=1, **CF_VERDICT),
            evaluation("cf", "failed", client_ref="ref-cf", second=2, failure_code="timed_out"),
            evaluation("fc", "failed", client_ref="ref-fc", second=1, failure_code="timed_out"),
            evaluation("fc", client_ref="ref-fc", second=2, **COMPLETED_VERDICT),
            evaluation("own", failure_code="processing_failed", **COMPLETED_VERDICT),
            evaluation("ok", "failed", failure_code="invalid_media"),
            evaluation("fine", **COMPLETED_VERDICT),
        )
    finally:
        store.close()
    conn = connect(path)
    # As the merge before migration 13 left them: apply_evaluation keeps the columns, issue
    # rows, rollups, text index and client_ref pointers in step with what it writes.
    stale = {"cf": CF_VERDICT, "fc": {"failure_code": "timed_out"}}
    for evaluation_id, kept in stale.items():
        (data,) = conn.execute("SELECT data FROM evaluations WHERE id = ?", (evaluation_id,))
        apply_module.apply_evaluation(
            conn, {**json.loads(data[0]), **kept}, source="webhook", stamp=now()
        )
    conn.execute("UPDATE outbox SET state = 'done', attempts = 1 WHERE event_type LIKE '%failed'")
    conn.execute("DELETE FROM migrations WHERE version = 13")
    conn.commit()
    assert (row(path, "cf")["passed"], row(path, "fc")["failure_code"]) == (1, "timed_out")
    before = {r[0]: r[1] for r in query(path, "SELECT id, updated_at FROM evaluations")}
    forwards = [tuple(r) for r in query(path, "SELECT * FROM outbox ORDER BY id")]
    conn.close()

    store = Store(path)
    assert store.migrate() == [13]
    try:
        cf = store.get_evaluation("cf")
        fc = store.get_evaluation("fc")
        assert cf is not None
        assert fc is not None
        assert {key: cf["evaluation"][key] for key in ("status", "passed", "score")} == {
            "status": "failed",
            "passed": None,
            "score": None,
        }
        assert (cf["evaluation"]["failure_code"], cf["evaluation"]["top_issues"]) == (
            "timed_out",
            [],
        )
        assert {
            key: cf["evaluation"]["runflow"][key] for key in COMPLETED_VERDICT
        } == dict.fromkeys(COMPLETED_VERDICT)
        assert cf["issues"] == []
        assert (fc["evaluation"]["status"], fc["evaluation"]["passed"]) == ("completed", True)
        assert fc["evaluation"]["failure_code"] is None
        assert fc["evaluation"]["runflow"]["failure_code"] is None
        assert [issue["category"] for issue in fc["issues"]] == ["anatomy"]
        passed = store.list_evaluations(EvaluationFilter(passed=True))[0]
        assert sorted(item["id"] for item in passed) == ["fc", "fine", "own"]
        timed_out = store.list_evaluations(EvaluationFilter(failure_code="timed_out"))[0]
        assert [item["id"] for item in timed_out] == ["cf"]
        collar = store.list_evaluations(EvaluationFilter(q="collar"))[0]
        assert sorted(item["id"] for item in collar) == ["fc", "fine", "own"]
        overview = store.stats(EvaluationFilter())
    finally:
        store.close()
    assert overview["by_status"] == {"completed": 3, "failed": 2}
    assert (overview["passed"], overview["mean_score"]) == (3, 0.9)
    assert {entry["failure_code"]: entry["count"] for entry in overview["failure_codes"]} == {
        "timed_out": 1,
        "invalid_media": 1,
        "processing_failed": 1,
    }
    assert [(entry["category"], entry["count"]) for entry in overview["top_issue_categories"]] == [
        ("anatomy", 3)
    ]
    conn = connect(path)
    try:
        assert overview == scan_stats(conn, EvaluationFilter(), exact=True)
        latest = "SELECT latest_passed, latest_score FROM client_refs WHERE client_ref = ?"
        assert [tuple(r) for r in query(path, latest, "ref-cf")] == [(None, None)]
    finally:
        conn.close()
    after = {r[0]: r[1] for r in query(path, "SELECT id, updated_at FROM evaluations")}
    assert {key for key in before if after[key] != before[key]} == {"cf", "fc"}
    assert [tuple(r) for r in query(path, "SELECT * FROM outbox ORDER BY id")] == forwards
    # The forwards still pending go out as their own verdicts: fc's from its repaired state,
    # cf's older completed one from its own callback, as before.
    conn = connect(path)
    try:
        stamp = now()
        claims = claim_forwards(
            conn, "s", now=stamp, lease_until=stamp, refetch_cutoff=stamp, limit=10
        )
    finally:
        conn.close()
    built = {
        claim.fields["id"]: build_event(
            claim.fields, claim.event_type, refetched=False, received_at=stamp
        )["data"]
        for claim in claims
    }
    assert {
        key: {k: data[k] for k in ("status", "passed", "score", "failure_code")}
        for key, data in built.items()
        if key in ("cf", "fc")
    } == {
        "cf": {"status": "completed", "passed": True, "score": 0.5, "failure_code": None},
        "fc": {"status": "completed", "passed": True, "score": 0.9, "failure_code": None},
    }


class Recording:
    """A connection that keeps the statements run through it, to EXPLAIN them after."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.statements.append((sql, params))
        return self.conn.execute(sql, params)


def plan(conn: sqlite3.Connection, sql: str, params: Any) -> str:
    """The plan of a statement, one line per step; on PostgreSQL with sequential scans off,
    since the planner rightly prefers one on a table this small."""
    if POSTGRES:
        conn.execute("SET enable_seqscan = off")
        return "\n".join(row[0] for row in conn.execute(f"EXPLAIN {sql}", params))
    return "\n".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


@pytest.mark.anyio
async def test_migration_12_indexes_the_changes_for_the_live_tables(path: str) -> None:
    """A database from before migration 12 gets the changes index, and a live table's poll
    (what changed since, with the page's filters) walks it instead of the whole table."""
    store = Store(path)
    store.open()
    try:
        await ingest_all(store, evaluation("e-1"), evaluation("e-2", "failed", second=1))
    finally:
        store.close()
    conn = connect(path)
    try:
        conn.execute("DROP INDEX idx_evaluations_updated_at_id")
        conn.execute("DELETE FROM migrations WHERE version = 12")
        conn.commit()
        assert Store(path).migrate() == [12]
        conn.row_factory = sqlite3.Row
        recording = Recording(conn)
        where = EvaluationFilter(changed_since="2000-01-01T00:00:00.000000Z", status="failed")
        items, _ = list_changes(cast(sqlite3.Connection, recording), where, 10, flag=True)
        assert [(item["id"], item["matches"]) for item in items] == [("e-1", False), ("e-2", True)]
        [(sql, params)] = recording.statements
        assert "idx_evaluations_updated_at_id" in plan(conn, sql, params)
    finally:
        conn.close()


def test_migration_14_folds_the_repeats_of_a_quarantined_body(path: str) -> None:
    """Before it every repeat of a signed but unusable body was a row of its own: each body is
    kept once, in its first row, with how often and when last it came."""
    store = Store(path)
    store.migrate()
    conn = connect(path)
    try:
        conn.execute("DROP INDEX idx_quarantine_sha256")
        conn.execute("ALTER TABLE quarantine DROP COLUMN receipts")
        conn.execute("ALTER TABLE quarantine DROP COLUMN last_received_at")
        conn.execute("DELETE FROM migrations WHERE version = 14")
        for n, body in enumerate([b"x", b"y", b"x", b"x"], start=1):
            conn.execute(
                "INSERT INTO quarantine (received_at, request_id, reason, sha256, headers, body)"
                " VALUES (?, ?, 'bad', ?, '{}', ?)",
                (f"2026-11-2{n}T00:00:00.000000Z", f"req-{n}", body.hex(), body),
            )
        conn.commit()
    finally:
        conn.close()
    assert Store(path).migrate() == [14]
    assert query(
        path, "SELECT request_id, receipts, last_received_at FROM quarantine ORDER BY id"
    ) == [("req-1", 3, "2026-11-24T00:00:00.000000Z"), ("req-2", 1, None)]


def test_a_schema_newer_than_this_receiver_is_refused(path: str) -> None:
    """An older receiver on a database a newer one migrated: refused, not run on it."""
    store = Store(path)
    store.migrate()
    conn = connect(path)
    conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (99, 'x', 'y')")
    conn.commit()
    conn.close()
    for attempt in (store.migrate, store.check_schema):
        with pytest.raises(ConfigError, match=r"a newer receiver migrated it \(schema version 99;"):
            attempt()


def test_reading_does_not_migrate(path: str) -> None:
    """A read-only command must not upgrade a database under a server of the version before."""
    store = Store(path)
    store.migrate()
    conn = connect(path)
    conn.execute("DELETE FROM migrations WHERE version = ?", (VERSIONS[-1],))
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match=r"run `receiver migrate`"):
        store.check_schema()
    assert (
        max(version for (version,) in query(path, "SELECT version FROM migrations"))
        == (VERSIONS[-2])
    )


@sqlite_only
def test_migrate_is_idempotent(path: str) -> None:
    store = Store(path)
    assert store.migrate() == VERSIONS
    assert store.migrate() == []
    assert Store(path).migrate() == []
    applied = query(path, "SELECT version, name FROM migrations ORDER BY version")
    assert applied == [(version, name) for version, name, _ in MIGRATIONS]
    assert applied[0] == (1, "core tables")


@sqlite_only
def test_migrate_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "receiver.db"
    assert Store(str(path)).migrate() == VERSIONS
    assert path.is_file()


@sqlite_only
def test_the_file_is_wal_and_plain_tables(store: Store, path: str) -> None:
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert set(Database(path).table_names()) >= TABLES
    definitions = query(path, "SELECT name, sql FROM sqlite_master WHERE type = 'table'")
    for name, sql in definitions:
        # the one exception: the text index for `q` (FTS5, which Datasette also searches with)
        text_index = name == "evaluations_fts" and "USING fts5" in sql
        assert sql.startswith("CREATE TABLE") or text_index, name
    for table in TABLES:
        assert query(path, f"SELECT count(*) FROM [{table}]") == [
            (len(VERSIONS) if table == "migrations" else 0,)
        ]


@sqlite_only
def test_writers_in_other_processes_take_turns_on_the_lock_file(path: str) -> None:
    """Another process's writer holds its turn (an flock of the lock file): this one waits,
    then writes as soon as the turn is free."""
    store = Store(path)
    store.open()
    other = os.open(f"{path}-writer.lock", os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        written = store.writer.submit(lambda conn: conn.execute("SELECT 1").fetchone()[0])
        with pytest.raises(TimeoutError):
            written.result(timeout=0.3)
        fcntl.flock(other, fcntl.LOCK_UN)
        assert written.result(timeout=10) == 1
    finally:
        os.close(other)
        store.close()


def test_writes_after_close_are_refused(path: str) -> None:
    store = Store(path)
    store.open()
    store.close()
    with pytest.raises(StoreUnavailable, match="the store is closed"):
        asyncio.run(store.ingest(delivery(evaluation("e-1"))))


# the ingest transaction


@pytest.mark.anyio
async def test_a_delivery_is_kept_byte_for_byte(store: Store, path: str) -> None:
    body = fixture("evaluation-completed.json")
    receipt = await store.ingest(
        delivery(body, headers={"runflow-request-id": "req-7"}, request_id="req-7", secret_index=1)
    )
    assert receipt == Receipt("stored", 1, COMPLETED_ID)
    [(stored, request_id, secret_index, kind, event, outcome, headers)] = query(
        path,
        "SELECT body, request_id, secret_index, kind, event, outcome, headers FROM deliveries",
    )
    assert stored == body
    assert (request_id, secret_index, kind, event, outcome) == (
        "req-7",
        1,
        "evaluation",
        "evaluation.completed",
        "stored",
    )
    assert json.loads(headers) == {"runflow-request-id": "req-7"}


@pytest.mark.anyio
async def test_nul_characters_in_fields_are_stored_not_refused(store: Store, path: str) -> None:
    """JSON may carry "\\u0000"; PostgreSQL's text cannot hold it, so its columns get U+FFFD
    while the delivery keeps the exact bytes. Refusing would be a 503 retried forever."""
    body = json.dumps({**json.loads(fixture("evaluation-completed.json")), "client_ref": "a\x00b"})
    [receipt] = await ingest_all(store, body.encode())
    assert receipt.outcome == "stored"
    [(client_ref,)] = query(path, "SELECT client_ref FROM evaluations")
    assert client_ref in ("a\x00b", "a\ufffdb")
    assert query(path, "SELECT body FROM deliveries") == [(body.encode(),)]


@pytest.mark.anyio
async def test_a_nul_in_an_issue_label_keeps_the_overview_working(store: Store) -> None:
    """PostgreSQL's JSON functions refuse "\\u0000" (the overview failed for good), SQLite's
    cut the label there: labels are stored with U+FFFD, on both, as are their counts."""
    body = {**json.loads(fixture("evaluation-completed.json")), "top_issues": ["a\x00b", "c"]}
    await ingest_all(store, body)
    for where in (EvaluationFilter(), EvaluationFilter(q="b")):
        assert [label["label"] for label in store.stats(where)["top_issues"]] == ["a\ufffdb", "c"]
    assert store.list_evaluations(EvaluationFilter(q="a\ufffdb"))[0][0]["top_issues"] == [
        "a\ufffdb",
        "c",
    ]


@pytest.mark.anyio
async def test_a_run_callback_is_stored_and_ignored(store: Store, path: str) -> None:
    [receipt] = await ingest_all(store, fixture("run-completed.json"))
    assert receipt == Receipt("ignored", 1, None)
    assert query(path, "SELECT kind, event, outcome FROM deliveries") == [
        ("run", "run.completed", "ignored")
    ]
    assert query(path, "SELECT count(*) FROM evaluations") == [(0,)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "first", "evaluations"),
    [("evaluation-completed.json", "stored", 1), ("run-completed.json", "ignored", 0)],
)
async def test_the_same_bytes_again_are_a_duplicate(
    store: Store, path: str, name: str, first: str, evaluations: int
) -> None:
    body = fixture(name)
    receipts = await ingest_all(store, body, body, body)
    assert [r.outcome for r in receipts] == [first, "duplicate", "duplicate"]
    assert {r.delivery_id for r in receipts} == {1}
    assert query(path, "SELECT receipts FROM deliveries") == [(3,)]
    assert query(path, "SELECT count(*) FROM evaluations") == [(evaluations,)]


@pytest.mark.anyio
async def test_other_bytes_for_the_same_evaluation_are_a_new_delivery(store: Store) -> None:
    """The key is (evaluation_id, sha256): an envelope and a full body of one evaluation are
    two deliveries, as are two run callbacks that differ."""
    run = json.loads(fixture("run-completed.json"))
    receipts = await ingest_all(
        store,
        fixture("evaluation-completed-envelope.json"),
        fixture("evaluation-completed.json"),
        fixture("run-completed.json"),
        {**run, "extra": 1},
    )
    assert [r.outcome for r in receipts] == ["stored", "stored", "ignored", "ignored"]
    assert [r.delivery_id for r in receipts] == [1, 2, 3, 4]


@sqlite_only
@pytest.mark.anyio
async def test_a_body_stored_before_migration_9_is_still_a_duplicate(path: str) -> None:
    """Upgrading from the sha256 key to (evaluation_id, sha256) keeps every stored delivery's
    dedupe."""
    body = fixture("evaluation-completed.json")
    conn = sqlite3.connect(path)
    db = Database(conn)
    for version, name, step in MIGRATIONS[:8]:
        step(db)
        db["migrations"].insert({"version": version, "name": name, "applied_at": "2026-01-01"})
    conn.execute(
        "INSERT INTO deliveries (received_at, receipts, source, sha256, kind, event,"
        " evaluation_id, outcome, body) VALUES ('2026-01-01T00:00:00Z', 1, 'webhook', ?,"
        " 'evaluation', 'evaluation.completed', ?, 'stored', ?)",
        (hashlib.sha256(body).hexdigest(), COMPLETED_ID, body),
    )
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.migrate() == [version for version in VERSIONS if version >= 9]
    store.open()
    try:
        assert await ingest_all(store, body) == [Receipt("duplicate", 1, COMPLETED_ID)]
    finally:
        store.close()
    indexes = {name for (name,) in query(path, "SELECT name FROM pragma_index_list('deliveries')")}
    assert indexes >= {"idx_deliveries_evaluation_id_sha256", "idx_deliveries_run_sha256"}
    assert not indexes & {"idx_deliveries_sha256", "idx_deliveries_evaluation_id"}
    [plan] = query(
        path, "EXPLAIN QUERY PLAN SELECT id FROM deliveries WHERE evaluation_id = ?", COMPLETED_ID
    )
    assert "idx_deliveries_evaluation_id_sha256" in plan[-1]


@pytest.mark.anyio
async def test_a_quarantined_body_is_kept(store: Store, path: str) -> None:
    quarantine_id = await store.quarantine(b"not json", "body is not valid JSON", {}, "req-1")
    assert quarantine_id == 1
    assert query(path, "SELECT body, reason, request_id FROM quarantine") == [
        (b"not json", "body is not valid JSON", "req-1")
    ]


@pytest.mark.anyio
async def test_a_quarantined_body_sent_again_is_counted_not_kept_again(
    store: Store, path: str
) -> None:
    """Runflow tries a 400 again, and a captured body can be replayed: kept once."""
    reason = "body is not valid JSON"
    first = await store.quarantine(b"not json", reason, {}, "req-1")
    again = [await store.quarantine(b"not json", reason, {}, f"req-{n}") for n in (2, 3)]
    other = await store.quarantine(b"[]", "body is not a JSON object", {}, "req-4")
    assert again == [first, first]
    assert query(path, "SELECT id, request_id, receipts FROM quarantine ORDER BY id") == [
        (first, "req-1", 3),
        (other, "req-4", 1),
    ]


# state rules, end to end


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("first", "second"),
    [("completed", "running"), ("completed", "pending"), ("failed", "running")],
)
async def test_a_late_non_terminal_body_never_regresses(
    store: Store, path: str, first: str, second: str
) -> None:
    await ingest_all(
        store,
        evaluation("e-1", first, second=5, weighted_pass_rate=0.8),
        evaluation("e-1", second, second=9, run_id="r-1"),
    )
    stored = row(path, "e-1")
    assert (stored["status"], stored["score"], stored["run_id"]) == (first, 0.8, "r-1")
    assert stored["event"] == f"evaluation.{first}"
    assert json.loads(stored["data"])["status_code"] == first


@pytest.mark.anyio
async def test_the_envelope_then_the_full_body_merge(store: Store, path: str) -> None:
    await ingest_all(
        store,
        fixture("evaluation-completed-envelope.json"),
        fixture("evaluation-completed.json"),
    )
    found = store.get_evaluation(COMPLETED_ID)
    assert found is not None
    runflow = found["evaluation"]["runflow"]
    assert runflow["status_code"] == "completed"
    assert runflow["task_type"] == "headshot"
    assert runflow["cost"] == "0.0400"
    assert "status" not in runflow
    assert "event" not in runflow
    assert found["evaluation"]["task_type"] == "headshot"
    assert [d["kind"] for d in found["deliveries"]] == ["evaluation", "evaluation"]


@pytest.mark.anyio
async def test_the_full_body_then_the_envelope_keeps_every_field(store: Store) -> None:
    await ingest_all(
        store,
        fixture("evaluation-completed.json"),
        fixture("evaluation-completed-envelope.json"),
    )
    found = store.get_evaluation(COMPLETED_ID)
    assert found is not None
    full = json.loads(fixture("evaluation-completed.json"))
    assert set(full) <= set(found["evaluation"]["runflow"])
    assert found["evaluation"]["runflow"]["cost"] == "0.0400"


PARENT = evaluation("e-1", second=1, attempt_number=1, weighted_pass_rate=0.3)
CHILD = evaluation(
    "e-2", second=9, attempt_number=2, parent_evaluation_id="e-1", weighted_pass_rate=0.9
)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "order", [(PARENT, CHILD), (CHILD, PARENT)], ids=["parent-first", "child-first"]
)
async def test_a_newer_attempt_supersedes_its_parent(
    store: Store, path: str, order: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    await ingest_all(store, *order)
    assert (row(path, "e-1")["superseded"], row(path, "e-2")["superseded"]) == (1, 0)
    assert pointers(path, "ref-1") == ("e-2", "e-2", "completed", 2)
    await ingest_all(store, {**PARENT, "redelivered": True})
    assert row(path, "e-1")["superseded"] == 1
    assert pointers(path, "ref-1") == ("e-2", "e-2", "completed", 2)


@pytest.mark.anyio
async def test_superseded_at_from_runflow_is_sticky(store: Store, path: str) -> None:
    await ingest_all(
        store,
        evaluation("e-1", second=5, superseded_at="2026-11-20T09:00:05+00:00"),
        evaluation("e-1", second=9, superseded_at=None),
    )
    stored = row(path, "e-1")
    assert (stored["superseded"], stored["superseded_at"]) == (1, "2026-11-20T09:00:05.000000Z")
    assert pointers(path, "ref-1") == (None, "e-1", "completed", 1)


# client_refs: current = completed and not superseded; latest = the most recent verdict


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bodies", "expected"),
    [
        ([evaluation("e-1", "failed")], (None, "e-1", "failed", 1)),
        ([evaluation("e-1", "running")], (None, "e-1", "running", 1)),
        (
            [evaluation("e-1", "pending"), evaluation("e-1", "completed")],
            ("e-1", "e-1", "completed", 1),
        ),
        (
            [evaluation("e-1", second=1), evaluation("e-2", "failed", second=2)],
            ("e-1", "e-2", "failed", 2),
        ),
        (
            [evaluation("e-1", second=2), evaluation("e-2", second=1)],
            ("e-1", "e-1", "completed", 2),
        ),
        (
            [evaluation("e-1", second=1), evaluation("e-2", "running", second=5)],
            ("e-1", "e-1", "completed", 2),
        ),
        (
            [evaluation("e-1", second=1), evaluation("e-2", "pending", second=5, status_code=None)],
            ("e-1", "e-1", "completed", 2),
        ),
        (
            [
                evaluation("e-1", second=1),
                evaluation("e-2", "running", second=2, parent_evaluation_id="e-1"),
            ],
            (None, "e-1", "completed", 2),
        ),
        (
            [
                evaluation("e-1", second=1),
                evaluation("e-2", "running", second=2, parent_evaluation_id="e-1"),
                evaluation("e-2", "completed", second=3, parent_evaluation_id="e-1"),
            ],
            ("e-2", "e-2", "completed", 2),
        ),
        (
            [
                evaluation("e-1", second=1),
                evaluation("e-2", "failed", second=3, parent_evaluation_id="e-1"),
            ],
            (None, "e-2", "failed", 2),
        ),
        (
            [
                evaluation("e-1", second=1),
                evaluation("e-2", "completed", second=3, parent_evaluation_id="e-1"),
                evaluation("e-3", "completed", second=5, parent_evaluation_id="e-2"),
            ],
            ("e-3", "e-3", "completed", 3),
        ),
    ],
    ids=[
        "failed-is-never-current",
        "running-is-latest-when-alone",
        "completes-later",
        "newer-failure-is-latest-older-success-current",
        "latest-by-completed-at-not-arrival",
        "running-is-not-a-verdict",
        "no-status-is-not-a-verdict",
        "running-retry-supersedes-at-once",
        "current-moves-to-the-completed-retry",
        "failed-retry-leaves-nothing-current",
        "chain-of-retries",
    ],
)
async def test_client_ref_pointers(
    store: Store, path: str, bodies: list[dict[str, Any]], expected: tuple[Any, ...]
) -> None:
    await ingest_all(store, *bodies)
    assert pointers(path, "ref-1") == expected
    found = store.get_client_ref("ref-1")
    assert found is not None
    current = found["current"]["id"] if found["current"] else None
    assert (current, found["latest"]["id"], found["total"]) == (
        expected[0],
        expected[1],
        expected[3],
    )


@pytest.mark.anyio
async def test_same_client_ref_is_separate_rows(store: Store, path: str) -> None:
    await ingest_all(store, evaluation("e-1", second=1), evaluation("e-2", second=2))
    assert query(path, "SELECT id FROM evaluations WHERE client_ref = 'ref-1' ORDER BY id") == [
        ("e-1",),
        ("e-2",),
    ]
    found = store.get_client_ref("ref-1")
    assert found is not None
    assert {e["id"] for e in found["evaluations"]} == {"e-1", "e-2"}
    assert store.get_client_ref("ref-2") is None


@pytest.mark.anyio
async def test_a_client_ref_that_changes_updates_both_refs(store: Store, path: str) -> None:
    await ingest_all(
        store,
        evaluation("e-1", "running", client_ref="old", second=1),
        evaluation("e-1", "completed", client_ref="new", second=2),
    )
    assert pointers(path, "new") == ("e-1", "e-1", "completed", 1)
    assert pointers(path, "old") is None


@pytest.mark.anyio
async def test_an_evaluation_without_client_ref_has_no_pointer(store: Store, path: str) -> None:
    await ingest_all(store, evaluation("e-1", client_ref=None))
    assert query(path, "SELECT count(*) FROM client_refs") == [(0,)]


# issues


@pytest.mark.anyio
async def test_issues_come_from_the_judges(store: Store, path: str) -> None:
    await ingest_all(store, fixture("get-evaluation-embedded.json"))
    sql = "SELECT judge, category, subcategory, detail FROM issues ORDER BY id"
    assert query(path, sql) == [
        ("anatomy", "anatomy", "hands", "Left hand has six fingers"),
        ("wardrobe", "garment", "collar", "Collar asymmetry <@U123> & <!channel>"),
    ]
    await ingest_all(store, fixture("evaluation-completed.json"))
    assert len(query(path, sql)) == 2
    newer = json.loads(fixture("get-evaluation-embedded.json"))
    newer["updated_at"] = "2026-11-21T00:00:00+00:00"
    newer["judges"] = [{"name": "anatomy", "issues": [{"category": "anatomy", "detail": "ok"}]}]
    await ingest_all(store, newer)
    assert query(path, sql) == [("anatomy", "anatomy", None, "ok")]
    older = {**newer, "updated_at": "2026-11-19T00:00:00+00:00", "judges": []}
    await ingest_all(store, older)
    assert query(path, sql) == [("anatomy", "anatomy", None, "ok")]


@pytest.mark.anyio
async def test_a_read_sees_one_commit_not_two(
    store: Store, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer commits whenever it likes, between two statements of a read too: the
    evaluation's row read before the refetch is applied, its issues after. What a read answers
    must be one state of the database: the callback's (no judges, no issues) or the refetch's."""
    from receiver.store import queries

    await ingest_all(store, fixture("evaluation-completed.json"))
    evaluation_id = COMPLETED_ID
    refetch = normalize(parse_body(fixture("get-evaluation-embedded.json"))).fields
    item = queries.item

    def refetch_applied_meanwhile(row: Any) -> dict[str, Any]:
        monkeypatch.setattr(queries, "item", item)
        store.writer.submit(
            partial(
                apply_module.apply_evaluation,
                fields=refetch,
                source="refetch",
                stamp="2026-11-20T09:20:00.000000Z",
                refetched=True,
            )
        ).result(timeout=10)
        return item(row)

    monkeypatch.setattr(queries, "item", refetch_applied_meanwhile)
    found = store.get_evaluation(evaluation_id)
    assert found is not None
    shown = (found["evaluation"]["refetched"], len(found["issues"]))
    assert shown == (False, 0)  # the state when the read began
    after = store.get_evaluation(evaluation_id)
    assert after is not None
    assert (after["evaluation"]["refetched"], len(after["issues"])) == (True, 2)


# many at once


@pytest.mark.anyio
async def test_concurrent_ingests_are_each_stored_once(store: Store, path: str) -> None:
    bodies = [body_of(evaluation(f"e-{n:03d}", client_ref=f"ref-{n % 10}")) for n in range(150)]
    sent = bodies + bodies
    receipts = await asyncio.gather(*(store.ingest(delivery(body)) for body in sent))
    by_id: dict[str | None, list[str]] = {}
    for receipt in receipts:
        by_id.setdefault(receipt.evaluation_id, []).append(receipt.outcome)
    assert len(by_id) == 150
    assert all(sorted(outcomes) == ["duplicate", "stored"] for outcomes in by_id.values())
    assert query(path, "SELECT count(*), sum(receipts) FROM deliveries") == [(150, 300)]
    assert query(path, "SELECT count(*), count(DISTINCT id) FROM evaluations") == [(150, 150)]
    assert query(path, "SELECT sum(evaluations) FROM client_refs") == [(150,)]
    delivery_ids = {r.delivery_id for r in receipts}
    assert delivery_ids == set(range(1, 151))


@pytest.mark.anyio
async def test_one_bad_operation_fails_alone(store: Store, path: str) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (99, 'x', 'y')")
        raise ValueError("boom")

    results = await asyncio.gather(
        store.ingest(delivery(evaluation("e-1"))),
        store.writer.run(boom),
        store.ingest(delivery(evaluation("e-2"))),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert [r.outcome for r in results if isinstance(r, Receipt)] == ["stored", "stored"]
    assert [version for (version,) in query(path, "SELECT version FROM migrations")] == VERSIONS


@pytest.mark.anyio
async def test_a_batch_with_a_bad_operation_keeps_the_others_once(store: Store, path: str) -> None:
    """One batch of three, the middle one failing: the others' results and writes are kept,
    once each."""

    def good(version: int) -> Callable[[sqlite3.Connection], int]:
        def operation(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO migrations (version, name, applied_at) VALUES (?, 'x', 'y')",
                (version,),
            )
            return version

        return operation

    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (99, 'x', 'y')")
        raise ValueError("boom")

    hold = threading.Event()
    busy = store.writer.schedule(lambda conn: hold.wait(5))
    await asyncio.sleep(0.05)  # the writer is inside `busy`: the next three make one batch
    batch = [store.writer.schedule(operation) for operation in (good(100), boom, good(101))]
    hold.set()
    results = await asyncio.gather(busy, *batch, return_exceptions=True)
    assert results[1::2] == [100, 101]
    assert isinstance(results[2], ValueError)
    versions = [version for (version,) in query(path, "SELECT version FROM migrations")]
    assert versions == [*VERSIONS, 100, 101]


@pytest.mark.anyio
@pytest.mark.parametrize("failing", [False, True], ids=["all-good", "one-failing"])
async def test_acks_in_one_batch_each_get_their_own_answer(
    store: Store, path: str, failing: bool
) -> None:
    """Acks answer Later: a batch of them sends every statement before reading any answer (one
    pipeline on PostgreSQL). A body twice in the batch, one stored before it, and a failing
    operation among them: each caller still gets its own answer."""
    await store.accept(delivery(evaluation("e-0")))

    def clash(conn: sqlite3.Connection) -> Later[int]:
        sent = conn.execute(
            "INSERT INTO migrations (version, name, applied_at) VALUES (1, 'x', 'y')"
            " RETURNING version"
        )
        return Later(lambda: int(sent.fetchone()[0]))

    hold = threading.Event()
    busy = store.writer.schedule(lambda conn: hold.wait(5))
    await asyncio.sleep(0.05)  # the writer is inside `busy`: the next ones make one batch
    acks = [store.accepting(delivery(evaluation(name))) for name in ("e-1", "e-1", "e-0")]
    failed = store.writer.defer(clash) if failing else None
    hold.set()
    await busy
    first, again, before = await asyncio.gather(*acks)
    assert (first.outcome, again.outcome, before.outcome) == ("stored", "duplicate", "duplicate")
    assert again.delivery_id == first.delivery_id
    if failed is not None:
        with pytest.raises(StoreUnavailable):
            await failed
    receipts = query(path, "SELECT evaluation_id, receipts FROM deliveries ORDER BY id")
    assert [tuple(row) for row in receipts] == [("e-0", 2), ("e-1", 2)]


class Stop(BaseException):
    """Not an Exception: what a bug in an operation could raise."""


@pytest.mark.anyio
async def test_an_operation_raising_a_base_exception_fails_alone(store: Store, path: str) -> None:
    """The one writer must not die, nor leave the transaction open: the caller is answered,
    nothing of it stays, and the next operation runs."""

    def stops(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (98, 'x', 'y')")
        raise Stop

    with pytest.raises(StoreUnavailable):
        await store.writer.run(stops)
    assert [r.outcome for r in await ingest_all(store, evaluation("e-1"))] == ["stored"]
    assert [version for (version,) in query(path, "SELECT version FROM migrations")] == VERSIONS


def test_an_operation_queued_while_closing_is_refused(path: str) -> None:
    store = Store(path)
    store.open()
    release = threading.Event()
    busy = store.writer.submit(lambda conn: release.wait(5))
    closing = threading.Thread(target=store.close)
    closing.start()
    while store.writer.running:  # until close() has begun
        time.sleep(0.001)
    late = store.writer.submit(lambda conn: "ran")
    release.set()
    closing.join(5)
    assert busy.result(1) is True
    with pytest.raises(StoreUnavailable, match="closed"):
        late.result(1)


@pytest.mark.anyio
async def test_a_bad_operation_alone_changes_nothing(store: Store, path: str) -> None:
    """A batch of one runs without a savepoint: its failure rolls the transaction back and
    the writer goes on."""

    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (99, 'x', 'y')")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await store.writer.run(boom)
    assert [r.outcome for r in await ingest_all(store, evaluation("e-1"))] == ["stored"]
    assert [version for (version,) in query(path, "SELECT version FROM migrations")] == VERSIONS


@pytest.mark.anyio
async def test_a_delivery_is_replayed_once_applied(store: Store) -> None:
    """Replay right after the ack waits for the delivery to be applied; one that is not
    applied (in the same transaction here) is a clear refusal, not a TypeError."""

    def accept_then_replay(conn: sqlite3.Connection) -> int:
        receipt = accept(conn, delivery(evaluation("e-1")))
        return replay_delivery(conn, receipt.delivery_id, NO_FORWARDING, "2026-11-20T09:00:00Z")

    with pytest.raises(BadRequest, match="evaluation e-1 is not stored yet; nothing to replay"):
        await store.writer.run(accept_then_replay)
    receipt = await store.accept(delivery(evaluation("e-2")))
    assert await store.replay_delivery(receipt.delivery_id, "2026-11-20T09:00:00Z") == 0


UNDATED = {"completed_at": None}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bodies", "expected"),
    [
        # A thin body of an older attempt, then a newer verdict: the newer one (PostgreSQL
        # sorts NULL first in DESC).
        (
            [("e-1", "completed", 0, UNDATED), ("e-2", "completed", 30, {})],
            ("e-2", "e-2", "completed"),
        ),
        (
            [("e-2", "completed", 30, {}), ("e-1", "completed", 0, UNDATED)],
            ("e-2", "e-2", "completed"),
        ),
        # Only undated verdicts: still the current and the latest verdict.
        ([("e-1", "completed", 0, UNDATED)], ("e-1", "e-1", "completed")),
        ([("e-1", "failed", 0, UNDATED), ("e-2", "running", 30, {})], (None, "e-1", "failed")),
        # Among undated verdicts, the newest received.
        (
            [("e-1", "failed", 0, UNDATED), ("e-2", "completed", 30, UNDATED)],
            ("e-2", "e-2", "completed"),
        ),
        (
            [("e-2", "completed", 30, UNDATED), ("e-1", "failed", 0, UNDATED)],
            ("e-2", "e-1", "failed"),
        ),
    ],
)
async def test_a_verdict_without_completed_at_comes_after_every_dated_one(
    store: Store, path: str, bodies: list[tuple[str, str, int, dict[str, Any]]], expected: Any
) -> None:
    await ingest_all(
        store,
        *(
            evaluation(name, status, client_ref="job-1", second=second, **extra)
            for name, status, second, extra in bodies
        ),
    )
    found = pointers(path, "job-1")
    assert found is not None
    assert found[:3] == expected
    assert found[3] == len(bodies)


@pytest.mark.anyio
async def test_a_tie_on_completed_at_goes_to_the_later_received_on_both_backends(
    store: Store, path: str
) -> None:
    """PostgreSQL's index gives tied rows in no set order: after the first one's row was
    written again (a feedback), it was current there and the second one on SQLite."""
    await ingest_all(
        store,
        evaluation("e-a", client_ref="job-7", second=42, overall_passed=False),
        evaluation("e-b", client_ref="job-7", second=42, overall_passed=True),
    )
    rated = evaluation("e-a", client_ref="job-7", second=42, overall_passed=False)
    await ingest_all(
        store, {**rated, "feedback_is_positive": True, "updated_at": "2026-11-20T09:05:00+00:00"}
    )
    found = pointers(path, "job-7")
    assert found is not None
    assert found[:3] == ("e-b", "e-b", "completed")


@pytest.mark.anyio
async def test_lineage_starts_at_the_root_when_its_body_has_no_attempt_number(
    store: Store,
) -> None:
    retry = evaluation("g-2", client_ref="job-5", parent_evaluation_id="g-1", attempt_number=2)
    await ingest_all(store, evaluation("g-1", client_ref="job-5"), retry)
    assert [item["id"] for item in store.lineage("g-2")] == ["g-1", "g-2"]


@pytest.mark.anyio
@pytest.mark.parametrize("rate", [1e308, -0.5, 1.5, 10**30])
async def test_a_score_that_is_no_pass_rate_is_kept_only_in_the_body(
    store: Store, path: str, rate: float
) -> None:
    """weighted_pass_rate is 0.0 to 1.0 (the contract). Two of 1e308 overflowed PostgreSQL's
    rollup sums, and the writer retried that chunk forever, applying nothing after it."""
    bodies = [evaluation(f"h-{n}", weighted_pass_rate=rate) for n in range(2)]
    for body in [*bodies, evaluation("h-ok", client_ref="ok")]:
        assert (await store.accept(delivery(body))).outcome == "stored"
    store.catch_up()
    scores = query(path, "SELECT id, score FROM evaluations ORDER BY id")
    assert [tuple(row) for row in scores] == [("h-0", None), ("h-1", None), ("h-ok", None)]
    assert store.stats(EvaluationFilter())["total"] == 3
    found = store.get_evaluation("h-0")
    assert found is not None
    assert found["evaluation"]["runflow"]["weighted_pass_rate"] == rate


@pytest.mark.anyio
@pytest.mark.skipif(not POSTGRES, reason="SQLite writes one transaction at a time")
async def test_superseded_stays_superseded_when_another_server_marked_it_meanwhile(
    store: Store, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server B applies a callback of the parent, having read its row, while server A applies
    its newer attempt and marks it superseded: B's write must not undo A's mark. (Interleaved
    here on one store by applying A's callback between B's read and B's write.)"""
    await ingest_all(store, evaluation("p-1", client_ref="job-2"))
    merge = apply_module.merge
    child = evaluation("p-2", "running", client_ref="job-2", parent_evaluation_id="p-1")

    def child_applied_meanwhile(existing: Any, incoming: Any) -> Any:
        monkeypatch.setattr(apply_module, "merge", merge)
        conn = connect(path)
        try:
            conn.execute("BEGIN")
            apply_module.apply_evaluation(
                conn, child, source="webhook", stamp="2026-11-20T09:01:00.000000Z"
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        return merge(existing, incoming)

    monkeypatch.setattr(apply_module, "merge", child_applied_meanwhile)
    parent_again = evaluation("p-1", client_ref="job-2", second=5, feedback_is_positive=False)
    await store.writer.run(
        partial(
            apply_module.apply_evaluation,
            fields=normalize(parse_body(body_of(parent_again))).fields,
            source="webhook",
            stamp="2026-11-20T09:01:00.500000Z",
        )
    )
    superseded = query(path, "SELECT id, superseded FROM evaluations ORDER BY id")
    assert [tuple(row) for row in superseded] == [("p-1", 1), ("p-2", 0)]


@pytest.mark.skipif(not POSTGRES, reason="SQLite writes one transaction at a time")
def test_a_parent_applied_while_its_retry_is_applied_elsewhere_is_superseded(path: str) -> None:
    """Server A applies a parent's first callback (its row read: no newer attempt yet) while
    server B applies the retry naming it, B's UPDATE of the parent finding no row yet: the
    parent must still end superseded and its retry current, as in either order alone."""
    from receiver.store.pg_connection import connect as pg_connect

    Store(path).migrate()
    server_a, server_b = pg_connect(path), pg_connect(path)
    # Scores in different buckets: no rollup row in common, which would order them too.
    parent, child = (
        normalize(parse_body(body_of(fields))).fields
        for fields in (
            evaluation("p-1", client_ref="job-2", weighted_pass_rate=0.3),
            evaluation(
                "p-2",
                client_ref="job-2",
                second=9,
                parent_evaluation_id="p-1",
                weighted_pass_rate=0.9,
            ),
        )
    )
    finished = threading.Event()

    def apply_child() -> None:
        server_b.execute("BEGIN")
        apply_module.apply_evaluation(
            server_b, child, source="webhook", stamp="2026-11-20T09:01:00.000000Z"
        )
        server_b.execute("COMMIT")
        finished.set()

    try:
        server_a.execute("BEGIN")
        apply_module.apply_evaluation(
            server_a, parent, source="webhook", stamp="2026-11-20T09:00:59.000000Z"
        )
        applying_child = threading.Thread(target=apply_child)
        applying_child.start()
        waiting_for_a_lock(server_b, done=finished.is_set)
        server_a.execute("COMMIT")
        applying_child.join(timeout=30)
        assert finished.is_set()
    finally:
        server_a.close()
        server_b.close()
    superseded = query(path, "SELECT id, superseded FROM evaluations ORDER BY id")
    assert [tuple(row) for row in superseded] == [("p-1", 1), ("p-2", 0)]
    assert pointers(path, "job-2") == ("p-2", "p-2", "completed", 2)


@pytest.mark.anyio
async def test_ties_in_the_top_lists_order_alike_on_both_backends(store: Store) -> None:
    """Twenty-one task types counting one each, one of them none: which twenty are shown
    must not depend on where the database sorts NULL."""
    bodies = [evaluation(f"t-{n:02d}", task_type=f"t{n:02d}") for n in range(20)]
    await ingest_all(store, *bodies, evaluation("t-none", task_type=None))
    shown = [row["task_type"] for row in store.stats(EvaluationFilter())["per_task_type"]]
    assert shown == [None, *(f"t{n:02d}" for n in range(19))]


@pytest.mark.anyio
@pytest.mark.skipif(not POSTGRES, reason="a PostgreSQL database's collation")
async def test_labels_order_alike_whatever_the_database_collation() -> None:
    """On a database made with an ICU collation, labels read from the rows (a client_ref's
    stats) sorted otherwise than the rollups (bytewise, COLLATE "C")."""
    from . import database

    assert database._server is not None
    name = "icu_labels"
    database._server.admin(
        f"DROP DATABASE IF EXISTS {name}",
        f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        " LOCALE 'C.UTF-8'",
    )
    store = Store(database._server.url_for(name))
    store.migrate()
    store.open()
    try:
        for n, label in enumerate("bBa"):
            await store.ingest(delivery(evaluation(f"l-{n}", client_ref="r", top_issues=[label])))
        orders = [
            [row["label"] for row in store.stats(where)["top_issues"]]
            for where in (EvaluationFilter(), EvaluationFilter(client_ref="r"))
        ]
    finally:
        store.close()
        database._server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    assert orders == [["B", "a", "b"]] * 2


# reads


@pytest.mark.anyio
async def test_list_and_filters_through_the_store(store: Store) -> None:
    await ingest_all(
        store,
        evaluation("e-1", overall_passed=True, task_type="headshot"),
        evaluation("e-2", "failed", client_ref="ref-2", failure_code="timed_out"),
        evaluation("e-3", "running", client_ref="ref-3"),
    )
    items, cursor = store.list_evaluations(EvaluationFilter())
    assert [i["id"] for i in items] == ["e-3", "e-2", "e-1"]
    assert cursor is None
    items, _ = store.list_evaluations(EvaluationFilter(passed=True))
    assert [i["id"] for i in items] == ["e-1"]
    items, _ = store.list_evaluations(EvaluationFilter(failure_code="timed_out"))
    assert [i["id"] for i in items] == ["e-2"]
    stats = store.stats(EvaluationFilter())
    assert (stats["total"], stats["by_status"]) == (3, {"completed": 1, "failed": 1, "running": 1})


# changes: what a live table asks for (list_changes)


def changes_since(store: Store, mark: str) -> list[str]:
    items, _ = store.list_changes(EvaluationFilter(changed_since=mark))
    stamps = [item["updated_at"] for item in items]
    assert stamps == sorted(stamps)
    return [item["id"] for item in items]


def fields_of(value: dict[str, Any]) -> dict[str, Any]:
    return normalize(parse_body(body_of(value))).fields


FEEDBACK = evaluation("e-1", feedback_is_positive=False, feedback_reason="hands")
WRITES = {
    "verdict": (
        lambda store: ingest_all(store, evaluation("e-1", second=9)),
        ["e-1"],
        ("status", "completed"),
    ),
    "feedback": (
        lambda store: store.record(fields_of(FEEDBACK), "feedback", now()),
        ["e-1"],
        ("feedback", {"is_positive": False, "reason": "hands"}),
    ),
    "refetch": (
        lambda store: store.refetched(fields_of(evaluation("e-1", second=9)), now()),
        ["e-1"],
        ("refetched", True),
    ),
    "superseded": (
        lambda store: ingest_all(store, evaluation("e-4", parent_evaluation_id="e-1")),
        ["e-1", "e-4"],  # written together: in id order
        ("superseded", True),
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize(("write", "changed", "shown"), WRITES.values(), ids=WRITES.keys())
async def test_every_write_to_an_evaluation_brings_it_among_the_changes(
    store: Store, write: Callable[[Store], Any], changed: list[str], shown: tuple[str, Any]
) -> None:
    """updated_at moves on every write that changes what a row shows, so a live table that
    asks for the changes since the newest it saw gets the row again, as it is now."""
    await ingest_all(store, evaluation("e-1", "running"), evaluation("e-2"), evaluation("e-3"))
    mark = store.get_evaluation("e-3")["evaluation"]["updated_at"]  # type: ignore[index]
    assert changes_since(store, mark) == ["e-3"]  # at the mark itself: polls overlap
    await write(store)
    assert changes_since(store, mark) == ["e-3", *changed]
    items, _ = store.list_changes(EvaluationFilter(changed_since=mark))
    [item] = [found for found in items if found["id"] == "e-1"]
    key, value = shown
    assert item[key] == value
    assert item["updated_at"] > mark


@pytest.mark.anyio
async def test_a_callback_applied_late_is_among_the_changes_since_a_later_write(
    path: str,
) -> None:
    """A burst is acknowledged first and applied after (store/backlog.py). Its rows' updated_at
    is when they are applied, not when they arrived: a live table that already saw a later
    write (here, one applied straight away) still gets them."""
    Store(path).migrate()
    conn = connect(path)
    reader = Store(path)  # no writer running: its reads apply nothing themselves
    try:
        for work in (
            lambda: accept(conn, delivery(evaluation("late", "completed"))),
            lambda: apply_module.apply_evaluation(
                conn, fields_of(evaluation("other")), source="webhook", stamp=now()
            ),
        ):
            conn.execute("BEGIN")
            work()
            conn.execute("COMMIT")
        [other] = reader.list_changes(EvaluationFilter(changed_since="2000-01-01T00:00:00Z"))[0]
        conn.execute("BEGIN")
        assert apply_queued(conn, 10).count == 1
        conn.execute("COMMIT")
        assert changes_since(reader, other["updated_at"]) == ["other", "late"]
    finally:
        reader.close()
        conn.close()


# restart


@pytest.mark.anyio
async def test_a_restart_keeps_everything(path: str) -> None:
    first = Store(path)
    first.open()
    try:
        await ingest_all(
            first,
            fixture("get-evaluation-embedded.json"),
            evaluation("e-2", client_ref="customer-job-123", second=59),
        )
        before = first.get_client_ref("customer-job-123")
        detail = first.get_evaluation(COMPLETED_ID)
    finally:
        first.close()
    second = Store(path)
    assert second.migrate() == []
    second.open()
    try:
        assert second.get_client_ref("customer-job-123") == before
        assert second.get_evaluation(COMPLETED_ID) == detail
        [again] = await ingest_all(second, fixture("get-evaluation-embedded.json"))
        assert again == Receipt("duplicate", 1, COMPLETED_ID)
        [new] = await ingest_all(second, evaluation("e-3"))
        # after the two before it (PostgreSQL's sequence also spends a number on the
        # duplicate's INSERT ... ON CONFLICT DO NOTHING: ids are unique, not gapless)
        assert new.outcome == "stored"
        assert new.delivery_id >= 3
    finally:
        second.close()


@pytest.mark.anyio
async def test_a_replay_queues_only_the_sinks_that_want_the_verdict(path: str) -> None:
    """`replay` forwards "to every sink that wants it" (README): not to a sink whose filter
    left the verdict out after refetch (it stays skipped), nor to one no longer configured,
    whose row would stay pending forever with no worker loop to send it."""
    every = SinkSpec(name="every", type="http", url="https://a.example.com/hooks")
    headshots = SinkSpec(
        name="headshots",
        type="http",
        url="https://b.example.com/hooks",
        task_types=frozenset({"headshot"}),
    )
    removed = SinkSpec(name="removed", type="http", url="https://c.example.com/hooks")
    before = Store(path, forwarding=Forwarding(sinks=(every, headshots, removed)))
    before.open()
    try:  # a thin callback (no task_type yet) is queued to all three, and sent
        receipt = await before.ingest(delivery(evaluation("e-1")))
        await before.refetched(evaluation("e-1", task_type="product"), "2026-11-20T09:01:00Z")
    finally:
        before.close()
    conn = connect(path)
    conn.execute(
        "UPDATE outbox SET state = CASE sink WHEN 'headshots' THEN 'skipped' ELSE 'done' END"
    )
    conn.commit()
    conn.close()
    after = Store(path, forwarding=Forwarding(sinks=(every, headshots)))
    after.open()
    try:
        queued = await after.replay_delivery(receipt.delivery_id, "2026-11-20T09:02:00Z")
    finally:
        after.close()
    states = dict(query(path, "SELECT sink, state FROM outbox WHERE evaluation_id = 'e-1'"))
    assert states == {"every": "pending", "headshots": "skipped", "removed": "done"}
    assert queued == 1


@sqlite_only
@pytest.mark.anyio
async def test_the_wal_shrinks_back_after_a_long_read_ends(store: Store, path: str) -> None:
    """A read transaction held open beside the server (Datasette, an sqlite3 shell left in
    BEGIN) keeps every checkpoint from resetting the WAL, so it grows with each callback. Once
    the reader is gone the next checkpoint resets it; the file used to keep its peak size for
    as long as the server ran (it never closes its connections), so one afternoon of a
    forgotten shell cost its gigabytes of disk until a restart."""
    wal = Path(f"{path}-wal")
    padding = "x" * 16_000

    async def callbacks(numbers: range) -> None:
        await asyncio.gather(
            *(
                store.accept(delivery({"id": f"wal-{n}", "status": "completed", "pad": padding}))
                for n in numbers
            )
        )
        store.catch_up(60)

    await callbacks(range(10))
    reader = sqlite3.connect(path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM deliveries").fetchone()  # its snapshot, held
        await callbacks(range(10, 1510))
        peak = wal.stat().st_size
    finally:
        reader.close()
    assert peak > 40 * 2**20
    await callbacks(range(1510, 1560))  # a checkpoint with no reader behind it
    await callbacks(range(1560, 1610))  # … and the write that starts the WAL over
    assert wal.stat().st_size < peak / 2


@pytest.mark.anyio
@pytest.mark.skipif(not POSTGRES, reason="a PostgreSQL session's lock")
async def test_a_table_another_session_locks_fails_the_batch_instead_of_holding_the_writer(
    path: str,
) -> None:
    """A session holding LOCK TABLE deliveries held the writer (every write after it) for as
    long as it liked: lock_timeout (the ack bound) fails that batch with the reason, and the
    writer goes on with the next, while the lock is still held. Migrations run on their own
    connection, without it."""
    import psycopg

    store = Store(path, ack_timeout=0.5)
    store.open()
    try:
        with psycopg.connect(path) as holder:
            holder.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await asyncio.wait_for(
                    store.writer.run(lambda conn: conn.execute("SELECT 1 FROM deliveries")), 30
                )
            await asyncio.wait_for(store.probe(), 30)  # the writer is free again
        receipt = await store.accept(delivery(evaluation("t-1")))
        assert receipt.outcome == "stored"
    finally:
        store.close()


@pytest.mark.anyio
@pytest.mark.skipif(not POSTGRES, reason="a PostgreSQL session's lock")
async def test_an_evaluation_another_session_locks_is_applied_once_the_lock_is_gone(
    path: str,
) -> None:
    """A lock timeout while applying is the other session's doing, not the delivery's: it was
    counted as the delivery failing to apply, which is skipped until restart (acknowledged,
    never applied nor forwarded). The chunk fails and is tried again, and applies it."""
    import psycopg

    store = Store(path, ack_timeout=0.25)  # lock_timeout 0.5 s
    store.open()
    try:
        with psycopg.connect(path, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtextextended('evaluation:t-held', 0))")
            receipt = await store.accept(delivery(evaluation("t-held")))
            assert receipt.outcome == "stored"
            # The chunk times out, then again with a savepoint per callback (one each after
            # a pause while the lock stays).
            await asyncio.sleep(3)
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline:
            found = await asyncio.to_thread(store.get_evaluation, "t-held")
            await asyncio.sleep(0.05)
        assert found is not None
        assert found["evaluation"]["status"] == "completed"
    finally:
        store.close()


def stampless(status: str, **fields: Any) -> dict[str, Any]:
    """A verdict of e-1 whose body says no `updated_at` (an envelope may not)."""
    body = evaluation("e-1", status, **fields)
    del body["updated_at"]
    return body


TIMED_OUT = {"failure_code": "timed_out"}
REFETCHES = {
    # callbacks applied, one accepted but still queued, the GET → stored or why not, the row
    "same-verdict": (
        [evaluation("e-1", "failed", **TIMED_OUT)],
        None,
        evaluation("e-1", "failed", **TIMED_OUT),
        None,
        ("failed", 1, "timed_out"),
    ),
    "news-runflow-tried-again": (
        [evaluation("e-1", "failed", **TIMED_OUT)],
        None,
        evaluation("e-1", second=5),
        None,
        ("completed", 1, None),
    ),
    "lags-the-verdict-that-followed": (
        [stampless("failed", **TIMED_OUT), stampless("completed")],
        None,
        evaluation("e-1", "failed", **TIMED_OUT),
        "Runflow still answers failed, not yet the completed verdict that followed it",
        ("completed", 0, None),
    ),
    "older-by-updated-at": (
        [evaluation("e-1", second=30)],
        None,
        evaluation("e-1", "failed", second=10, **TIMED_OUT),
        "Runflow still answers failed, not yet the completed verdict that followed it",
        ("completed", 0, None),
    ),
    "its-callback-still-queued": (
        [stampless("failed", **TIMED_OUT)],
        stampless("completed"),
        evaluation("e-1", second=5),
        None,
        ("completed", 1, None),
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("applied", "queued", "got", "why", "row"), REFETCHES.values(), ids=REFETCHES.keys()
)
async def test_a_refetch_behind_the_stored_verdict_is_not_stored(
    store: Store,
    path: str,
    applied: list[dict[str, Any]],
    queued: dict[str, Any] | None,
    got: dict[str, Any],
    why: str | None,
    row: tuple[Any, ...],
) -> None:
    """A GET answering a verdict a callback applied here said before the stored one followed
    it lags behind (Runflow's GET can): stored, the tie would go to it and turn the evaluation
    back. So does one older by `updated_at`. A verdict no applied callback said is news."""
    await ingest_all(store, *applied)

    def refetch(conn: sqlite3.Connection) -> str | None:
        if queued is not None:
            accept(conn, delivery(queued))
        return refetched(conn, fields_of(got), NO_FORWARDING, now())

    assert await store.writer.run(refetch) == why
    assert query(path, "SELECT status, refetched, failure_code FROM evaluations") == [row]


@pytest.mark.anyio
async def test_a_refetch_stored_by_hand_is_not_undone_by_the_worker_try_in_flight(
    path: str,
) -> None:
    """`receiver refetch ID` stores the verdict's object while the worker's lease on the same
    refetch still runs; that try's failure (a 503) then used to turn the refetch back to
    pending with its error, beside `refetched` 1, and asked Runflow again."""
    store = Store(path, forwarding=Forwarding(refetch=True))
    store.open()
    try:
        failed = evaluation("e-1", "failed", **TIMED_OUT)
        await ingest_all(store, failed)
        lease = shift(now(), 60)
        assert await store.claim_refetches(now=now(), lease_until=lease, limit=1)
        assert await store.refetched(fields_of(failed), now()) is None  # by hand
        recorded = await store.refetch_failed("e-1", "503", now(), now(), held=lease)
    finally:
        store.close()
    assert recorded is False
    state = "SELECT refetched, refetch_state, refetch_attempts, refetch_error FROM evaluations"
    assert query(path, state) == [(1, "done", 0, None)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("refetch", "after"), [(True, (0, "pending", 0, None)), (False, (0, None, 0, None))]
)
async def test_a_verdict_that_follows_the_other_is_not_refetched_by_its_refetch(
    path: str, refetch: bool, after: tuple[Any, ...]
) -> None:
    """The failed verdict was refetched (after one failed try); the completed one that follows
    is not described by that refetch: `refetched` is false again and, with refetch on, its
    own refetch is queued from scratch; with it off, none is (the earlier one's `done` no
    longer says the evaluation was refetched)."""
    store = Store(path, forwarding=Forwarding(refetch=refetch))
    store.open()
    try:
        failed = evaluation("e-1", "failed", **TIMED_OUT)
        await ingest_all(store, failed)
        if refetch:  # the worker's try, under its lease
            lease = shift(now(), 60)
            assert await store.claim_refetches(now=now(), lease_until=lease, limit=1)
            assert await store.refetch_failed("e-1", "503", now(), now(), held=lease)
        assert await store.refetched(fields_of(failed), now()) is None
        refetched_before = query(path, "SELECT refetched, refetch_state FROM evaluations")
        await ingest_all(store, evaluation("e-1", second=5))
    finally:
        store.close()
    assert refetched_before == [(1, "done")]
    state = "SELECT refetched, refetch_state, refetch_attempts, refetch_error FROM evaluations"
    assert query(path, state) == [after]


@pytest.mark.anyio
async def test_retries_and_replays_send_again_only_what_they_name(path: str) -> None:
    """--retry-all-dead sends the dead, not what was delivered or skipped; a pending forward
    is not retried (a worker may hold it: it would go twice); a replay sends again its own
    verdict, not the other one the evaluation had."""
    sink = SinkSpec(name="hook", type="http", url="https://a.example.com/hooks")
    store = Store(path, forwarding=Forwarding(sinks=(sink,)))
    store.open()
    try:
        _, completed = await ingest_all(
            store, evaluation("e-1", "failed"), evaluation("e-1", second=5)
        )
        await ingest_all(store, evaluation("e-2"))
        ids = dict(query(path, "SELECT evaluation_id || ' ' || event_type, id FROM outbox"))
        conn = connect(path)
        conn.execute(
            "UPDATE outbox SET state = CASE id WHEN ? THEN 'done' WHEN ? THEN 'dead'"
            " ELSE 'skipped' END",
            (ids["e-1 evaluation.failed"], ids["e-1 evaluation.completed"]),
        )
        conn.commit()
        conn.close()
        assert await store.retry_dead("2026-11-20T09:01:00Z") == 1
        with pytest.raises(BadRequest, match="already pending"):
            await store.retry_forward(ids["e-1 evaluation.completed"], "2026-11-20T09:01:00Z")
        conn = connect(path)
        conn.execute("UPDATE outbox SET state = 'done'")
        conn.commit()
        conn.close()
        assert await store.replay_delivery(completed.delivery_id, "2026-11-20T09:02:00Z") == 1
    finally:
        store.close()
    states = dict(query(path, "SELECT evaluation_id || ' ' || event_type, state FROM outbox"))
    assert states == {
        "e-1 evaluation.failed": "done",
        "e-1 evaluation.completed": "pending",
        "e-2 evaluation.completed": "done",
    }


@pytest.mark.anyio
async def test_forwards_are_claimed_oldest_due_first(path: str) -> None:
    """A claim takes the forwards due longest (then the oldest rows), so a backlog goes out in
    about the order it came and a retried forward does not wait behind newer ones."""
    sink = SinkSpec(name="hook", type="http", url="https://a.example.com/hooks")
    store = Store(path, forwarding=Forwarding(sinks=(sink,)))
    store.open()
    try:
        await ingest_all(store, *(evaluation(f"e-{n}") for n in range(4)))
        due = {"e-0": "09:00:03", "e-1": "09:00:01", "e-2": "09:00:02", "e-3": "09:00:01"}
        conn = connect(path)
        for evaluation_id, at in due.items():
            conn.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE evaluation_id = ?",
                (f"2026-11-20T{at}Z", evaluation_id),
            )
        conn.commit()
        stamp = "2026-11-20T09:01:00Z"
        claims = claim_forwards(
            conn, "hook", now=stamp, lease_until=stamp, refetch_cutoff=stamp, limit=3
        )
        conn.commit()
        conn.close()
    finally:
        store.close()
    assert sorted(claim.fields["id"] for claim in claims) == ["e-1", "e-2", "e-3"]


# Migration 16: rows older versions merged by rules changed since.
def old_reading(envelope: dict[str, Any]) -> Delivery:
    """An envelope as versions before session 16 read it: its status over its event."""
    body = body_of(envelope)
    callback = normalize(parse_body(body))
    fields = {**callback.fields, "status_code": envelope["status"]}
    return Delivery(body=body, callback=replace(callback, fields=fields))


def by_arrival(incoming: dict[str, Any], existing: dict[str, Any]) -> bool:
    """The merge's order before session 16: updated_at, else the later arrival."""
    rank = {"pending": 0, "running": 1, "completed": 2, "failed": 2}
    rank_in, rank_old = (rank.get(f.get("status_code") or "", -1) for f in (incoming, existing))
    if rank_in != rank_old:
        return rank_in > rank_old
    stamps = incoming.get("updated_at"), existing.get("updated_at")
    return None in stamps or stamps[0] >= stamps[1]


def envelope(evaluation_id: str, event: str, status: str, second: int, **fields: Any) -> bytes:
    return body_of(
        {
            "event": f"evaluation.{event}",
            "evaluation_id": evaluation_id,
            "status": status,
            "client_ref": f"ref-{evaluation_id}",
            "completed_at": f"2026-11-20T10:00:{second:02d}+00:00",
            **fields,
        }
    )


PASS = {"overall_passed": True, "weighted_pass_rate": 0.7, "top_issues": ["Left hand"]}


@pytest.mark.parametrize("rerun", [[16], [13, 16]], ids=["from-15", "from-12"])
@pytest.mark.anyio
async def test_migration_16_merges_stored_callbacks_by_the_current_rules(
    path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, rerun: list[int]
) -> None:
    """An envelope stored by its status over its event, and a verdict's callback delivered
    late that won by arrival, get the verdict their callbacks say now, with that verdict's
    fields (from an older schema, migration 13 no longer clears them first); a verdict no
    callback said (a refetch's) stays. No forward is queued; the turned rows are refetched
    again and named in a warning. A client_ref's pointer to a score migration 10 cleared
    follows it."""
    sink = SinkSpec(name="s", type="http", url="https://a.example.com/hooks")
    store = Store(path, forwarding=Forwarding(sinks=(sink,)))
    store.open()
    try:
        with monkeypatch.context() as patched:
            patched.setattr("receiver.normalize._newer_or_equal", by_arrival)
            for value in (
                envelope("a", "completed", "failed", 1, **PASS),
                envelope("b", "failed", "completed", 1, failure_code="processing_failed"),
                envelope("c", "completed", "completed", 6, **PASS),
                envelope("c", "failed", "failed", 5, failure_code="timed_out"),
            ):
                await store.ingest(old_reading(json.loads(value)))
            await ingest_all(store, evaluation("kept", client_ref="ref-kept", second=1, **PASS))
            old = {
                key: (status, failure_code)
                for key, status, failure_code in query(
                    path, "SELECT id, status, failure_code FROM evaluations"
                )
            }
    finally:
        store.close()
    assert old == {
        "a": ("failed", None),
        "b": ("completed", "processing_failed"),
        "c": ("failed", "timed_out"),
        "kept": ("completed", None),
    }
    conn = connect(path)
    refetch = {"id": "kept", "status_code": "failed", "failure_code": "invalid_media"}
    apply_module.apply_evaluation(  # Runflow's GET said failed later: no callback did
        conn,
        {**evaluation("kept", "failed", client_ref="ref-kept", second=9), **refetch},
        source="refetch",
        stamp=now(),
        refetched=True,
    )
    conn.execute("UPDATE client_refs SET latest_score = 1.5 WHERE client_ref = 'ref-kept'")
    conn.execute(f"DELETE FROM migrations WHERE version IN ({', '.join(map(str, rerun))})")
    conn.commit()
    conn.close()
    kept_before = row(path, "kept")
    forwards = [tuple(r) for r in query(path, "SELECT * FROM outbox ORDER BY id")]

    store = Store(path)
    with caplog.at_level("WARNING", logger="receiver.store"):
        assert store.migrate() == rerun
    try:
        found = {key: store.get_evaluation(key) for key in ("a", "b", "c")}
        overview = store.stats(EvaluationFilter())
    finally:
        store.close()
    shown = {
        key: {k: got["evaluation"][k] for k in ("status", "passed", "score", "failure_code")}
        for key, got in found.items()
        if got is not None
    }
    assert shown == {
        "a": {"status": "completed", "passed": True, "score": 0.7, "failure_code": None},
        "b": {
            "status": "failed",
            "passed": None,
            "score": None,
            "failure_code": "processing_failed",
        },
        "c": {"status": "completed", "passed": True, "score": 0.7, "failure_code": None},
    }
    assert row(path, "kept") == kept_before
    assert [tuple(r) for r in query(path, "SELECT * FROM outbox ORDER BY id")] == forwards
    assert dict(query(path, "SELECT id, refetch_state FROM evaluations WHERE id <> 'kept'")) == {
        "a": "pending",
        "b": "pending",
        "c": "pending",
    }
    assert query(
        path, "SELECT latest_status, latest_score FROM client_refs WHERE client_ref = ?", "ref-kept"
    ) == [("failed", None)]
    conn = connect(path)
    try:
        assert overview == scan_stats(conn, EvaluationFilter(), exact=True)
    finally:
        conn.close()
    warnings = [r.getMessage() for r in caplog.records if "receiver replay" in r.getMessage()]
    assert len(warnings) == len(rerun)  # one a migration that turned any
    named = [name for w in warnings for name in w.split("(")[2].split(")")[0].split(", ")]
    assert sorted(named) == ["a", "b", "c"]
