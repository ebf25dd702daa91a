"""The dashboard served by the app with its lifespan: login, CSRF, CSP, escaping, pages."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.auth import COOKIE
from receiver.sinkspec import SinkSpec
from receiver.store import GLANCE_WAIT

from .database import POSTGRES
from .helpers import TOKEN, auth, fixture, make_settings, post_callback

EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
PAGES = [
    "/",
    "/evaluations",
    "/evaluations?status=completed&passed=false&sort=oldest",
    f"/evaluations/{EVALUATION_ID}",
    "/client-refs/customer-job-123",
    "/forwards?state=dead",
    "/forwards?state=done",
    "/partials/rows?limit=5",
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[TestClient]:
    """A client that has logged in through the form, like a person."""
    with TestClient(create_app(make_settings(tmp_path))) as client:
        body = json.loads(fixture("get-evaluation-embedded.json"))
        body["judges"][0]["issues"][0]["detail"] = HOSTILE
        body["client_ref"] = "customer-job-123"
        post_callback(client, json.dumps(body).encode())
        post_callback(client, fixture("evaluation-failed.json"))
        response = client.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
        assert response.status_code == 303
        yield client


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize("path", PAGES)
def test_pages_need_a_login(tmp_path: Path, path: str) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


@pytest.mark.parametrize("path", PAGES)
def test_pages_render_with_a_strict_csp(browser: TestClient, path: str) -> None:
    response = browser.get(path)
    assert response.status_code == 200, response.text
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert "<script>" not in response.text  # no inline script anywhere
    assert " style=" not in response.text


@pytest.mark.parametrize("path", ["/login", "/"])
def test_pages_name_an_icon_that_is_served(browser: TestClient, path: str) -> None:
    """Without one, every visit asked for /favicon.ico: a 404 in the browser console and the
    access log."""
    found = re.search(r'<link rel="icon" href="([^"]+)"', browser.get(path).text)
    assert found is not None
    icon = browser.get(found.group(1))
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")


def test_bearer_token_also_opens_pages(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        assert client.get("/", headers=auth()).status_code == 200


def test_payload_strings_render_as_text(browser: TestClient) -> None:
    page = browser.get(f"/evaluations/{EVALUATION_ID}").text
    assert (
        "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    )
    assert HOSTILE not in page
    assert "&lt;@U123&gt;" not in page or "<@U123>" not in page


def test_the_session_cookie_is_httponly_and_strict(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=")
    assert "httponly" in cookie
    assert "samesite=strict" in cookie


@pytest.mark.parametrize(
    ("next_path", "landing"),
    [
        ("/evaluations", "/evaluations"),
        ("//evil.example", "/"),
        ("https://evil.example", "/"),
        ("/\\evil.example", "/"),
    ],
)
def test_login_goes_back_only_to_local_paths(tmp_path: Path, next_path: str, landing: str) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post(
            "/login", data={"token": TOKEN, "next": next_path}, follow_redirects=False
        )
    assert response.headers["location"] == landing


def test_a_wrong_token_is_refused_on_the_page(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.post("/login", data={"token": "nope"})
        assert "That token is not right." in response.text
        assert COOKIE not in client.cookies


ACTIONS = [
    (f"/evaluations/{EVALUATION_ID}/feedback", {"rating": "up"}),
    ("/forwards/1/retry", {"next": "/"}),
    ("/forwards/retry-dead", {"sink": "x"}),
    ("/logout", {"next": "/"}),
]


@pytest.mark.parametrize(("path", "data"), ACTIONS)
def test_every_state_change_needs_the_csrf_token(
    browser: TestClient, path: str, data: dict[str, str]
) -> None:
    for csrf in (None, "forged"):
        sent = data if csrf is None else {**data, "csrf": csrf}
        response = browser.post(path, data=sent, follow_redirects=False)
        assert response.status_code == 403
        assert "CSRF" in response.text


def test_api_with_the_cookie_needs_the_csrf_header_for_changes(browser: TestClient) -> None:
    assert browser.get("/api/evaluations").status_code == 200
    refused = browser.post("/api/deliveries/1/replay")
    assert refused.status_code == 403
    csrf = csrf_of(browser.get("/").text)
    allowed = browser.post("/api/deliveries/1/replay", headers={"x-csrf-token": csrf})
    assert allowed.status_code == 200


def test_feedback_without_runflow_shows_the_reason_on_the_page(browser: TestClient) -> None:
    page = browser.get(f"/evaluations/{EVALUATION_ID}").text
    response = browser.post(
        f"/evaluations/{EVALUATION_ID}/feedback", data={"csrf": csrf_of(page), "rating": "down"}
    )
    assert response.status_code == 200
    assert "Feedback not saved: RUNFLOW_API_KEY is not set" in response.text


def test_a_bad_filter_is_explained_on_the_page(browser: TestClient) -> None:
    response = browser.get("/evaluations?since=yesterday")
    assert response.status_code == 400
    assert "since: expected an ISO 8601 time" in response.text


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/evaluations?client_ref=nobody", "No evaluations match these filters."),
        ("/evaluations?q=nothing-like-this&status=failed", "No evaluations match these filters."),
        ("/evaluations?since=yesterday", None),  # refused: no search ran to report on
    ],
)
def test_an_empty_table_says_why(browser: TestClient, path: str, said: str | None) -> None:
    """Two evaluations are stored: "No evaluations yet." under filters that leave none (or
    under a refused filter) told a new user the store was empty."""
    page = browser.get(path).text
    assert "No evaluations yet." not in page
    empty = re.findall(r'<p class="muted empty"[^>]*>([^<]*)</p>', page)
    assert empty == ([said] if said else [])


def test_unknown_evaluation_is_an_html_404(browser: TestClient) -> None:
    response = browser.get("/evaluations/nope")
    assert response.status_code == 404
    assert "no evaluation &#39;nope&#39;" in response.text


def test_list_pages_walk_with_the_cursor(browser: TestClient) -> None:
    for number in range(60):
        body = json.loads(fixture("evaluation-completed.json"))
        body["id"] = f"0193a7c2-0000-7000-8000-{number:012d}"
        post_callback(browser, json.dumps(body).encode())
    first = browser.get("/evaluations").text
    assert first.count('<tr data-id="') == 50
    next_url = re.search(r'class="next" href="([^"]+)"', first)
    assert next_url is not None
    second = browser.get(next_url.group(1).replace("&amp;", "&")).text
    assert second.count('<tr data-id="') == 12
    assert 'class="next"' not in second


def test_logout_ends_the_session(browser: TestClient) -> None:
    csrf = csrf_of(browser.get("/").text)
    browser.post("/logout", data={"csrf": csrf})
    assert browser.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    "judged",
    [
        {"judges": 5},
        {"gate_failures": 5},
        {"judges": [{"name": "j", "issues": 5}]},
        {"judges": [{"name": "j", "evidence": 5}]},
        {"judges": [{"name": "j", "issues": [5, {"category": "c"}], "evidence": "one"}]},
        {"judges": [{"name": "j", "confidence": 10**400}]},  # no float holds it: it was a 500
    ],
)
def test_the_detail_page_shows_a_body_of_any_shape(browser: TestClient, judged: dict) -> None:
    """A signed body is stored as Runflow sent it; its page must still open."""
    body = json.loads(fixture("evaluation-completed.json"))
    body.update(id="0193a7c2-0000-7000-8000-000000000077", **judged)
    post_callback(browser, json.dumps(body).encode())
    assert browser.get(f"/evaluations/{body['id']}").status_code == 200


@pytest.mark.parametrize(
    ("image_url", "shown"),
    [
        ("https://cdn.example.com/i.png", '<img class="evaluation-image" src="https://cdn'),
        # The CSP lets images come over https only: an <img> of this was a broken image.
        ("http://cdn.example.com/i.png", '<a href="http://cdn.example.com/i.png" rel='),
        ("javascript:alert(1)", "No image URL."),
    ],
)
def test_the_evaluated_image_is_shown_where_the_policy_allows(
    browser: TestClient, image_url: str, shown: str
) -> None:
    body = json.loads(fixture("evaluation-completed.json"))
    body.update(id="0193a7c2-0000-7000-8000-000000000079", generated_image_url=image_url)
    post_callback(browser, json.dumps(body).encode())
    page = browser.get(f"/evaluations/{body['id']}").text
    assert shown in page
    assert ("<img" in page) == image_url.startswith("https://")


def test_a_long_client_ref_history_links_to_all_of_it(browser: TestClient) -> None:
    """The page lists the newest 500: past that it said "History (501)" over 500 rows."""
    body = json.loads(fixture("evaluation-completed.json"))
    for n in range(501):
        body.update(id=f"0193a7c2-0000-7000-8000-{n:012d}", client_ref="a&b many")
        post_callback(browser, json.dumps(body).encode())
    page = browser.get("/client-refs/a%26b%20many").text
    assert "History (501)" in page
    assert 'The newest 500 of 501: <a href="/evaluations?client_ref=a%26b+many">' in page
    assert "history-more" not in browser.get("/client-refs/customer-job-123").text


@pytest.mark.parametrize(
    ("client_ref", "link"),
    [
        ("x/../victim", "/client-refs/x%2F..%2Fvictim"),
        ("batch/42", "/client-refs/batch%2F42"),
        ("..", "/evaluations?client_ref=.."),
        (".", "/evaluations?client_ref=."),
    ],
)
def test_a_client_ref_links_to_its_own_page(
    browser: TestClient, client_ref: str, link: str
) -> None:
    """Jinja's urlencode keeps `/`, and a browser resolves dot segments: `x/../victim` linked
    to the page of `victim`."""
    body = json.loads(fixture("evaluation-completed.json"))
    body.update(id="0193a7c2-0000-7000-8000-000000000078", client_ref=client_ref)
    post_callback(browser, json.dumps(body).encode())
    assert f'href="{link}"' in browser.get("/evaluations").text
    page = browser.get(link)
    assert page.status_code == 200
    assert body["id"] in page.text


def test_an_evaluation_id_with_a_slash_has_a_page(browser: TestClient) -> None:
    body = json.loads(fixture("evaluation-completed.json"))
    body["id"] = "batch/7"
    post_callback(browser, json.dumps(body).encode())
    assert 'href="/evaluations/batch%2F7"' in browser.get("/evaluations").text
    assert browser.get("/evaluations/batch%2F7").status_code == 200


def test_a_message_in_a_link_made_elsewhere_is_not_shown(browser: TestClient) -> None:
    """Only the dashboard's own redirects carry a message (signed); a crafted
    `?error=Log in again at …` shows nothing."""
    text = "Your session expired. Log in again at https://receiver-login.example"
    for kind in ("error", "notice"):
        for forged in ("", "&sig=" + "0" * 64):
            assert text not in browser.get(f"/?{kind}={text}{forged}").text
    login = browser.post("/logout", data={"csrf": csrf_of(browser.get("/").text)})
    assert "Logged out." in login.text


FAILED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e22"
LONG_AGO = "2000-01-01T00:00:00Z"


def rows_of(page: str) -> list[tuple[str, bool]]:
    """(id, gone) of each row in a live table's answer, in order."""
    return [
        (found.group(1), "data-gone" in found.group(0))
        for found in re.finditer(r'<tr data-id="([^"]+)"[^>]*>', page)
    ]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [(EVALUATION_ID, False), (FAILED_ID, False)]),
        ({"status": "failed"}, [(EVALUATION_ID, True), (FAILED_ID, False)]),
        ({"passed": "false"}, [(EVALUATION_ID, False), (FAILED_ID, True)]),
        ({"passed": "true"}, [(EVALUATION_ID, True), (FAILED_ID, True)]),
        ({"client_ref": "customer-job-123"}, [(EVALUATION_ID, False), (FAILED_ID, True)]),
        ({"q": "0e22"}, [(EVALUATION_ID, True), (FAILED_ID, False)]),
        ({"since": "24h", "status": "failed"}, [(EVALUATION_ID, True), (FAILED_ID, False)]),
        ({"until": "24h"}, []),
    ],
)
def test_live_rows_are_the_changes_with_those_that_left_the_filter_marked(
    browser: TestClient, filters: dict[str, str], expected: list[tuple[str, bool]]
) -> None:
    """What a live table polls: every row written since, oldest change first; one that does
    not pass the page's filters comes as an empty hidden row, for the table to drop."""
    response = browser.get("/partials/rows", params={**filters, "changed_since": LONG_AGO})
    assert response.status_code == 200
    assert rows_of(response.text) == expected
    assert "x-next-cursor" not in response.headers
    for gone in re.findall(r"<tr [^>]*data-gone[^>]*>(.*?)</tr>", response.text):
        assert gone == ""  # nothing of a row the filter does not show


