from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from receiver import api, openapi
from receiver import dashboard as receiver_dashboard
from receiver.app import create_app
from receiver.config import Settings
from receiver.store import rollups
from receiver.times import format_time

from .database import connect
from .helpers import SECRET_B, TOKEN, auth, fixture, post_callback

COMPLETED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
ITEM_KEYS = {
    "id",
    "client_ref",
    "status",
    "event",
    "passed",
    "score",
    "task_type",
    "failure_code",
    "top_issues",
    "attempt_number",
    "superseded",
    "completed_at",
    "received_at",
    "refetched",
    "feedback",
}


def make_body(evaluation_id: str, status: str = "completed", **fields: Any) -> bytes:
    """A callback in the bare shape (GET /v1/evaluations/{id})."""
    values: dict[str, Any] = {
        "id": evaluation_id,
        "status_code": status,
        "client_ref": None,
        "task_type": "headshot",
        "overall_passed": None,
        "weighted_pass_rate": None,
        "failure_code": None,
        "top_issues": [],
        "attempt_number": 1,
        "parent_evaluation_id": None,
        "completed_at": None,
        "updated_at": "2026-11-20T09:00:00+00:00",
    }
    values.update(fields)
    return json.dumps(values).encode()


def store_all(client: TestClient, *bodies: bytes) -> None:
    for body in bodies:
        response = post_callback(client, body)
        assert response.status_code == 200, response.text


def get(client: TestClient, path: str, **params: str) -> Any:
    response = client.get(path, params=params, headers=auth())
    assert response.status_code == 200, response.text
    return response.json()


def ids(page: dict[str, Any]) -> set[str]:
    return {item["id"] for item in page["items"]}


def set_received_at(settings: Settings, evaluation_id: str, moment: datetime) -> None:
    """Test data set-up: pretend an evaluation arrived at `moment` (the rollups follow, as
    they would have had it arrived then)."""
    conn = connect(settings.database)
    try:
        with conn:
            conn.execute(
                "UPDATE evaluations SET received_at = ? WHERE id = ?",
                (format_time(moment), evaluation_id),
            )
            rollups.rebuild(conn)
    finally:
        conn.close()


def judges(*issues: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": category, "issues": [{"category": category, "subcategory": sub, "detail": "d"}]}
        for category, sub in issues
    ]


ODD_REF = "team/a b%?#"
DATASET = [
    make_body(
        "e-01",
        client_ref="cust-1",
        overall_passed=True,
        weighted_pass_rate=0.91,
        completed_at="2026-11-20T09:00:01+00:00",
    ),
    make_body(
        "e-02",
        client_ref="cust-1",
        overall_passed=False,
        weighted_pass_rate=0.42,
        top_issues=["Left hand has six fingers", "Collar asymmetry"],
        judges=judges(("anatomy", "hands"), ("garment", "collar")),
        completed_at="2026-11-20T09:00:02+00:00",
    ),
    make_body(
        "e-03",
        "failed",
        client_ref="cust-2",
        task_type="product",
        failure_code="invalid_media",
        completed_at="2026-11-21T10:00:00+00:00",
    ),
    make_body(
        "e-04",
        "failed",
        client_ref=ODD_REF,
        task_type="product",
        failure_code="timed_out",
        completed_at="2026-11-21T11:00:00+00:00",
    ),
    make_body("e-05", "running", client_ref="cust-3"),
    make_body(
        "e-06",
        client_ref="cust-2",
        task_type="product",
        overall_passed=True,
        weighted_pass_rate=0.75,
        top_issues=["100% blur"],
        judges=judges(("anatomy", "hands")),
        completed_at="2026-11-21T12:00:00+00:00",
    ),
]
ALL = {f"e-0{n}" for n in range(1, 7)}


@pytest.fixture
def dataset(client: TestClient, settings: Settings) -> TestClient:
    """DATASET stored; e-01 arrived in 2020, e-02 three days ago, the rest just now."""
    store_all(client, *DATASET)
    set_received_at(settings, "e-01", datetime(2020, 1, 1, tzinfo=UTC))
    set_received_at(settings, "e-02", datetime.now(UTC) - timedelta(days=3))
    return client


