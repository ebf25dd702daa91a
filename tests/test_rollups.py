"""Rollups: maintained by the ingest transaction, they must always equal a scan of the rows."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver.normalize import normalize, parse_body
from receiver.store import Delivery, EvaluationFilter
from receiver.store.apply import apply_evaluation, apply_queued
from receiver.store.ingest import accept
from receiver.store.rollups import TABLES, forget, rebuild, score_bucket
from receiver.store.schema import migrate
from receiver.store.stats import plan, stats

DAYS = ["2026-11-17", "2026-11-18", "2026-11-19", "2026-11-20"]
TASK_TYPES = ["headshot", "product", "banner", None]
LABELS = ["Left hand has six fingers", "Collar asymmetry", "100% blur", "Text garbled", ""]
CATEGORIES = [("anatomy", "hands"), ("anatomy", "face"), ("garment", "collar"), (None, None)]
FAILURES = ["invalid_media", "dispatch_failed", "processing_failed", "timed_out"]
MIDNIGHT = "T00:00:00.000000Z"


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "receiver.db", isolation_level=None)
    migrate(connection)
    try:
        yield connection
    finally:
        connection.close()


def moment(rng: random.Random, day: str | None = None) -> str:
    hour, minute, second = rng.randrange(24), rng.randrange(60), rng.randrange(60)
    fraction = rng.randrange(10**6)
    return f"{day or rng.choice(DAYS)}T{hour:02d}:{minute:02d}:{second:02d}.{fraction:06d}Z"


def verdict(rng: random.Random, evaluation_id: str, task_type: str | None) -> dict[str, Any]:
    """A terminal callback body: completed (passed, not passed, no verdict) or failed."""
    when = moment(rng)
    if rng.random() < 0.2:
        return {
            "id": evaluation_id,
            "status_code": "failed",
            "failure_code": rng.choice(FAILURES),
            "completed_at": when,
            "updated_at": when,
            "task_type": task_type,
        }
    return {
        "id": evaluation_id,
        "status_code": "completed",
        "overall_passed": rng.choice([True, False, False, None]),
        "weighted_pass_rate": rng.choice([rng.random(), rng.random(), None, 1.0, 0.0]),
        "top_issues": rng.sample(LABELS, rng.randrange(3)) * rng.choice([1, 1, 2]),
        "completed_at": when if rng.random() < 0.9 else None,
        "updated_at": when,
        "task_type": task_type,
    }


def judges(rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "name": f"judge-{n}",
            "issues": [
                {"category": category, "subcategory": sub, "detail": "d"}
                for category, sub in rng.sample(CATEGORIES, rng.randrange(3))
            ],
        }
        for n in range(rng.randrange(3))
    ]


def populate(conn: sqlite3.Connection, seed: int, count: int = 150, queued: bool = False) -> None:
    """Random histories: running → completed, refetches adding (or replacing) issues, failed
    evaluations, regrades, replays of older states, feedback, and superseding attempts.
    `queued`: as callbacks acknowledged first and applied later in chunks of random size
    (whose rollup changes are written once per chunk)."""
    rng = random.Random(seed)
    known: list[tuple[str, str | None, str | None]] = []  # (id, client_ref, task_type)

    def apply(fields: dict[str, Any], source: str = "webhook", **extra: Any) -> None:
        if not queued:
            apply_evaluation(conn, fields, source=source, stamp=moment(rng), **extra)
            return
        body = json.dumps(fields).encode()
        accept(conn, Delivery(body=body, callback=normalize(parse_body(body))))
        if rng.random() < 0.3:
            apply_queued(conn, rng.randrange(1, 20))

    conn.execute("BEGIN")
    for n in range(count):
        evaluation_id = f"e-{n:04d}"
        client_ref = rng.choice([f"ref-{rng.randrange(40)}", None])
        task_type = rng.choice(TASK_TYPES)
        first: dict[str, Any] = {"id": evaluation_id, "client_ref": client_ref}
        if known and rng.random() < 0.15:
            parent, client_ref, task_type = rng.choice(known)
            first.update(client_ref=client_ref, parent_evaluation_id=parent, attempt_number=2)
            apply({"id": parent, "superseded_at": moment(rng)})
        running = {**first, "status_code": "running", "task_type": task_type}
        if rng.random() < 0.6:
            apply(running)
        if rng.random() < 0.9:
            final = {**first, **verdict(rng, evaluation_id, task_type)}
            apply(final)
            if rng.random() < 0.5:  # a refetch: issues arrive, sometimes with a new verdict
                refetched = {**final, "judges": judges(rng)}
                if rng.random() < 0.3:
                    refetched.update(verdict(rng, evaluation_id, rng.choice(TASK_TYPES)))
                apply(refetched, source="refetch", refetched=True)
            if rng.random() < 0.2:  # a late replay of an older state changes nothing
                apply(running)
            if rng.random() < 0.2:
                apply({"id": evaluation_id, "feedback_is_positive": rng.random() < 0.5})
            if rng.random() < 0.2:  # a regrade: the issue rows stay, the dimensions move
                regrade = verdict(rng, evaluation_id, task_type)
                apply({**regrade, "updated_at": "2027-01-01T00:00:00+00:00"})
        known.append((evaluation_id, client_ref, task_type))
    while apply_queued(conn, 50).more:
        pass
    conn.execute("COMMIT")


def tables(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every rollup row; sums of scores rounded (their float order differs by path)."""
    found = {}
    for table in TABLES:
        rows = conn.execute(f"SELECT * FROM {table}").fetchall()
        found[table] = sorted(
            (tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in rows),
            key=repr,
        )
    return found