def test_live_rows_come_a_page_at_a_time_with_the_next_cursor(browser: TestClient) -> None:
    seen: list[tuple[str, bool]] = []
    params = {"changed_since": LONG_AGO, "limit": "1"}
    while True:
        response = browser.get("/partials/rows", params=params)
        seen += rows_of(response.text)
        if "x-next-cursor" not in response.headers:
            break
        params["cursor"] = response.headers["x-next-cursor"]
    assert seen == [(EVALUATION_ID, False), (FAILED_ID, False)]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"changed_since": "yesterday"}, "changed_since: expected an ISO 8601 time"),
        ({"changed_since": LONG_AGO, "cursor": "garbage"}, "cursor is not valid"),
        ({"changed_since": LONG_AGO, "status": "done"}, "status must be one of"),
    ],
)
def test_live_rows_refuse_a_bad_parameter(
    browser: TestClient, params: dict[str, str], reason: str
) -> None:
    response = browser.get("/partials/rows", params=params)
    assert response.status_code == 400
    assert reason in response.text


@pytest.mark.parametrize(
    ("path", "table"),
    [
        ("/", "recent"),
        ("/evaluations", "evaluations"),
        ("/evaluations?status=failed", "evaluations"),
    ],
)
def test_live_tables_say_when_they_were_read_and_that_they_hold_every_row(
    browser: TestClient, path: str, table: str
) -> None:
    page = browser.get(path).text
    found = re.search(rf'<table id="{table}" class="rows" data-live="[^"]+"([^>]*)>', page)
    assert found is not None
    read_at = re.search(r'data-changed-since="([^"]+)"', found.group(1))
    assert read_at is not None
    rows = re.findall(r'<tr data-id="[^"]+" data-received="[^"]+" data-changed="([^"]+)"', page)
    assert rows
    assert all(stamp <= read_at.group(1) for stamp in rows)
    assert "data-complete" in found.group(1)  # two evaluations: no page after this one