# auth


API_PATHS = [
    "/api/evaluations",
    "/api/evaluations/e-01",
    "/api/client-refs/cust-1",
    "/api/stats",
    "/api/nope",
]
BAD_AUTH = {
    "no-header": None,
    "wrong-token": "Bearer not-the-token",
    "empty-bearer": "Bearer ",
    "token-prefix": f"Bearer {TOKEN[:-1]}",
    "token-longer": f"Bearer {TOKEN}x",
    "basic-scheme": f"Basic {TOKEN}",
    "token-scheme": f"Token {TOKEN}",
    "no-scheme": TOKEN,
}


@pytest.mark.parametrize("header", BAD_AUTH.values(), ids=BAD_AUTH.keys())
@pytest.mark.parametrize("path", API_PATHS)
def test_api_refuses_without_the_token(client: TestClient, path: str, header: str | None) -> None:
    headers = {} if header is None else {"authorization": header}
    response = client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert set(body) == {"ok", "error"}
    assert body["ok"] is False
    assert "RECEIVER_DASHBOARD_TOKEN" in body["error"]


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"]
)
def test_api_accepts_the_token(client: TestClient, header: str) -> None:
    response = client.get("/api/evaluations", headers={"authorization": header})
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/healthz", {"ok": True}),
        ("/readyz", {"ok": True, "store": "writable", "worker": "running"}),
    ],
)
def test_health_needs_no_token(client: TestClient, path: str, expected: dict[str, Any]) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json() == expected


def test_openapi_needs_no_token_and_the_dashboard_asks_for_it(client: TestClient) -> None:
    assert client.get("/openapi.json").json()["openapi"] == "3.1.0"
    assert client.get("/", follow_redirects=False).headers["location"] == "/login?next=%2F"


# GET /api/evaluations


def test_an_item_carries_every_documented_field(client: TestClient) -> None:
    store_all(client, fixture("evaluation-completed.json"))
    [found] = get(client, "/api/evaluations")["items"]
    assert set(found) >= ITEM_KEYS
    assert {key: found[key] for key in ITEM_KEYS - {"received_at"}} == {
        "id": COMPLETED_ID,
        "client_ref": "customer-job-123",
        "status": "completed",
        "event": "evaluation.completed",
        "passed": False,
        "score": 0.62,
        "task_type": "headshot",
        "failure_code": None,
        "top_issues": ["Left hand has six fingers", "Collar asymmetry"],
        "attempt_number": 1,
        "superseded": False,
        "completed_at": "2026-11-20T09:14:43.352000Z",
        "refetched": False,
        "feedback": None,
    }
    assert found["received_at"].endswith("Z")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ALL),
        ({"client_ref": "cust-1"}, {"e-01", "e-02"}),
        ({"client_ref": ODD_REF}, {"e-04"}),
        ({"client_ref": "cust"}, set()),
        ({"status": "completed"}, {"e-01", "e-02", "e-06"}),
        ({"status": "failed"}, {"e-03", "e-04"}),
        ({"status": "running"}, {"e-05"}),
        ({"status": "pending"}, set()),
        ({"passed": "true"}, {"e-01", "e-06"}),
        ({"passed": "false"}, {"e-02"}),
        ({"passed": "1"}, {"e-01", "e-06"}),
        ({"passed": "FALSE"}, {"e-02"}),
        ({"task_type": "product"}, {"e-03", "e-04", "e-06"}),
        ({"failure_code": "timed_out"}, {"e-04"}),
        ({"since": "24h"}, ALL - {"e-01", "e-02"}),
        ({"since": "7d"}, ALL - {"e-01"}),
        ({"since": "1w"}, ALL - {"e-01"}),
        ({"until": "24h"}, {"e-01", "e-02"}),
        ({"until": "2021-01-01"}, {"e-01"}),
        ({"since": "2020-01-01T00:00:00Z", "until": "2020-01-01T00:00:00.000001Z"}, {"e-01"}),
        ({"since": "2020-01-01T01:00:00+01:00", "until": "2020-01-02"}, {"e-01"}),
        ({"until": "2020-01-01T00:00:00+00:00"}, set()),
        ({"since": "2020-01-01T00:00:01Z", "until": "48h"}, {"e-02"}),
        ({"q": "six fingers"}, {"e-02"}),
        ({"q": "CUST-2"}, {"e-03", "e-06"}),
        ({"q": "e-0"}, ALL),
        ({"q": "%"}, {"e-04", "e-06"}),
        ({"q": "_"}, {"e-03", "e-04"}),
        ({"q": "invalid_m"}, {"e-03"}),
        ({"q": "product"}, {"e-03", "e-04", "e-06"}),
        ({"task_type": "headshot", "passed": "false"}, {"e-02"}),
        ({"status": "completed", "client_ref": "cust-2"}, {"e-06"}),
        ({"status": "failed", "q": "media", "task_type": "product"}, {"e-03"}),
    ],
)
def test_list_filters(dataset: TestClient, params: dict[str, str], expected: set[str]) -> None:
    page = get(dataset, "/api/evaluations", **params)
    assert ids(page) == expected
    assert page["next_cursor"] is None


