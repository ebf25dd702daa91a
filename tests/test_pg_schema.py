"""The PostgreSQL backend's own parts: migrations equal to SQLite's (same tables, columns and
indexes), safe to run from several processes at once; the SQL translation; a lost connection
is a 503, never a false 200, and the next write reconnects."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.store import Store
from receiver.store.pg_connection import translate
from receiver.store.pg_schema import MIGRATIONS as PG_MIGRATIONS
from receiver.store.schema import MIGRATIONS

from .helpers import fixture, make_settings, post_callback
from .postgres import PostgresService


@pytest.fixture
def empty(postgres_server: PostgresService) -> Iterator[str]:
    """A database with no schema at all."""
    name = f"empty_{next(postgres_server.names)}"
    postgres_server.admin(f"CREATE DATABASE {name}")
    url = postgres_server.url_for(name)
    yield url
    postgres_server.drop(url)


def test_the_migrations_are_the_same_steps() -> None:
    assert [(v, n) for v, n, _ in PG_MIGRATIONS] == [(v, n) for v, n, _ in MIGRATIONS]


def sqlite_schema(path: Path) -> tuple[dict[str, list[str]], set[str]]:
    Store(str(path)).migrate()
    conn = sqlite3.connect(path)
    try:
        tables = [
            name
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("evaluations_fts")
        ]
        columns = {t: [row[1] for row in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
        indexes = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
    finally:
        conn.close()
    return columns, indexes


def postgres_schema(url: str) -> tuple[dict[str, list[str]], set[str]]:
    with psycopg.connect(url) as conn:
        columns: dict[str, list[str]] = {}
        for table, column in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        ):
            if column != "rowid":  # the identity column standing in for SQLite's rowid
                columns.setdefault(table, []).append(column)
        indexes = {
            name
            for (name,) in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
                " AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_trgm'"
            )
        }
    return columns, indexes


def test_both_backends_have_the_same_tables_columns_and_indexes(tmp_path: Path, empty: str) -> None:
    assert Store(empty).migrate() == [v for v, _, _ in MIGRATIONS]
    assert postgres_schema(empty) == sqlite_schema(tmp_path / "receiver.db")


def test_migrate_is_idempotent_and_safe_from_many_processes_at_once(empty: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(Store(empty).migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results, key=len) == [[]] * 5 + [[v for v, _, _ in MIGRATIONS]]
    assert Store(empty).migrate() == []


@pytest.mark.parametrize(
    ("sqlite", "postgres"),
    [
        ("SELECT 1 FROM t WHERE a = ? AND b = ?", "SELECT 1 FROM t WHERE a = %s AND b = %s"),
        ("WHERE a = :a AND b < :b_2", "WHERE a = %(a)s AND b < %(b_2)s"),
        ("WHERE a = '50%' AND b = ':x?'", "WHERE a = '50%%' AND b = ':x?'"),
        ("x LIKE :q ESCAPE '\\'", "x ILIKE %(q)s ESCAPE '\\'"),
        ("WHERE +status = :s AND +e.passed = :p", "WHERE status = %(s)s AND e.passed = %(p)s"),
        ("SET attempts = attempts + 1", "SET attempts = attempts + 1"),
        ("refetch_state IS NOT 'pending'", "refetch_state IS DISTINCT FROM 'pending'"),
        ("failure_code IS NOT NULL", "failure_code IS NOT NULL"),
        ("min(CAST(e.score * 10 AS INTEGER), 9)", "receiver_score_bucket(e.score)"),
        ("total(score), round(x, 4)", "receiver_total(score), receiver_round(x, 4)"),
        (
            "FROM evaluations e, json_each(e.top_issues) j",
            'FROM evaluations e, LATERAL (SELECT label COLLATE "C" AS value'
            " FROM json_array_elements_text(CAST(e.top_issues AS json)) AS labels(label)) AS j",
        ),
    ],
)
def test_sqlite_sql_is_translated(sqlite: str, postgres: str) -> None:
    assert translate(sqlite) == postgres


@pytest.mark.parametrize(
    "score", [None, 0.0, 0.05, 0.1, 0.3, 0.99, 1.0, 7.5, -0.05, -3.2, 1e300, -1e300]
)
def test_score_buckets_are_computed_as_sqlite_does(
    score: float | None, postgres_server: PostgresService
) -> None:
    bucket = "SELECT min(CAST(s.score * 10 AS INTEGER), 9) FROM (SELECT {} AS score) s"
    (expected,) = sqlite3.connect(":memory:").execute(bucket.format("?"), (score,)).fetchone()
    with psycopg.connect(postgres_server.url_for("receiver_template")) as conn:
        sql = translate(bucket.format("CAST(? AS double precision)"))
        got = conn.execute(sql, (score,)).fetchone()  # type: ignore[arg-type]
    assert got is not None
    assert got[0] == expected


def test_a_lost_connection_answers_503_then_the_next_write_reconnects(
    tmp_path: Path, postgres_server: PostgresService
) -> None:
    url = postgres_server.create()
    try:
        settings = make_settings(tmp_path, database=url, worker=False)
        with TestClient(create_app(settings)) as client:
            assert post_callback(client, fixture("evaluation-failed.json")).status_code == 200
            backlog = client.app.state.receiver.store.backlog  # type: ignore[attr-defined]
            deadline = time.monotonic() + 10
            while backlog.pending and time.monotonic() < deadline:  # applied: the next write
                time.sleep(0.002)  # is the callback below
            postgres_server.admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE datname = '{url.rsplit('/', 1)[1]}'"
            )
            lost = post_callback(client, fixture("evaluation-completed.json"))
            assert lost.status_code == 503
            assert "cannot write" in lost.json()["error"]
            again = post_callback(client, fixture("evaluation-completed.json"))
            assert again.json()["outcome"] == "stored"
            assert client.get("/readyz").status_code == 200
    finally:
        postgres_server.drop(url)