FILTERS = [
    EvaluationFilter(),
    EvaluationFilter(status="completed"),
    EvaluationFilter(status="failed"),
    EvaluationFilter(status="running"),
    EvaluationFilter(status="pending"),
    EvaluationFilter(passed=True),
    EvaluationFilter(passed=False),
    EvaluationFilter(task_type="headshot"),
    EvaluationFilter(task_type="nope"),
    EvaluationFilter(task_type="product", passed=False, status="completed"),
    EvaluationFilter(failure_code="timed_out"),
    EvaluationFilter(failure_code="invalid_media", task_type="banner", status="failed"),
    EvaluationFilter(failure_code="nope", since="2026-11-18T06:00:00.000000Z"),
    EvaluationFilter(since="2026-11-18" + MIDNIGHT),
    EvaluationFilter(until="2026-11-19" + MIDNIGHT),
    EvaluationFilter(since="2026-11-18" + MIDNIGHT, until="2026-11-20" + MIDNIGHT),
    EvaluationFilter(since="2026-11-18T13:30:00.000000Z"),
    EvaluationFilter(until="2026-11-19T07:00:00.000000Z"),
    EvaluationFilter(since="2026-11-17T22:00:00.000000Z", until="2026-11-20T01:00:00.000000Z"),
    EvaluationFilter(since="2026-11-18T22:00:00.000000Z", until="2026-11-19T01:00:00.000000Z"),
    EvaluationFilter(since="2026-11-19T08:00:00.000000Z", until="2026-11-19T09:00:00.000000Z"),
    EvaluationFilter(since="2026-11-19" + MIDNIGHT, until="2026-11-18" + MIDNIGHT),
    EvaluationFilter(since="2026-11-18T06:00:00.000000Z", task_type="banner", passed=True),
    EvaluationFilter(q=""),
]


@pytest.mark.parametrize("seed", range(6))
def test_rollups_equal_the_scan(conn: sqlite3.Connection, seed: int) -> None:
    populate(conn, seed)
    for where in FILTERS:
        assert stats(conn, where) == stats(conn, where, exact=True), where


def test_incremental_rollups_equal_a_rebuild(conn: sqlite3.Connection) -> None:
    populate(conn, 42, count=300)
    incremental = tables(conn)
    assert all(incremental.values())
    rebuild(conn)
    assert tables(conn) == incremental


@pytest.mark.parametrize("seed", range(3))
def test_rollups_applied_in_chunks_equal_a_rebuild(conn: sqlite3.Connection, seed: int) -> None:
    populate(conn, seed, count=200, queued=True)
    assert conn.execute("SELECT count(*) FROM apply_queue").fetchone() == (0,)
    chunked = tables(conn)
    assert all(chunked.values())
    rebuild(conn)
    assert tables(conn) == chunked


def test_the_migration_backfills_an_existing_database(conn: sqlite3.Connection) -> None:
    populate(conn, 7, count=300)
    incremental = tables(conn)
    conn.execute("BEGIN")
    for table in TABLES:
        conn.execute(f"DROP TABLE {table}")
    conn.execute("DELETE FROM migrations WHERE version = 5")
    conn.execute("COMMIT")
    assert 5 in migrate(conn)
    assert tables(conn) == incremental
    assert stats(conn, EvaluationFilter()) == stats(conn, EvaluationFilter(), exact=True)


def test_forgetting_deleted_evaluations_equals_a_rebuild(conn: sqlite3.Connection) -> None:
    """Retention deletes rows: forget() first keeps rollups and the text index exact."""
    populate(conn, 9, count=300)
    doomed = [row[0] for row in conn.execute("SELECT id FROM evaluations WHERE rowid % 3 = 0")]
    conn.execute("BEGIN")
    forget(conn, doomed)
    marks = ", ".join("?" * len(doomed))
    conn.execute(f"DELETE FROM issues WHERE evaluation_id IN ({marks})", doomed)
    conn.execute(f"DELETE FROM evaluations WHERE id IN ({marks})", doomed)
    conn.execute("COMMIT")
    forgotten = tables(conn)
    rebuild(conn)
    assert tables(conn) == forgotten
    conn.execute("INSERT INTO evaluations_fts(evaluations_fts, rank) VALUES ('integrity-check', 1)")
    indexed = "SELECT count(*) FROM evaluations_fts WHERE evaluations_fts MATCH '\"e-0\"'"
    stored = "SELECT count(*) FROM evaluations WHERE id LIKE 'e-0%'"
    assert conn.execute(indexed).fetchone() == conn.execute(stored).fetchone() != (0,)


