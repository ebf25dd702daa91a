"""bench/generate.py writes the rows the ingest path would: same columns, issues, pointers,
rollups and text index (checked on a small count; the benchmark uses 1,000,000)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest

from receiver.normalize import columns, judge_issues
from receiver.store import EvaluationFilter, search
from receiver.store.client_refs import refresh_client_ref
from receiver.store.stats import stats

from .helpers import ROOT

F = EvaluationFilter
COLUMNS = (
    "client_ref, status, passed, score, task_type, failure_code, top_issues, attempt_number,"
    " parent_evaluation_id, superseded_at, created_at, completed_at, run_id, image_url,"
    " feedback_is_positive, feedback_reason"
)


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    path = tmp_path_factory.mktemp("bench") / "generated.db"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generate.py"), "--count", "3000", "--db",
         str(path), "--days", "5", "--seed", "3", "--end", "2026-11-20T12:00:00+00:00"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        yield connection
    finally:
        connection.close()


def test_columns_and_issues_are_derived_from_the_stored_object(conn: sqlite3.Connection) -> None:
    rows = conn.execute(f"SELECT id, data, {COLUMNS} FROM evaluations").fetchall()
    assert len(rows) == 3000
    for evaluation_id, data, *stored in rows:
        fields = json.loads(data)
        derived = columns(fields)
        derived["top_issues"] = json.dumps(derived["top_issues"], separators=(",", ":"))
        assert tuple(stored) == tuple(derived[name] for name in COLUMNS.split(", ")), data
        issues = conn.execute(
            "SELECT judge, category, subcategory, detail FROM issues WHERE evaluation_id = ?"
            " ORDER BY id",
            (evaluation_id,),
        ).fetchall()
        assert issues == judge_issues(fields)


def test_deliveries_are_signed_bodies_of_their_evaluations(conn: sqlite3.Connection) -> None:
    for body, digest, evaluation_id in conn.execute(
        "SELECT body, sha256, evaluation_id FROM deliveries"
    ):
        assert hashlib.sha256(body).hexdigest() == digest
        assert json.loads(body)["id"] == evaluation_id


def test_client_ref_pointers_are_what_ingest_computes(conn: sqlite3.Connection) -> None:
    pointers = "SELECT * FROM client_refs ORDER BY client_ref"
    generated = conn.execute(pointers).fetchall()
    conn.execute("BEGIN")
    for (client_ref,) in conn.execute("SELECT DISTINCT client_ref FROM evaluations").fetchall():
        if client_ref is not None:
            refresh_client_ref(conn, client_ref, generated[0][-1])
    recomputed = conn.execute(pointers).fetchall()
    conn.execute("ROLLBACK")
    assert len(generated) > 10
    assert recomputed == generated


@pytest.mark.parametrize(
    "where",
    [F(), F(status="failed"), F(passed=True, task_type="headshot"), F(failure_code="timed_out")],
)
def test_rollups_and_text_index_agree_with_the_rows(
    conn: sqlite3.Connection, where: EvaluationFilter
) -> None:
    assert stats(conn, where) == stats(conn, where, exact=True)
    conn.execute(f"INSERT INTO {search.TABLE}({search.TABLE}, rank) VALUES ('integrity-check', 1)")