def test_the_list_is_newest_received_first(dataset: TestClient) -> None:
    items = get(dataset, "/api/evaluations")["items"]
    assert [item["id"] for item in items][-2:] == ["e-02", "e-01"]
    stamps = [item["received_at"] for item in items]
    assert stamps == sorted(stamps, reverse=True)


def _walk(client: TestClient, **params: str) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        extra: dict[str, str] = {} if cursor is None else {"cursor": cursor}
        page = get(client, "/api/evaluations", **params, **extra)
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100


@pytest.mark.parametrize(
    ("limit", "sizes"),
    [("10", [10, 10, 5]), ("24", [24, 1]), ("25", [25]), ("1", [1] * 25), ("500", [25])],
)
def test_cursor_pagination(client: TestClient, limit: str, sizes: list[int]) -> None:
    store_all(client, *(make_body(f"gen-{n:02d}", client_ref=f"r-{n % 3}") for n in range(25)))
    pages = _walk(client, limit=limit)
    assert [len(page) for page in pages] == sizes
    seen = [evaluation_id for page in pages for evaluation_id in page]
    assert seen == [f"gen-{n:02d}" for n in reversed(range(25))]


def test_cursor_pagination_with_a_filter(client: TestClient) -> None:
    store_all(
        client,
        *(make_body(f"gen-{n:02d}", "completed" if n % 2 else "failed") for n in range(25)),
    )
    pages = _walk(client, limit="5", status="completed")
    assert [len(page) for page in pages] == [5, 5, 2]
    assert sorted(i for page in pages for i in page) == [f"gen-{n:02d}" for n in range(1, 25, 2)]


def test_cursor_pagination_breaks_ties_by_id(client: TestClient, settings: Settings) -> None:
    store_all(client, *(make_body(f"gen-{n:02d}") for n in range(25)))
    conn = connect(settings.database)
    with conn:
        conn.execute("UPDATE evaluations SET received_at = '2026-11-20T09:00:00.000000Z'")
    conn.close()
    seen = [i for page in _walk(client, limit="10") for i in page]
    assert seen == [f"gen-{n:02d}" for n in reversed(range(25))]


def test_new_arrivals_do_not_disturb_a_walk(client: TestClient) -> None:
    store_all(client, *(make_body(f"gen-{n:02d}") for n in range(25)))
    first = get(client, "/api/evaluations", limit="10")
    store_all(client, *(make_body(f"new-{n}") for n in range(5)))
    store_all(client, make_body("gen-20", overall_passed=True))  # an update, not a new row
    seen = [item["id"] for item in first["items"]]
    cursor = first["next_cursor"]
    while cursor is not None:
        page = get(client, "/api/evaluations", limit="10", cursor=cursor)
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert seen == [f"gen-{n:02d}" for n in reversed(range(25))]


# GET /api/evaluations?changed_since=: the changes, oldest first