def test_no_zero_rows_are_left_behind(conn: sqlite3.Connection) -> None:
    populate(conn, 3)
    for table in TABLES:
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE count <= 0").fetchone() == (0,)


def test_an_unchanged_verdict_writes_no_rollup(conn: sqlite3.Connection) -> None:
    body = {"id": "e-1", "status_code": "completed", "overall_passed": True, "top_issues": ["x"]}
    apply_evaluation(conn, body, source="webhook", stamp="2026-11-20T09:00:00.000000Z")
    written: list[str] = []
    conn.set_trace_callback(written.append)
    apply_evaluation(conn, body, source="webhook", stamp="2026-11-20T09:01:00.000000Z")
    apply_evaluation(
        conn,
        {"id": "e-1", "feedback_is_positive": False},
        source="feedback",
        stamp="2026-11-20T09:02:00.000000Z",
    )
    conn.set_trace_callback(None)
    assert written
    assert not [sql for sql in written if "rollup_" in sql]


@pytest.mark.parametrize(
    ("where", "rollups", "days", "edges"),
    [
        (EvaluationFilter(), True, (None, None), 0),
        (EvaluationFilter(status="completed", passed=True, task_type="x"), True, (None, None), 0),
        (EvaluationFilter(since="2026-11-18" + MIDNIGHT), True, ("2026-11-18", None), 0),
        (EvaluationFilter(until="2026-11-18" + MIDNIGHT), True, (None, "2026-11-18"), 0),
        (EvaluationFilter(since="2026-11-18T10:00:00.000000Z"), True, ("2026-11-19", None), 1),
        (
            EvaluationFilter(since="2026-11-18T10:00:00.000000Z", until="2026-11-21T01:00:00.0Z"),
            False,
            (None, None),
            1,
        ),
        (
            EvaluationFilter(
                since="2026-11-18T10:00:00.000000Z", until="2026-11-21T01:00:00.000000Z"
            ),
            True,
            ("2026-11-19", "2026-11-21"),
            2,
        ),
        (
            EvaluationFilter(
                since="2026-11-18T10:00:00.000000Z", until="2026-11-19T10:00:00.000000Z"
            ),
            False,
            (None, None),
            1,
        ),
        (EvaluationFilter(since="9999-12-31T10:00:00.000000Z"), False, (None, None), 1),
        (EvaluationFilter(client_ref="ref-1"), False, (None, None), 1),
        (EvaluationFilter(client_ref=""), False, (None, None), 1),
        (EvaluationFilter(failure_code="timed_out"), True, (None, None), 0),
        (EvaluationFilter(q="hand"), False, (None, None), 1),
    ],
)
def test_which_filters_the_rollups_answer(
    where: EvaluationFilter, rollups: bool, days: tuple[str | None, str | None], edges: int
) -> None:
    chosen = plan(where)
    assert (chosen.rollups, (chosen.first_day, chosen.end_day), len(chosen.rows)) == (
        rollups,
        days,
        edges,
    )
    assert not plan(where, exact=True).rollups


@pytest.mark.parametrize(
    "score", [None, 0.0, 0.05, 0.1, 0.35, 0.9999, 1.0, 1.5, -0.05, -0.15, -1e300, 1e308, 0.7]
)
def test_score_buckets_match_sqlite(score: float | None) -> None:
    conn = sqlite3.connect(":memory:")
    expected = conn.execute("SELECT min(CAST(? * 10 AS INTEGER), 9)", (score,)).fetchone()[0]
    assert score_bucket(score) == expected


def test_absurd_scores_never_fail_ingest(conn: sqlite3.Connection) -> None:
    """weighted_pass_rate is 0..1, but a body may say anything: sums overflow, never raise."""
    stamp = "2026-11-20T09:00:00.000000Z"
    absurd = [(1e308, 0.95, -1e308), (-1e308, -1e300, 5e-324), (1.5, -3.0, 0.5), (1e308, 1e308)]
    for n, scores in enumerate(absurd):
        for score in scores:
            for evaluation_id in (f"a-{n}", f"b-{n}"):
                apply_evaluation(
                    conn,
                    {"id": evaluation_id, "status_code": "completed", "weighted_pass_rate": score},
                    source="webhook",
                    stamp=stamp,
                )
    assert stats(conn, EvaluationFilter())["total"] == 8
    assert stats(conn, EvaluationFilter(), exact=True)["by_status"] == {"completed": 8}