def test_a_full_first_page_is_live_but_not_complete(browser: TestClient) -> None:
    for n in range(50):
        post_callback(
            browser, json.dumps({"id": f"more-{n:02d}", "status_code": "pending"}).encode()
        )
    page = browser.get("/evaluations").text
    found = re.search(r'<table id="evaluations" class="rows" data-live="[^"]+"([^>]*)>', page)
    assert found is not None
    assert "data-complete" not in found.group(1)


@pytest.mark.parametrize(
    "path",
    [
        "/forwards?after=99999999999999999999",
        "/forwards?after=" + "9" * 5000,
        "/partials/rows?limit=" + "9" * 5000,
    ],
)
def test_a_huge_number_in_the_query_is_not_an_error(browser: TestClient, path: str) -> None:
    assert browser.get(path).status_code == 200


@pytest.mark.parametrize("after", ["abc", "-1", "1.5", "\u00b2"])
def test_a_forwards_page_after_no_forward_id_is_refused(browser: TestClient, after: str) -> None:
    """It showed the first page as if asked for it."""
    response = browser.get("/forwards", params={"after": after})
    assert response.status_code == 400
    assert "after must be a forward id" in response.text


def test_a_reason_as_long_as_the_form_allows_is_read(browser: TestClient) -> None:
    """2,000 characters (the form's maxlength, Runflow's limit) in any script: 9 bytes each,
    URL-encoded, went past the form limit (a 400 page, the text lost)."""
    page = browser.get(f"/evaluations/{EVALUATION_ID}").text
    response = browser.post(
        f"/evaluations/{EVALUATION_ID}/feedback",
        data={"csrf": csrf_of(page), "rating": "down", "reason": "手" * 2000},
    )
    assert response.status_code == 200
    assert "Feedback not saved: RUNFLOW_API_KEY is not set" in response.text