def just_after(items: list[dict[str, Any]]) -> str:
    """A moment after every write so far: what a client holds once it has seen them all."""
    newest = max(datetime.fromisoformat(item["updated_at"]) for item in items)
    return format_time(newest + timedelta(microseconds=1))


@pytest.fixture
def changed(dataset: TestClient) -> tuple[TestClient, str]:
    """DATASET, then after `mark`: e-05 (running) completes and passes, e-07 arrives pending."""
    mark = just_after(get(dataset, "/api/evaluations")["items"])
    store_all(
        dataset,
        make_body(
            "e-05",
            client_ref="cust-3",
            overall_passed=True,
            weighted_pass_rate=0.8,
            completed_at="2026-11-21T13:00:00+00:00",
        ),
        make_body("e-07", "pending", client_ref="cust-4"),
    )
    return dataset, mark


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["e-05", "e-07"]),
        ({"status": "completed"}, ["e-05"]),
        ({"status": "running"}, []),  # e-05 no longer is
        ({"status": "pending"}, ["e-07"]),
        ({"passed": "true"}, ["e-05"]),
        ({"client_ref": "cust-3"}, ["e-05"]),
        ({"task_type": "headshot"}, ["e-05", "e-07"]),
        ({"since": "24h"}, ["e-05", "e-07"]),
        ({"until": "24h"}, []),
        ({"q": "cust-4"}, ["e-07"]),
        ({"status": "failed"}, []),
    ],
)
def test_changed_since_lists_the_evaluations_written_since_oldest_first(
    changed: tuple[TestClient, str], params: dict[str, str], expected: list[str]
) -> None:
    client, mark = changed
    page = get(client, "/api/evaluations", changed_since=mark, **params)
    assert [item["id"] for item in page["items"]] == expected
    assert all(item["updated_at"] >= mark for item in page["items"])
    assert page["next_cursor"] is None


def test_changed_since_shows_each_as_it_is_now(changed: tuple[TestClient, str]) -> None:
    client, mark = changed
    [completed, pending] = get(client, "/api/evaluations", changed_since=mark)["items"]
    assert (completed["status"], completed["passed"], completed["score"]) == (
        "completed",
        True,
        0.8,
    )
    assert pending["status"] == "pending"
    everything = get(client, "/api/evaluations", changed_since="2000-01-01")["items"]
    assert {item["id"] for item in everything} == ALL | {"e-07"}


def test_a_walk_through_the_changes_sees_a_row_written_again_at_its_end(
    changed: tuple[TestClient, str],
) -> None:
    client, mark = changed
    first = get(client, "/api/evaluations", changed_since=mark, limit="1")
    assert [item["id"] for item in first["items"]] == ["e-05"]
    store_all(client, make_body("e-05", client_ref="cust-3", overall_passed=False))  # later
    seen, cursor = [], first["next_cursor"]
    while cursor is not None:
        page = get(client, "/api/evaluations", changed_since=mark, limit="1", cursor=cursor)
        seen += [(item["id"], item["passed"]) for item in page["items"]]
        cursor = page["next_cursor"]
    assert seen == [("e-07", None), ("e-05", False)]  # as it is now


