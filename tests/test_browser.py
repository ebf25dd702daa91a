"""The dashboard in a real headless Chromium against a real receiver process, the Runflow
emulator and a recording consumer: log in, overview, filters, a detail with hostile text,
feedback (and Runflow refusing it), retrying a dead letter, live rows. Any console error,
uncaught error or dialog fails the test. Screenshots go to RECEIVER_SCREENSHOTS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from receiver.fakes.emulator import (
    NOT_PASSED,
    PASSED,
    Verdict,
    callback_body,
    finished,
    pending_evaluation,
)
from receiver.fakes.recorder import Recorder
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.signing import sign

from .browser import IMAGE_HOST, TIMEOUT_MS, Watched, chromium, log_in, see, shot, watch
from .helpers import SECRET_A, TOKEN
from .servers import ReceiverProcess

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Locator, Page

pytestmark = pytest.mark.services
API_KEY = "rf_browser_key"
XSS = "<script>alert(1)</script> <img src=x onerror=alert(1)>"
FAILED = Verdict("failed", failure_code="invalid_media")


@dataclass
class World:
    runflow: FakeRunflow
    consumer: Recorder
    receiver: ReceiverProcess
    ids: dict[str, str] = field(default_factory=dict)  # name → evaluation id, in posting order

    @property
    def url(self) -> str:
        return self.receiver.url

    def post(self, name: str, verdict: Verdict, client_ref: str, **request: Any) -> str:
        """Runflow finished an evaluation: the emulator holds it (judges and all, for the
        refetch), and its bare callback is posted, signed, to the receiver."""
        evaluation_id = self.submit(name, client_ref, announce=False, **request)
        self.finish(name, verdict)
        return evaluation_id

    def submit(self, name: str, client_ref: str, announce: bool = True, **request: Any) -> str:
        """Runflow took an evaluation: pending, as `receiver submit` stores it; with
        `announce`, the receiver hears of it now (a pending callback), not only at its end."""
        evaluation_id = f"0193a7c2-0000-7000-8000-{len(self.ids) + 1:012d}"
        submitted = {
            "generated_image_url": f"https://{IMAGE_HOST}/renders/{name}.png",
            "task_type": "headshot",
            "client_ref": client_ref,
            "generation_prompt": "studio lighting, neutral grey background",
            **request,
        }
        self.ids[name] = evaluation_id
        self.runflow.evaluations[evaluation_id] = pending_evaluation(submitted, evaluation_id)
        if announce:
            self.send(name)
        return evaluation_id

    def finish(self, name: str, verdict: Verdict) -> None:
        evaluation_id = self.ids[name]
        done = finished(self.runflow.evaluations[evaluation_id], verdict, 1234)
        if name == "hostile":  # judge text that must render as text
            done["judges"][0]["issues"][0]["detail"] = XSS
            done["top_issues"] = [XSS, *done["top_issues"]]
        self.runflow.evaluations[evaluation_id] = done
        self.send(name)

    def send(self, name: str) -> None:
        """The evaluation's callback as Runflow holds it now, signed."""
        body = callback_body(self.runflow.evaluations[self.ids[name]], "bare")
        answer = httpx.post(
            f"{self.url}/webhooks/runflow",
            content=body,
            headers={"content-type": "application/json", "runflow-signature": sign(body, SECRET_A)},
        )
        assert answer.status_code == 200, answer.text

    def api(self, path: str) -> Any:
        answer = httpx.get(f"{self.url}/api{path}", headers={"authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def settled(self, dead: int) -> None:
        """Every evaluation refetched and every forward done or dead (`dead` of them)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            details = [self.api(f"/evaluations/{i}")["evaluation"] for i in self.ids.values()]
            refetched = all(e["refetched"] or e["status"] == "failed" for e in details)
            pending = self.api("/forwards?state=pending")["items"]
            if refetched and not pending and len(self.api("/forwards?state=dead")["items"]) == dead:
                return
            time.sleep(0.1)
        raise TimeoutError(f"not settled:\n{self.receiver.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("browser")
    runflow, consumer = FakeRunflow(API_KEY), Recorder()
    with serve_in_thread(runflow.app) as runflow_url, serve_in_thread(consumer.app) as url:
        config = workdir / "receiver.toml"
        sink = f'name = "consumer"\ntype = "http"\nurl = "{url}/events"\nmax_attempts = 1\n'
        config.write_text(f"[[sinks]]\n{sink}")
        receiver = ReceiverProcess(
            workdir,
            RUNFLOW_API_KEY=API_KEY,
            RUNFLOW_API_BASE=runflow_url,
            RECEIVER_CONFIG=str(config),
            RECEIVER_REFETCH_EMBEDS="judges,action,gate_failures",  # judges from the emulator
            RECEIVER_RETRY_BASE="0.05",
            RECEIVER_RETRY_MAX="0.3",
        )
        with receiver:
            world = World(runflow, consumer, receiver)
            consumer.fail_next(500)  # the first forward goes dead (one attempt allowed)
            world.post("hostile", NOT_PASSED, "order-1001")
            world.post("passed", PASSED, "order-1002")
            world.post("failed", FAILED, "order-1003", task_type="product")
            world.post(
                "second",
                PASSED,
                "order-1001",
                parent_evaluation_id=world.ids["hostile"],
                attempt_number=2,
            )
            world.post("rated", NOT_PASSED, "order-1004", task_type="product")
            world.post("product", PASSED, "order-1005", task_type="product")
            world.settled(dead=1)
            yield world


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def tab(browser: BrowserContext, world: World) -> Iterator[Watched]:
    """A fresh page, logged out; fails the test on any console error, page error or dialog."""
    browser.clear_cookies()
    page = browser.new_page()
    watched = watch(page)
    yield watched
    page.close()
    assert watched.problems == []


def ids_shown(page: Page, table: str) -> list[str]:
    ids: list[str] = page.locator(f"#{table} tbody tr[data-id]").evaluate_all(
        "rows => rows.map(row => row.dataset.id)"
    )
    return ids


def test_log_in_with_the_token_after_a_wrong_one(tab: Watched, world: World) -> None:
    page = tab.page
    page.goto(f"{world.url}/evaluations")
    page.wait_for_selector("#login")
    shot(page, "login")
    page.fill("#login input[name=token]", "not-the-token")
    page.click("#login button[type=submit]")
    assert see(page, ".flash.error", "token") == "That token is not right."
    assert page.locator("header nav").count() == 0
    shot(page, "login-refused")
    page.fill("#login input[name=token]", TOKEN)
    page.click("#login button[type=submit]")
    page.wait_for_url(f"{world.url}/evaluations")
    assert page.locator("header nav a.active").inner_text() == "Evaluations"


def test_overview_shows_counts_charts_and_sinks(tab: Watched, world: World) -> None:
    page = tab.page
    log_in(page, world.url)
    assert page.locator("#counts").get_attribute("data-total") == str(len(world.ids))
    assert page.locator("figure svg.chart").count() == 4
    for bar in ("bar-passed", "bar-not_passed", "bar-failed", "bar-rank"):
        assert page.locator(f"svg.chart rect.{bar}").count() >= 1, bar
    assert page.locator("#sinks tr[data-sink=consumer]").is_visible()
    assert set(ids_shown(page, "recent")) == set(world.ids.values())
    shot(page, "overview")


def test_filter_by_status_then_client_ref(tab: Watched, world: World) -> None:
    page = tab.page
    log_in(page, world.url, "/evaluations")
    assert ids_shown(page, "evaluations") == list(reversed(world.ids.values()))
    short = page.locator("#evaluations a.detail").all_inner_texts()
    assert len(set(short)) == len(short)  # UUIDv7 ids share their leading (time) digits
    shot(page, "evaluations")
    page.select_option("#filters select[name=status]", "failed")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**/evaluations?*status=failed*")
    assert ids_shown(page, "evaluations") == [world.ids["failed"]]
    assert page.locator("#filters select[name=status]").input_value() == "failed"
    shot(page, "evaluations-failed")
    page.click("#filters a:text('clear')")
    page.wait_for_url(f"{world.url}/evaluations")
    page.fill("#filters input[name=client_ref]", "order-1001")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**/evaluations?*client_ref=order-1001*")
    assert ids_shown(page, "evaluations") == [world.ids["second"], world.ids["hostile"]]
    shot(page, "evaluations-client-ref")


def test_detail_renders_judges_image_forwards_and_hostile_text_as_text(
    tab: Watched, world: World
) -> None:
    page = tab.page
    evaluation_id = world.ids["hostile"]
    log_in(page, world.url, "/evaluations")
    page.click(f"#evaluations tr[data-id='{evaluation_id}'] a.detail")
    page.wait_for_url(f"**/evaluations/{evaluation_id}")
    judges = world.runflow.evaluations[evaluation_id]["judges"]
    assert page.locator("#judges .judge").count() == len(judges)
    hostile = page.locator("#judges li.issue", has_text="<script>alert(1)</script>")
    assert hostile.inner_text().endswith(XSS)  # shown as the text it is
    assert page.locator("script").count() == 1  # only /static/app.js
    assert page.locator("img[src=x], [onerror]").count() == 0
    image = page.locator("img.evaluation-image")
    image.wait_for()
    page.wait_for_function("document.querySelector('img.evaluation-image').complete")
    assert image.evaluate("img => img.naturalWidth") == 320  # the local stand-in, loaded
    assert page.locator("#forwards tbody tr[data-id]").count() >= 1
    assert page.locator("#lineage li").count() == 2
    shot(page, "detail")
    page.click("dd a[href^='/client-refs/']")
    page.wait_for_url("**/client-refs/order-1001")
    assert ids_shown(page, "history") == [world.ids["second"], world.ids["hostile"]]
    assert page.locator("#current a").first.inner_text() == world.ids["second"]
    shot(page, "client-ref")


def test_feedback_up_down_clear_and_a_refusal(tab: Watched, world: World) -> None:
    page = tab.page
    evaluation_id = world.ids["rated"]
    log_in(page, world.url, f"/evaluations/{evaluation_id}")
    shown = page.locator("#feedback-section .current-feedback")
    steps = [
        ("up", "", "Thanks: 👍", "👍 thumbs up", True),
        ("down", "hands look wrong", "Thanks: 👎", "👎 thumbs down: “hands look wrong”", False),
        ("clear", "", "Rating cleared", "not rated", None),
    ]
    for rating, reason, notice, text, remote in steps:
        page.fill("#feedback input[name=reason]", reason)
        page.click(f"#feedback button[value={rating}]")
        see(page, ".flash.notice", notice)
        assert shown.inner_text() == text
        assert world.runflow.evaluations[evaluation_id]["feedback_is_positive"] is remote
        assert world.runflow.evaluations[evaluation_id]["feedback_reason"] == (reason or None)
    world.runflow.fail_next(403, code="FORBIDDEN", message="This key may not rate evaluations")
    page.click("#feedback button[value=up]")
    refusal = see(page, ".flash.error", "Feedback not saved")
    assert "403 (FORBIDDEN: This key may not rate evaluations)" in refusal
    assert shown.inner_text() == "not rated"
    assert world.runflow.evaluations[evaluation_id]["feedback_is_positive"] is None
    shot(page, "feedback-refused")


def test_retry_a_dead_letter_until_the_consumer_has_it(tab: Watched, world: World) -> None:
    page = tab.page
    log_in(page, world.url, "/forwards?state=dead")
    rows = page.locator("#forwards tbody tr[data-id]")
    assert rows.count() == 1
    forward_id = rows.first.get_attribute("data-id")
    dead = world.api("/forwards?state=dead")["items"][0]
    assert str(dead["id"]) == forward_id
    shot(page, "dead-letters")
    before = len(world.consumer.received)
    rows.first.locator("form.retry button").click()
    notice = see(page, ".flash.notice", f"Forward {forward_id}")
    assert notice == f"Forward {forward_id} will be sent again."
    assert page.locator("#forwards tbody tr[data-id]").count() == 0
    arrived = world.consumer.wait_for(before + 1, timeout=10)[before:]
    assert dead["evaluation_id"] in [item.json()["subject"] for item in arrived]


def test_new_evaluations_appear_live_without_a_reload(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    overview = tab.page
    log_in(overview, world.url)
    listing = browser.new_page()
    tab_list = watch(listing)
    listing.goto(f"{world.url}/evaluations")
    for page in (overview, listing):
        page.evaluate("window.sameDocument = true")
    evaluation_id = world.post("live", PASSED, "order-2001")
    for page, table in ((overview, "recent"), (listing, "evaluations")):
        row = page.locator(f"#{table} tr[data-id='{evaluation_id}']")
        row.wait_for(timeout=TIMEOUT_MS)
        assert "order-2001" in row.inner_text()
        assert page.evaluate("window.sameDocument") is True  # no reload happened
        assert "1 new just now" in page.locator("#live-status").inner_text()
    listing.close()
    assert tab_list.problems == []


def test_a_burst_larger_than_a_poll_leaves_no_row_out(tab: Watched, world: World) -> None:
    """More callbacks between two polls than a poll brings: the page asks again from the last
    it got (before, the ones in between never appeared); the overview keeps its 10."""
    page = tab.page
    log_in(page, world.url)
    page.evaluate("window.sameDocument = true")
    burst = [world.post(f"burst-{n}", PASSED, f"order-30{n:02d}") for n in range(15)]
    newest = [item["id"] for item in world.api("/evaluations?limit=10")["items"]]
    page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`#recent tr[data-id='${id}']`))",
        arg=newest,
        timeout=TIMEOUT_MS,
    )
    assert ids_shown(page, "recent") == newest
    assert set(newest) <= set(burst)
    assert page.evaluate("window.sameDocument") is True


def test_live_updates_stop_and_say_so_when_the_session_ends(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    page = tab.page
    log_in(page, world.url)
    browser.clear_cookies()  # logged out elsewhere, or the session expired
    page.locator("#live-status", has_text="Logged out").wait_for(timeout=TIMEOUT_MS)


def live_pages(world: World, browser: BrowserContext, tab: Watched, *paths: str) -> list[Watched]:
    """`tab` logged in on the first of `paths`, then a page more (watched too) per other
    path; each remembers that it was never reloaded (window.sameDocument)."""
    log_in(tab.page, world.url, paths[0])
    shown = [tab]
    for path in paths[1:]:
        shown.append(watch(browser.new_page()))
        shown[-1].page.goto(f"{world.url}{path}")
    for watched in shown:
        watched.page.evaluate("window.sameDocument = true")
    return shown


def row_of(page: Page, table: str, evaluation_id: str) -> Locator:
    return page.locator(f"#{table} tr[data-id='{evaluation_id}']")


def test_a_pending_row_turns_into_its_verdict_without_a_reload(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    """Submitted (pending), shown, then its verdict arrives: the row shown changes in place,
    on the overview and on the list, once each."""
    shown = live_pages(world, browser, tab, "/", "/evaluations")
    tables = [(shown[0].page, "recent"), (shown[1].page, "evaluations")]
    evaluation_id = world.submit("slow", "order-4001")
    for page, table in tables:
        row_of(page, table, evaluation_id).locator(".badge.pending").wait_for()
    world.finish("slow", PASSED)
    for page, table in tables:
        row = row_of(page, table, evaluation_id)
        row.locator(".badge.passed").wait_for()
        assert row.count() == 1
        assert row.locator("td.num").inner_text() == "1.00"
        assert page.evaluate("window.sameDocument") is True
        assert page.locator("#live-status").inner_text() == "1 updated just now"
        shown_row = row.element_handle()
        for _ in range(2):  # polls that read it again (they overlap), and its refetch
            with page.expect_response(lambda answer: "/partials/rows" in answer.url):
                pass
        assert shown_row.evaluate("row => row.isConnected")  # the same: not replaced again
    shown[1].page.close()
    assert shown[1].problems == []


@pytest.mark.parametrize(
    ("query", "verdict"),
    [("status=failed", FAILED), ("passed=false", NOT_PASSED)],
    ids=["failed", "not-passed"],
)
def test_an_evaluation_that_enters_the_filter_later_appears_in_its_place(
    tab: Watched, world: World, browser: BrowserContext, query: str, verdict: Verdict
) -> None:
    """On a filtered page, an evaluation received before the newest shown (pending then) that
    now passes the filter appears below it, in the table's order."""
    page = live_pages(world, browser, tab, f"/evaluations?{query}")[0].page
    before = ids_shown(page, "evaluations")
    late = world.submit(f"late-{query}", "order-5001")
    newer = world.post(f"newer-{query}", verdict, "order-5002")
    row_of(page, "evaluations", newer).wait_for()
    assert row_of(page, "evaluations", late).count() == 0  # pending: not one of these
    world.finish(f"late-{query}", verdict)
    row_of(page, "evaluations", late).wait_for()
    assert ids_shown(page, "evaluations") == [newer, late, *before]
    assert page.evaluate("window.sameDocument") is True


def test_a_row_that_leaves_the_filter_goes(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    page = live_pages(world, browser, tab, "/evaluations?status=pending")[0].page
    before = ids_shown(page, "evaluations")
    evaluation_id = world.submit("leaving", "order-6001")
    row_of(page, "evaluations", evaluation_id).wait_for()
    world.finish("leaving", NOT_PASSED)
    row_of(page, "evaluations", evaluation_id).wait_for(state="detached")
    assert ids_shown(page, "evaluations") == before
    assert page.locator("#live-status").inner_text() == "1 no longer matching just now"
    assert page.evaluate("window.sameDocument") is True


def test_a_burst_larger_than_a_page_reaches_the_list_whole(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    """More callbacks between two polls than a page of the list (50): it follows the pages
    until it has them all, each once, newest first above what it showed."""
    page = live_pages(world, browser, tab, "/evaluations")[0].page
    before = ids_shown(page, "evaluations")
    burst = [world.post(f"flood-{n}", PASSED, f"order-70{n:02d}") for n in range(60)]
    page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`#evaluations tr[data-id='${id}']`))",
        arg=burst,
        timeout=TIMEOUT_MS,
    )
    assert ids_shown(page, "evaluations") == [*reversed(burst), *before]
    assert page.evaluate("window.sameDocument") is True


def test_a_table_that_empties_takes_in_no_older_row(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    """A full page (one more matches, on the next) whose rows all leave the filter: it still
    covers only what it covered, so an older evaluation written again stays on its own page
    (before, the emptied table asked about rows of any age and put that one at the top)."""
    old = world.submit("old-8000", "order-8000")  # pending, received first: the next page
    shown = [world.submit(f"pending-{n}", "order-8000") for n in range(50)]
    page = live_pages(world, browser, tab, "/evaluations?client_ref=order-8000&status=pending")[
        0
    ].page
    assert ids_shown(page, "evaluations") == list(reversed(shown))
    for n in range(50):
        world.finish(f"pending-{n}", PASSED)
    page.wait_for_function(
        "() => !document.querySelector('#evaluations tbody tr[data-id]')", timeout=TIMEOUT_MS
    )
    answer = httpx.patch(  # rated: written again, still pending
        f"{world.url}/api/evaluations/{old}/feedback",
        json={"is_positive": True},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 200, answer.text
    newest = world.submit("new-8000", "order-8000")
    row_of(page, "evaluations", newest).wait_for()
    assert ids_shown(page, "evaluations") == [newest]
    assert row_of(page, "evaluations", old).count() == 0
    assert page.evaluate("window.sameDocument") is True


def test_the_placeholder_comes_back_when_every_row_has_gone(
    tab: Watched, world: World, browser: BrowserContext
) -> None:
    page = live_pages(world, browser, tab, "/evaluations?client_ref=order-8100&status=pending")[
        0
    ].page
    placeholder = page.locator("p.empty", has_text="No evaluations match these filters.")
    assert placeholder.is_visible()
    world.submit("placeholder", "order-8100")
    row_of(page, "evaluations", world.ids["placeholder"]).wait_for()
    assert not placeholder.is_visible()
    world.finish("placeholder", PASSED)
    row_of(page, "evaluations", world.ids["placeholder"]).wait_for(state="detached")
    placeholder.wait_for(state="visible")
    assert page.evaluate("window.sameDocument") is True
