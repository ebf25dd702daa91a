"""List paths at scale: the text index and the index-steered filters give exactly what a plain
LIKE / WHERE over the rows gives, in the same order, page after page."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.store import EvaluationFilter, Store, search
from receiver.store.apply import apply_evaluation
from receiver.store.queries import list_evaluations
from receiver.store.schema import migrate

from .database import database_for
from .test_rollups import MIDNIGHT, populate

F = EvaluationFilter


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    path: Path = tmp_path_factory.mktemp("search") / "receiver.db"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.row_factory = sqlite3.Row
    migrate(connection)
    populate(connection, 11, count=400)
    try:
        yield connection
    finally:
        connection.close()


def expected(conn: sqlite3.Connection, where: EvaluationFilter, newest_first: bool) -> list[str]:
    """The plain answer: no text index, no steering, no cursor."""
    sql, params = where.where()
    order = "DESC" if newest_first else "ASC"
    rows = conn.execute(
        f"SELECT id FROM evaluations{sql} ORDER BY received_at {order}, id {order}", params
    ).fetchall()
    return [row[0] for row in rows]


def walk(conn: sqlite3.Connection, where: EvaluationFilter, newest_first: bool) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        items, cursor = list_evaluations(conn, where, 7, cursor, newest_first)
        seen += [item["id"] for item in items]
        if cursor is None:
            return seen


def test_the_text_index_matches_the_rows(conn: sqlite3.Connection) -> None:
    conn.execute(f"INSERT INTO {search.TABLE}({search.TABLE}, rank) VALUES ('integrity-check', 1)")


TEXTS = ["e-01", "ref-3", "hand", "HAND", "0% b", "%", "_", "e-0", "x", "", "banner", "nope!"]
TEXTS += ['"', 'Text "garbled"', "Left hand has six fingers", "timed_out", "ed_o", "ü", "\x00e-0"]
TEXTS += ['""', "NEAR(a b)", "* OR ^", "'", "\\", "😀😀😀"]


@pytest.mark.parametrize("few", [search.FEW, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_search_equals_like(
    conn: sqlite3.Connection, text: str, few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "FEW", few)
    for where in (F(q=text), F(q=text, status="completed"), F(q=text, passed=False)):
        for newest_first in (True, False):
            assert walk(conn, where, newest_first) == expected(conn, where, newest_first), where


def filters(seed: int) -> list[EvaluationFilter]:
    rng = random.Random(seed)
    found = []
    for _ in range(40):
        since = rng.choice([None, "2026-11-18" + MIDNIGHT, "2026-11-18T13:30:00.000000Z"])
        until = rng.choice([None, "2026-11-20" + MIDNIGHT, "2026-11-19T07:00:00.000000Z"])
        found.append(
            F(
                client_ref=rng.choice([None, None, "ref-1", "ref-7"]),
                status=rng.choice([None, "completed", "failed", "running"]),
                passed=rng.choice([None, True, False]),
                task_type=rng.choice([None, "headshot", "banner"]),
                failure_code=rng.choice([None, None, "timed_out"]),
                since=since,
                until=until,
            )
        )
    return found


@pytest.mark.parametrize("where", filters(5), ids=repr)
def test_every_filter_walks_like_a_plain_where(
    conn: sqlite3.Connection, where: EvaluationFilter
) -> None:
    for newest_first in (True, False):
        assert walk(conn, where, newest_first) == expected(conn, where, newest_first)


def test_a_renamed_row_is_found_by_its_new_text_only(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "receiver.db", isolation_level=None)
    connection.row_factory = sqlite3.Row
    migrate(connection)
    stamp = "2026-11-20T09:00:00.000000Z"
    body = {"id": "e-1", "status_code": "running", "client_ref": "alpha-job"}
    apply_evaluation(connection, body, source="webhook", stamp=stamp)
    apply_evaluation(
        connection,
        {**body, "status_code": "completed", "client_ref": "omega-job", "top_issues": ["Blur"]},
        source="webhook",
        stamp=stamp,
    )
    for text, found in (("alpha", []), ("omega", ["e-1"]), ("blur", ["e-1"])):
        assert [i["id"] for i in list_evaluations(connection, F(q=text), 10)[0]] == found
    connection.execute(
        f"INSERT INTO {search.TABLE}({search.TABLE}, rank) VALUES ('integrity-check', 1)"
    )
    connection.close()


@pytest.mark.parametrize(
    ("where", "index"),
    [
        (F(), "idx_evaluations_received_at_id"),
        (F(since="2026-11-18" + MIDNIGHT, until="2026-11-19" + MIDNIGHT), "received_at_id"),
        (F(client_ref="ref-1", status="failed", passed=True), "idx_evaluations_client_ref_list"),
        (F(failure_code="timed_out", task_type="banner"), "idx_evaluations_failure_code_list"),
        (F(task_type="banner", status="completed", passed=False), "task_type_list"),
        (F(status="running", passed=True, since="2026-11-18" + MIDNIGHT), "status_list"),
        (F(passed=False), "idx_evaluations_passed_list"),
    ],
)
def test_every_list_query_seeks_one_index_in_order(
    conn: sqlite3.Connection, where: EvaluationFilter, index: str
) -> None:
    """No sort and no scan at any depth: one index gives the order, the cursor is a seek."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        for newest_first in (True, False):
            _, cursor = list_evaluations(conn, where, 1, None, newest_first)
            list_evaluations(conn, where, 1, cursor, newest_first)
    finally:
        conn.set_trace_callback(None)
    for sql in [s for s in statements if s.startswith("SELECT id, client_ref")]:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        assert len(plan) == 1, plan
        assert index in plan[0], plan
        if "(received_at, id)" in sql:  # a cursor page seeks to its place
            assert "(received_at,id)" in plan[0], plan


LABELLED = {
    "e-1": ['5" crop', "back\\slash", "Übergröße"],
    "e-2": ["Left hand has six fingers", "Collar asymmetry"],
    "e-3": [],
}


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('5" crop', ["e-1"]),  # its JSON has `5\" crop`
        ("back\\slash", ["e-1"]),  # and `back\\slash`
        ('"', ["e-1"]),
        ("Übergröße", ["e-1"]),
        ("fingers", ["e-2"]),
        ("[", []),  # every label array's JSON has these
        ("]", []),
        ('","', []),
        ('fingers","Collar', []),
        ("\\u", []),
    ],
)
def test_issue_labels_are_searched_as_typed(tmp_path: Path, text: str, found: list[str]) -> None:
    """On both backends: `q` finds a label's text, not the JSON the labels are stored as."""
    store = Store(database_for(tmp_path / "receiver.db"))
    store.open()
    try:
        for evaluation_id, labels in LABELLED.items():
            body = {"id": evaluation_id, "status_code": "completed", "top_issues": labels}
            asyncio.run(store.record(body, "webhook", "2026-11-20T09:00:00.000000Z"))
        items, _ = store.list_evaluations(F(q=text), 10)
        assert sorted(item["id"] for item in items) == found
        assert store.stats(F(q=text))["total"] == len(found)
    finally:
        store.close()