@pytest.mark.parametrize("changes_first", [True, False], ids=["changes-cursor", "list-cursor"])
def test_a_cursor_of_the_other_order_is_refused(
    changed: tuple[TestClient, str], changes_first: bool
) -> None:
    client, mark = changed
    both = ({"changed_since": mark}, {})
    made, used = both if changes_first else both[::-1]
    cursor = get(client, "/api/evaluations", limit="1", **made)["next_cursor"]
    response = client.get(
        "/api/evaluations", params={**used, "cursor": cursor, "limit": "1"}, headers=auth()
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("cursor is not valid")


BAD_PARAMETERS = {
    "limit-zero": ({"limit": "0"}, "limit"),
    "limit-too-big": ({"limit": "501"}, "limit"),
    "limit-word": ({"limit": "abc"}, "limit"),
    "limit-negative": ({"limit": "-1"}, "limit"),
    "limit-empty": ({"limit": ""}, "limit"),
    "limit-superscript": ({"limit": "\u00b2"}, "limit"),
    "limit-fraction": ({"limit": "2.5"}, "limit"),
    "status": ({"status": "done"}, "status"),
    "status-case": ({"status": "COMPLETED"}, "status"),
    "passed": ({"passed": "maybe"}, "passed"),
    "since-word": ({"since": "yesterday"}, "since"),
    "since-no-unit": ({"since": "24"}, "since"),
    "until-word": ({"until": "tomorrow"}, "until"),
    "changed-since-word": ({"changed_since": "yesterday"}, "changed_since"),
    "changed-since-empty": ({"changed_since": ""}, "changed_since"),
    "changed-since-number": ({"changed_since": "1700000000"}, "changed_since"),
    "changed-since-before-year-1": (
        {"changed_since": "0001-01-01T00:00:00+01:00"},
        "changed_since",
    ),
    "changed-since-too-long-ago": ({"changed_since": "99999999999w"}, "changed_since"),
    "cursor": ({"cursor": "garbage"}, "cursor"),
    "cursor-not-a-pair": ({"cursor": "WzEsIDJd"}, "cursor"),
    "unknown": ({"foo": "1"}, "foo"),
    "client-ref-empty": ({"client_ref": ""}, "client_ref"),
    "task-type-too-long": ({"task_type": "x" * 256}, "task_type"),
    "failure-code-empty": ({"failure_code": ""}, "failure_code"),
    "q-too-long": ({"q": "x" * 201}, "q"),
}


@pytest.mark.parametrize(("params", "name"), BAD_PARAMETERS.values(), ids=BAD_PARAMETERS.keys())
def test_bad_parameters_are_400_naming_the_parameter(
    client: TestClient, params: dict[str, str], name: str
) -> None:
    response = client.get("/api/evaluations", params=params, headers=auth())
    assert response.status_code == 400
    body = response.json()
    assert body["ok"] is False
    assert body["error"].startswith(name) or repr(name) in body["error"]
    assert "\n" not in body["error"]


@pytest.mark.parametrize(
    ("path", "params", "name"),
    [
        ("/api/stats", {"limit": "5"}, "limit"),
        ("/api/stats", {"status": "done"}, "status"),
        ("/api/stats", {"since": "soon"}, "since"),
        ("/api/stats", {"changed_since": "24h"}, "changed_since"),  # a list's, not a filter
        ("/api/evaluations/e-01", {"embed": "judges"}, "embed"),
        ("/api/client-refs/cust-1", {"limit": "5"}, "limit"),
    ],
)
def test_other_endpoints_check_their_parameters(
    dataset: TestClient, path: str, params: dict[str, str], name: str
) -> None:
    response = dataset.get(path, params=params, headers=auth())
    assert response.status_code == 400
    assert name in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "params", "error"),
    [
        (  # the last one was taken without a word
            "/api/evaluations",
            [("status", "failed"), ("status", "completed")],
            "parameter 'status' given more than once; give it once",
        ),
        ("/api/evaluations", [("limit", "1"), ("limit", "3")], "parameter 'limit' given"),
        ("/api/forwards", [("state", "dead"), ("state", "done")], "parameter 'state' given"),
        (  # "expected one of " and nothing
            "/api/evaluations/e-01",
            [("x", "1")],
            "unknown parameter 'x'; this takes none",
        ),
    ],
)
def test_parameters_are_given_once_and_known(
    client: TestClient, path: str, params: list[tuple[str, str]], error: str
) -> None:
    response = client.get(path, params=params, headers=auth())
    assert response.status_code == 400
    assert response.json()["error"].startswith(error)


def test_a_full_last_page_of_forwards_has_no_next_cursor(
    client: TestClient, settings: Settings
) -> None:
    """As the evaluations' pages: a cursor only when there is more (it led to an empty page)."""
    conn = connect(settings.database)
    for n in range(3):
        conn.execute(
            "INSERT INTO outbox (event_id, sink, state, created_at) VALUES (?, 's', 'dead', ?)",
            (f"event-{n}", "2026-11-20T09:00:00.000000Z"),
        )
    conn.commit()
    conn.close()
    assert get(client, "/api/forwards", limit="3")["next_cursor"] is None
    first = get(client, "/api/forwards", limit="2")
    rest = get(client, "/api/forwards", limit="2", cursor=first["next_cursor"])
    assert [len(first["items"]), len(rest["items"]), rest["next_cursor"]] == [2, 1, None]


