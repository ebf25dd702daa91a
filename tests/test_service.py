"""What the service forwards, recorded for the CLI (store/service.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from receiver.normalize import normalize, parse_body
from receiver.sinkspec import SinkSpec
from receiver.store import Delivery, Forwarding, Store, service

from .database import connect, database_for
from .helpers import fixture
from .servers import run_cli

HOOK = SinkSpec(name="hook", type="http", url="https://a.example/events", options={"secret": "s"})


@pytest.mark.parametrize(
    ("mine", "why"),
    [
        (Forwarding(sinks=(HOOK,)), None),
        # the URL and secrets decide no forward, and are never recorded
        (Forwarding(sinks=(SinkSpec(name="hook", type="http", url="https://b.example/"),)), None),
        (Forwarding(), "service: sinks hook (http), refetch off, polls after 600s; here: sinks"),
        (Forwarding(sinks=(HOOK,), refetch=True), "here: sinks hook (http), refetch on"),
        (
            Forwarding(sinks=(SinkSpec(name="hook", type="http", url="x", only_failures=True),)),
            "polls after 600s, other filters)",
        ),
        (
            Forwarding(
                sinks=(SinkSpec(name="hook", type="http", url="x", task_types=frozenset({"a"})),)
            ),
            "other filters",
        ),
    ],
)
def test_differs(mine: Forwarding, why: str | None) -> None:
    found = service.differs(service.describe(Forwarding(sinks=(HOOK,))), mine)
    assert (found is None) == (why is None)
    assert why is None or why in str(found)


def test_nothing_secret_is_recorded() -> None:
    described = service.describe(Forwarding(sinks=(HOOK,)))
    assert "a.example" not in described
    assert '"s"' not in described


def test_a_server_records_at_its_start_and_a_cli_store_does_not(tmp_path: Path) -> None:
    database = database_for(tmp_path / "r.db")
    cli = Store(database, forwarding=Forwarding(), applies=False)
    server = Store(database, forwarding=Forwarding(sinks=(HOOK,)))
    for store in (server, cli):
        store.open()
        store.close()
    assert server.service_forwarding() == service.describe(Forwarding(sinks=(HOOK,)))


@pytest.mark.parametrize("args", [["replay", "1"], ["forwards", "--retry-all-dead"], ["reconcile"]])
def test_a_command_without_the_services_sinks_is_refused(tmp_path: Path, args: list[str]) -> None:
    """Run outside the service's folder (no receiver.toml), `reconcile` stored verdicts with no
    forwards: never sent, and nothing would ever send them."""
    database = str(tmp_path / "r.db")
    server = Store(database, forwarding=Forwarding(sinks=(HOOK,)))
    server.open()
    server.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "RECEIVER_DATABASE": database, "RUNFLOW_API_KEY": "k"}
    done = run_cli(*args, cwd=elsewhere, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: the service forwards with other settings")
    assert "service: sinks hook (http)" in done.stderr
    assert "here: sinks none" in done.stderr


def test_a_start_without_a_sink_makes_its_pending_forwards_dead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Renamed or removed in receiver.toml, its pending forwards stayed pending for ever (no
    loop sends them; retry refused them as pending; they kept their evaluations from prune)."""
    database = database_for(tmp_path / "r.db")
    old = SinkSpec(name="old", type="http", url="https://old.example/")
    before = Store(database, forwarding=Forwarding(sinks=(HOOK, old)))
    before.open()
    try:
        body = fixture("evaluation-completed.json")
        asyncio.run(before.ingest(Delivery(body, normalize(parse_body(body)))))
    finally:
        before.close()
    after = Store(database, forwarding=Forwarding(sinks=(HOOK,)))
    with caplog.at_level(logging.WARNING, logger="receiver.store"):
        after.open()
    try:
        states = {
            f["sink"]: (f["state"], f["last_error"])
            for f in after.list_forwards(state=None, sink=None, limit=10)
        }
    finally:
        after.close()
    assert states == {
        "hook": ("pending", None),
        "old": ("dead", "the sink is not in receiver.toml"),
    }
    assert "1 forward(s) to sink 'old' made dead" in caplog.text
    again = Store(database, forwarding=Forwarding(sinks=(HOOK, old)))  # configured again
    again.open()
    try:
        assert asyncio.run(again.retry_dead("2026-11-25T00:00:00.000000Z", sink="old")) == 1
    finally:
        again.close()


def test_a_start_with_refetch_off_drops_the_pending_refetches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the API key removed, none would ever be done: shown as pending for ever, and their
    evaluations never pruned."""
    database = database_for(tmp_path / "r.db")
    before = Store(database, forwarding=Forwarding(sinks=(HOOK,), refetch=True))
    before.open()
    try:
        body = fixture("evaluation-completed.json")
        asyncio.run(before.ingest(Delivery(body, normalize(parse_body(body)))))
        assert refetch_states(database) == ["pending"]
    finally:
        before.close()
    after = Store(database, forwarding=Forwarding(sinks=(HOOK,)))
    with caplog.at_level(logging.WARNING, logger="receiver.store"):
        after.open()
    after.close()
    assert refetch_states(database) == [None]
    assert "1 pending refetch(es) dropped: refetch is off" in caplog.text


def refetch_states(database: str) -> list[str | None]:
    conn = connect(database)
    try:
        return [row[0] for row in conn.execute("SELECT refetch_state FROM evaluations")]
    finally:
        conn.close()
