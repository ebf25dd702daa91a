"""Issue-level flows through the Runflow emulator: submit → callback → store → forward, lost
callbacks recovered by reconciliation, feedback round trips, idempotent submits, local
validation. The receiver and its CLI run as real processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.events import event_id
from receiver.fakes.recorder import Recorder
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread

from .database import connect
from .helpers import SECRET_A, SECRET_B
from .servers import ReceiverProcess, free_port, run_cli

API_KEY = "rf_e2e_key"


class World:
    def __init__(
        self,
        tmp_path: Path,
        runflow: FakeRunflow,
        runflow_url: str,
        consumer: Recorder,
        consumer_url: str,
    ) -> None:
        self.tmp_path = tmp_path
        self.runflow = runflow
        self.consumer = consumer
        self.port = free_port()
        config = tmp_path / "receiver.toml"
        config.write_text(
            f'[[sinks]]\nname = "consumer"\ntype = "http"\nurl = "{consumer_url}/events"\n'
        )
        self.env = {
            "RUNFLOW_API_KEY": API_KEY,
            "RUNFLOW_API_BASE": runflow_url,
            "RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            "RECEIVER_CONFIG": str(config),
            "RECEIVER_RECONCILE_AFTER": "1",
            "RECEIVER_RETRY_BASE": "0.05",
            "RECEIVER_RETRY_MAX": "0.5",
        }
        self.server = ReceiverProcess(tmp_path, **self.env)
        self.server.port = self.port
        self.server.url = f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        done = run_cli(*args, cwd=self.tmp_path, env=self.server.env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def submit(self, number: int, *extra: str) -> str:
        out = self.cli(
            "submit",
            f"https://cdn.example.com/renders/image-{number}.png",
            "--task-type",
            "headshot",
            "--client-ref",
            f"job-{number}",
            *extra,
        )
        return out.split()[1]

    def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        conn = connect(self.tmp_path / "receiver.db")
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    runflow = FakeRunflow(
        API_KEY,
        callback_secrets=(SECRET_A, SECRET_B),
        callback_delay=0.2,
        callback_attempts=3,
        callback_backoff=0.05,
    )
    consumer = Recorder()
    with serve_in_thread(runflow.app) as runflow_url, serve_in_thread(consumer.app) as url:
        yield World(tmp_path, runflow, runflow_url, consumer, url)


def test_submit_n_every_callback_is_stored_and_forwarded_once(world: World) -> None:
    with world.server:
        ids = [world.submit(n) for n in range(5)]
        world.runflow.wait_idle(timeout=30)
        world.consumer.wait_for(5, timeout=30)
    assert set(world.runflow.callback_outcomes.values()) == {"delivered"}
    forwarded = [json.loads(item.body)["id"] for item in world.consumer.received]
    assert sorted(forwarded) == sorted(
        event_id(i, f"evaluation.{world.runflow.evaluations[i]['status_code']}") for i in ids
    )
    assert world.rows("SELECT count(*) FROM deliveries WHERE source = 'webhook'") == [(5,)]
    assert world.rows("SELECT count(DISTINCT secret_index) FROM deliveries") == [(2,)]


def test_receiver_down_while_runflow_gives_up_then_reconcile_recovers_once(world: World) -> None:
    ids = [world.submit(n) for n in range(3)]  # nothing listens at the callback URL
    world.runflow.wait_idle(timeout=30)
    assert set(world.runflow.callback_outcomes.values()) == {"abandoned"}
    assert world.rows("SELECT count(*) FROM evaluations WHERE status = 'pending'") == [(3,)]
    time.sleep(1.2)  # past RECEIVER_RECONCILE_AFTER
    assert "polled 3: 3 verdict(s) stored" in world.cli("reconcile")
    assert "polled 0" in world.cli("reconcile")
    with world.server:
        world.consumer.wait_for(3, timeout=30)
        time.sleep(0.5)
    forwarded = [json.loads(item.body)["id"] for item in world.consumer.received]
    assert len(forwarded) == len(set(forwarded)) == 3
    assert {json.loads(item.body)["subject"] for item in world.consumer.received} == set(ids)
    assert world.rows("SELECT DISTINCT source FROM deliveries") == [("poll",)]


def test_feedback_set_change_clear_round_trip(world: World) -> None:
    evaluation_id = world.submit(1)
    world.runflow.wait_idle(timeout=30)
    steps = [
        (["--up"], True, None),
        (["--down", "--reason", "hands look wrong"], False, "hands look wrong"),
        (["--clear", "--reason", "ignored when clearing"], None, None),
    ]
    for args, positive, reason in steps:
        assert "feedback on" in world.cli("feedback", evaluation_id, *args)
        remote = world.runflow.evaluations[evaluation_id]
        assert (remote["feedback_is_positive"], remote["feedback_reason"]) == (positive, reason)
        local = world.rows(
            "SELECT feedback_is_positive, feedback_reason FROM evaluations WHERE id = ?",
            evaluation_id,
        )
        assert local == [(None if positive is None else int(positive), reason)]


def test_a_repeated_submit_with_the_same_key_creates_one_evaluation(world: World) -> None:
    first = world.submit(7)
    again = world.submit(7)
    keyed = world.submit(8, "--idempotency-key", "my-key-1")
    keyed_again = world.submit(8, "--idempotency-key", "my-key-1")
    assert first == again
    assert keyed == keyed_again
    assert len(world.runflow.evaluations) == 2
    assert world.rows("SELECT count(*) FROM evaluations") == [(2,)]


LIMITS = {
    "task-type-too-long": (["--task-type", "t" * 101], "task_type"),
    "client-ref-too-long": (["--task-type", "x", "--client-ref", "c" * 256], "client_ref"),
    "five-references": (
        ["--task-type", "x", *(["--reference", "https://e.com/r.png"] * 5)],
        "reference_images",
    ),
    "no-task-type": (["--task-type", ""], "task_type"),
}


@pytest.mark.parametrize(("args", "field"), LIMITS.values(), ids=LIMITS.keys())
def test_each_validation_limit_is_rejected_locally(
    world: World, args: list[str], field: str
) -> None:
    done = run_cli(
        "submit", "https://cdn.example.com/x.png", *args, cwd=world.tmp_path, env=world.server.env
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert field in lines[0]
    assert not [r for r in world.runflow.requests if r["method"] == "POST"]


def test_a_callback_url_that_is_not_https_is_refused_for_a_public_host(world: World) -> None:
    env = {**world.server.env, "RECEIVER_PUBLIC_URL": "http://receiver.example.com"}
    done = run_cli(
        "submit", "https://cdn.example.com/x.png", "--task-type", "x", cwd=world.tmp_path, env=env
    )
    assert done.returncode == 1
    assert "callback_url" in done.stderr