# GET /api/evaluations/{id}


def test_evaluation_detail(client: TestClient) -> None:
    bodies = [
        fixture("evaluation-completed-envelope.json"),
        fixture("get-evaluation-embedded.json"),
        '{"id":"0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11" ,  "note":"Gr\\u00f6\\u00dfe ✓"}'.encode(),
    ]
    for n, body in enumerate(bodies):
        response = post_callback(client, body, headers={"runflow-request-id": f"req-{n}"})
        assert response.status_code == 200
    found = get(client, f"/api/evaluations/{COMPLETED_ID}")
    assert set(found) == {"evaluation", "issues", "deliveries", "forwards"}
    evaluation = found["evaluation"]
    assert set(evaluation) >= ITEM_KEYS | {"runflow"}
    assert (evaluation["id"], evaluation["status"], evaluation["passed"]) == (
        COMPLETED_ID,
        "completed",
        False,
    )
    runflow = evaluation["runflow"]
    assert runflow["note"] == "Größe ✓"
    assert runflow["action"]["primary_action"] == "regenerate"
    assert found["issues"] == [
        {
            "judge": "anatomy",
            "category": "anatomy",
            "subcategory": "hands",
            "detail": "Left hand has six fingers",
        },
        {
            "judge": "wardrobe",
            "category": "garment",
            "subcategory": "collar",
            "detail": "Collar asymmetry <@U123> & <!channel>",
        },
    ]
    assert [d["body"].encode() for d in found["deliveries"]] == bodies
    for n, (sent, stored) in enumerate(zip(bodies, found["deliveries"], strict=True)):
        assert stored["sha256"] == hashlib.sha256(sent).hexdigest()
        assert stored["request_id"] == f"req-{n}"
        assert stored["headers"]["runflow-request-id"] == f"req-{n}"
        assert stored["headers"]["runflow-signature"]
        assert (stored["outcome"], stored["receipts"], stored["secret_index"]) == ("stored", 1, 0)
    assert found["forwards"] == []


def test_a_repeated_delivery_counts_receipts(client: TestClient) -> None:
    body = fixture("evaluation-completed.json")
    store_all(client, body)
    post_callback(client, body, SECRET_B)
    [stored] = get(client, f"/api/evaluations/{COMPLETED_ID}")["deliveries"]
    assert (stored["receipts"], stored["secret_index"]) == (2, 0)


@pytest.mark.parametrize("evaluation_id", ["nope", "e-01x", "E-01", "e%2001"])
def test_unknown_evaluation_is_404(dataset: TestClient, evaluation_id: str) -> None:
    response = dataset.get(f"/api/evaluations/{evaluation_id}", headers=auth())
    assert response.status_code == 404
    assert response.json()["ok"] is False
    assert "no evaluation" in response.json()["error"]


# GET /api/client-refs/{client_ref}


def test_client_ref_current_latest_and_history(dataset: TestClient) -> None:
    found = get(dataset, "/api/client-refs/cust-1")
    assert (found["client_ref"], found["total"]) == ("cust-1", 2)
    assert found["current"]["id"] == "e-02"
    assert found["latest"]["id"] == "e-02"
    assert [item["id"] for item in found["evaluations"]] == ["e-02", "e-01"]
    running_only = get(dataset, "/api/client-refs/cust-3")
    assert running_only["current"] is None
    assert running_only["latest"]["id"] == "e-05"


@pytest.mark.parametrize(
    "client_ref", ["a/b", "a/b/c", "trailing/", "/leading", ODD_REF, "ünï cødé", "x" * 255]
)
def test_client_refs_with_any_characters(client: TestClient, client_ref: str) -> None:
    store_all(client, make_body("e-1", client_ref=client_ref, completed_at="2026-11-20"))
    found = get(client, "/api/client-refs/" + quote(client_ref, safe="/"))
    assert found["client_ref"] == client_ref
    assert found["current"]["id"] == "e-1"
    page = get(client, "/api/evaluations", client_ref=client_ref)
    assert ids(page) == {"e-1"}