def test_retrying_all_dead_letters_of_a_sink_stays_on_that_sink(browser: TestClient) -> None:
    page = browser.get("/forwards?state=dead&sink=consumer").text
    assert 'href="/forwards?state=done&amp;sink=consumer"' in page
    answer = browser.post(
        "/forwards/retry-dead",
        data={"csrf": csrf_of(page), "sink": "consumer"},
        follow_redirects=False,
    )
    assert answer.headers["location"].startswith("/forwards?state=dead&sink=consumer&")


def test_a_refused_feedback_keeps_the_reason_typed(browser: TestClient) -> None:
    page = browser.get(f"/evaluations/{EVALUATION_ID}").text
    response = browser.post(
        f"/evaluations/{EVALUATION_ID}/feedback",
        data={"csrf": csrf_of(page), "rating": "down", "reason": 'the hands are "wrong"'},
    )
    assert "Feedback not saved" in response.text
    assert 'value="the hands are &#34;wrong&#34;"' in response.text
    forged = browser.get(f"/evaluations/{EVALUATION_ID}?error=x&reason=typed+elsewhere").text
    assert "typed elsewhere" not in forged


def test_the_overview_lists_every_configured_sink_before_its_first_forward(
    tmp_path: Path,
) -> None:
    """README: the overview shows "every sink's outbox". A sink with nothing sent yet (a new
    install, or filters that matched nothing so far) is configured all the same."""
    slack = SinkSpec(name="ops-slack", type="slack", url="https://hooks.slack.com/services/x")
    settings = make_settings(tmp_path, sinks=(slack,), worker=False)
    with TestClient(create_app(settings)) as client:
        page = client.get("/", headers=auth()).text
    assert 'data-sink="ops-slack"' in page
    assert "No sinks configured" not in page