def test_retries_move_current(client: TestClient) -> None:
    store_all(
        client,
        make_body("e-1", client_ref="job", completed_at="2026-11-20T09:00:00Z"),
        make_body(
            "e-2",
            "running",
            client_ref="job",
            attempt_number=2,
            parent_evaluation_id="e-1",
        ),
    )
    found = get(client, "/api/client-refs/job")
    assert found["current"] is None
    assert {item["id"]: item["superseded"] for item in found["evaluations"]} == {
        "e-1": True,
        "e-2": False,
    }
    store_all(
        client,
        make_body(
            "e-2",
            client_ref="job",
            attempt_number=2,
            parent_evaluation_id="e-1",
            completed_at="2026-11-20T09:05:00Z",
            updated_at="2026-11-20T09:05:00Z",
        ),
    )
    found = get(client, "/api/client-refs/job")
    assert (found["current"]["id"], found["latest"]["id"]) == ("e-2", "e-2")


@pytest.mark.parametrize("client_ref", ["nope", "cust", "cust-1/", "CUST-1"])
def test_unknown_client_ref_is_404(dataset: TestClient, client_ref: str) -> None:
    response = dataset.get(f"/api/client-refs/{client_ref}", headers=auth())
    assert response.status_code == 404
    assert client_ref in response.json()["error"]


# GET /api/stats


def test_stats_of_an_empty_store(client: TestClient) -> None:
    stats = get(client, "/api/stats")
    assert stats == {
        "total": 0,
        "by_status": {},
        "passed": 0,
        "not_passed": 0,
        "pass_rate": None,
        "mean_score": None,
        "score_distribution": [{"from": n / 10, "to": (n + 1) / 10, "count": 0} for n in range(10)],
        "failure_codes": [],
        "top_issue_categories": [],
        "top_issues": [],
        "per_day": [],
        "per_task_type": [],
    }


def _by(rows: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    return {row.pop(key): row for row in rows}


def test_stats_of_a_known_data_set(dataset: TestClient) -> None:
    stats = get(dataset, "/api/stats")
    assert stats["total"] == 6
    assert stats["by_status"] == {"completed": 3, "failed": 2, "running": 1}
    assert (stats["passed"], stats["not_passed"]) == (2, 1)
    assert stats["pass_rate"] == 0.6667
    assert stats["mean_score"] == pytest.approx(0.6933)
    assert [bucket["count"] for bucket in stats["score_distribution"]] == [
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        1,
        0,
        1,
    ]
    assert sorted(stats["failure_codes"], key=lambda row: row["failure_code"]) == [
        {"failure_code": "invalid_media", "count": 1},
        {"failure_code": "timed_out", "count": 1},
    ]
    assert stats["top_issue_categories"] == [
        {"category": "anatomy", "subcategory": "hands", "count": 2},
        {"category": "garment", "subcategory": "collar", "count": 1},
    ]
    assert sorted(stats["top_issues"], key=lambda row: row["label"]) == [
        {"label": "100% blur", "count": 1},
        {"label": "Collar asymmetry", "count": 1},
        {"label": "Left hand has six fingers", "count": 1},
    ]
    verdict = {"passed": 1, "not_passed": 1, "failed": 0, "pass_rate": 0.5, "mean_score": 0.665}
    product = {"passed": 1, "not_passed": 0, "failed": 2, "pass_rate": 1.0, "mean_score": 0.75}
    assert _by(stats["per_task_type"], "task_type") == {
        "headshot": {"total": 3, **verdict},
        "product": {"total": 3, **product},
    }
    for row in stats["per_day"] + stats["per_task_type"]:
        assert all(type(row[key]) is int for key in ("total", "passed", "not_passed", "failed"))
    [running] = get(dataset, "/api/evaluations", status="running")["items"]
    today = running["received_at"][:10]
    assert _by(stats["per_day"], "day") == {
        "2026-11-20": {"total": 2, **verdict},
        "2026-11-21": {"total": 3, **product},
        today: {
            "total": 1,
            "passed": 0,
            "not_passed": 0,
            "failed": 0,
            "pass_rate": None,
            "mean_score": None,
        },
    }


@pytest.mark.parametrize(
    ("params", "total", "by_status"),
    [
        ({"task_type": "product"}, 3, {"completed": 1, "failed": 2}),
        ({"client_ref": "cust-1"}, 2, {"completed": 2}),
        ({"passed": "true"}, 2, {"completed": 2}),
        ({"since": "24h"}, 4, {"completed": 1, "failed": 2, "running": 1}),
        ({"until": "24h"}, 2, {"completed": 2}),
        ({"q": "cust-2"}, 2, {"completed": 1, "failed": 1}),
        ({"status": "pending"}, 0, {}),
    ],
)
def test_stats_filters(
    dataset: TestClient, params: dict[str, str], total: int, by_status: dict[str, int]
) -> None:
    stats = get(dataset, "/api/stats", **params)
    assert (stats["total"], stats["by_status"]) == (total, by_status)
    assert sum(row["count"] for row in stats["top_issue_categories"]) <= 3


def test_stats_issue_categories_follow_the_filter(dataset: TestClient) -> None:
    stats = get(dataset, "/api/stats", task_type="product")
    assert stats["top_issue_categories"] == [
        {"category": "anatomy", "subcategory": "hands", "count": 1}
    ]
    assert stats["top_issues"] == [{"label": "100% blur", "count": 1}]


# OpenAPI


def _schema(name: str) -> dict[str, Any]:
    document = openapi.document()
    return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}