def test_an_empty_categories_chart_says_where_categories_come_from(tmp_path: Path) -> None:
    """Top issue labels come with every verdict, issue categories only with its judges (a
    refetch, or a callback with the full object): beside a full "Top issues" chart, a bare
    "no data yet" under the categories read as a fault."""
    with TestClient(create_app(make_settings(tmp_path, worker=False))) as client:
        post_callback(client, fixture("evaluation-completed.json"))
        page = client.get("/", headers=auth()).text
    assert "no judges&#x27; issues yet: they come with a refetch or a full callback" in page


@pytest.mark.skipif(not POSTGRES, reason="a pool of connections: PostgreSQL's")
def test_the_overviews_forward_counts_wait_for_a_busy_pool_as_every_page_does(
    tmp_path: Path,
) -> None:
    """/metrics gives up on a pooled connection after GLANCE_WAIT (1 s: PostgreSQL down), but
    the overview's forward counts (store.outbox_depth(), as pages.overview asks) are a page's
    read like any other: a pool busy a moment longer is not a fault (it was a 503 after 1 s)."""
    settings = make_settings(tmp_path, database_pool_size=1, worker=False)
    with TestClient(create_app(settings)) as client:
        store = client.app.state.receiver.store  # type: ignore[attr-defined]
        held = threading.Event()

        def hold() -> None:
            with store.read():
                held.set()
                time.sleep(GLANCE_WAIT * 2)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        try:
            assert store.outbox_depth() == {}
        finally:
            holder.join()


def test_a_failed_refetch_is_shown_with_its_reason_escaped(browser: TestClient) -> None:
    """A refetch that gave up (Runflow 404s, or never catches up with the verdict) was seen
    only in the worker's log and a metric: the page says so, and why."""
    store = browser.app.state.receiver.store  # type: ignore[attr-defined]
    store.catch_up()  # the callback posted is applied, so that this changes it
    store.writer.submit(
        lambda conn: conn.execute(
            "UPDATE evaluations SET refetch_state = 'failed', refetch_attempts = 10,"
            " refetch_error = ? WHERE id = ?",
            (f"Runflow answered 404: {HOSTILE}", EVALUATION_ID),
        )
    ).result()
    page = browser.get(f"/evaluations/{EVALUATION_ID}").text
    assert "<dt>Refetch</dt>" in page
    assert "failed after 10 attempts" in page
    assert "Runflow answered 404: " in page
    assert HOSTILE not in page