def test_every_api_route_is_documented() -> None:
    documented = set(openapi.document()["paths"])
    for api_route in api.routes:
        assert isinstance(api_route, Route)
        assert "/api" + re.sub(r":\w+}", "}", api_route.path) in documented
    app = create_app(Settings(webhook_secrets=("x",)))
    dashboard = {route.path for route in receiver_dashboard.routes() if isinstance(route, Route)}
    for route in app.routes:
        if isinstance(route, Route) and route.path not in {"/openapi.json", *dashboard}:
            assert route.path in documented


def test_required_fields_of_the_schemas_are_present(dataset: TestClient) -> None:
    schemas = openapi.SCHEMAS
    page = get(dataset, "/api/evaluations")
    assert set(page) >= set(schemas["EvaluationPage"]["required"])
    for found in page["items"]:
        assert set(found) >= set(schemas["Evaluation"]["required"])
    detail = get(dataset, "/api/evaluations/e-02")
    assert set(detail) >= set(schemas["EvaluationDetail"]["required"])
    client_ref = get(dataset, "/api/client-refs/cust-1")
    assert set(client_ref) >= set(schemas["ClientRef"]["required"])
    assert set(get(dataset, "/api/stats")) >= set(schemas["Stats"]["required"])


def test_openapi_document_is_valid_openapi_3_1(client: TestClient) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(client.get("/openapi.json").json())


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        ("/api/evaluations", "EvaluationPage"),
        ("/api/evaluations?limit=2", "EvaluationPage"),
        ("/api/evaluations/e-02", "EvaluationDetail"),
        ("/api/evaluations/e-05", "EvaluationDetail"),
        ("/api/client-refs/cust-1", "ClientRef"),
        ("/api/client-refs/cust-3", "ClientRef"),
        ("/api/stats", "Stats"),
        ("/api/evaluations/nope", "Error"),
        ("/api/evaluations?limit=0", "Error"),
    ],
)
def test_responses_match_their_schema(dataset: TestClient, path: str, schema: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    response = dataset.get(path, headers=auth())
    jsonschema.Draft202012Validator(_schema(schema)).validate(response.json())


def test_error_responses_match_the_error_schema(client: TestClient) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(_schema("Error"))
    validator.validate(client.get("/api/stats").json())
    validator.validate(post_callback(client, b"[]").json())
