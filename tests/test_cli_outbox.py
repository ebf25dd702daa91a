"""`receiver forwards`, `replay` and `worker` against a real database and a real consumer."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from receiver.fakes.recorder import Recorder
from receiver.fakes.server import serve_in_thread
from receiver.normalize import normalize, parse_body
from receiver.sinkspec import SinkSpec
from receiver.store import Delivery, Forwarding, Outcome, Store
from receiver.store.ingest import accept

from .helpers import SECRET_A, fixture
from .servers import free_port, run_cli


def _dead_letter(tmp_path: Path, url: str) -> dict[str, str]:
    """A database with one dead forward to an http sink at `url`; returns the CLI's env."""
    (tmp_path / "receiver.toml").write_text(
        f'[[sinks]]\nname = "consumer"\ntype = "http"\nurl = "{url}/events"\n'
    )
    sink = SinkSpec(name="consumer", type="http", url=f"{url}/events")
    store = Store(str(tmp_path / "r.db"), forwarding=Forwarding(sinks=(sink,)))
    store.open()
    try:
        body = fixture("evaluation-completed.json")
        asyncio.run(store.ingest(Delivery(body, normalize(parse_body(body)))))
        dead = Outcome(1, "dead", "2026-01-01T00:00:00.000000Z", "HTTP 500")
        asyncio.run(store.finish_forwards([dead], "2026-01-01T00:00:00.000000Z"))
    finally:
        store.close()
    return {
        "PATH": "/usr/bin:/bin",
        "RECEIVER_DATABASE": str(tmp_path / "r.db"),
        "RECEIVER_CONFIG": str(tmp_path / "receiver.toml"),
        "RUNFLOW_WEBHOOK_SECRET": SECRET_A,
    }


def test_forwards_retry_replay_and_the_worker_process(tmp_path: Path) -> None:
    consumer = Recorder()
    with serve_in_thread(consumer.app) as url:
        env = _dead_letter(tmp_path, url)

        def cli(*args: str) -> str:
            done = run_cli(*args, cwd=tmp_path, env=env)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert "#1 consumer dead attempts=1" in cli("forwards", "--dead")
        assert "error: HTTP 500" in cli("forwards")
        # show says why too (it gave only the state and the attempts)
        shown = cli("show", "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11")
        assert "forward      #1 consumer dead attempts=1 error: HTTP 500" in shown
        assert "forward 1 is pending again" in cli("forwards", "--retry", "1")
        assert "(no forwards match)" in cli("forwards", "--dead")
        assert "0 dead forward(s) pending again" in cli("forwards", "--retry-all-dead")
        worker = subprocess.Popen(
            [sys.executable, "-m", "receiver", "worker"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            consumer.wait_for(1, timeout=20)
            assert "1 forward(s) queued" in cli("replay", "1")
            consumer.wait_for(2, timeout=20)
        finally:
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=20)
    assert worker.returncode == 0, err
    assert "worker running (sinks: consumer)" in out
    ids = {item.headers["webhook-id"] for item in consumer.received}
    assert len(consumer.received) == 2
    assert len(ids) == 1  # a replay is the same event: consumers dedupe on its id
    assert "done" in cli_state(tmp_path, env)


def cli_state(tmp_path: Path, env: dict[str, str]) -> str:
    return run_cli("forwards", "--json", cwd=tmp_path, env=env).stdout


def test_a_cli_command_leaves_the_servers_queue_to_the_server(tmp_path: Path) -> None:
    """`receiver prune` (which reads no sinks) applied the callbacks the server had just
    acknowledged, with no sinks: their verdicts were stored and never forwarded."""
    env = _dead_letter(tmp_path, "http://127.0.0.1:9")
    body = fixture("evaluation-failed.json")
    conn = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    accept(conn, Delivery(body, normalize(parse_body(body))))  # acknowledged, not yet applied
    conn.execute("COMMIT")
    conn.close()
    done = run_cli("prune", "--older-than", "90d", "--yes", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    sink = SinkSpec(name="consumer", type="http", url="http://127.0.0.1:9/events")
    store = Store(str(tmp_path / "r.db"), forwarding=Forwarding(sinks=(sink,)))
    store.open()  # the server, with its sinks
    try:
        store.catch_up()
        found = store.list_forwards(state="pending", sink=None, limit=10)
    finally:
        store.close()
    assert [forward["event_type"] for forward in found] == ["evaluation.failed"]


def test_a_removed_sinks_dead_forwards_stay_dead(tmp_path: Path) -> None:
    """No worker sends to a sink the configuration no longer has: its forwards made pending
    again would stay pending for ever (and keep their evaluation from being pruned)."""
    env = _dead_letter(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "receiver.toml").write_text(
        '[[sinks]]\nname = "other"\ntype = "http"\nurl = "http://127.0.0.1:9/events"\n'
    )
    changed = run_cli("forwards", "--retry", "1", cwd=tmp_path, env=env)
    assert changed.returncode == 1
    assert (  # until the service runs with the new configuration
        "service: sinks consumer (http), refetch off, polls after 600s;"
        " here: sinks other (http), refetch off, polls after 600s)" in changed.stderr
    )
    other = SinkSpec(name="other", type="http", url="http://127.0.0.1:9/events")
    restarted = Store(str(tmp_path / "r.db"), forwarding=Forwarding(sinks=(other,)))
    restarted.open()  # the service, restarted with it
    restarted.close()
    refused = run_cli("forwards", "--retry", "1", cwd=tmp_path, env=env)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "Error: sink 'consumer' is not configured: nothing would send its forwards",
    )
    refused = run_cli("forwards", "--retry-all-dead", "--sink", "consumer", cwd=tmp_path, env=env)
    assert refused.returncode == 1
    done = run_cli("forwards", "--retry-all-dead", cwd=tmp_path, env=env)
    assert "0 dead forward(s) pending again" in done.stdout
    assert "left dead: 1 of 'consumer', a sink not in this configuration" in done.stderr
    assert "#1 consumer dead attempts=1" in run_cli("forwards", cwd=tmp_path, env=env).stdout


def test_replay_of_an_unknown_delivery_is_one_line(tmp_path: Path) -> None:
    env = _dead_letter(tmp_path, "http://127.0.0.1:9")
    done = run_cli("replay", "42", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: no delivery 42"


def demo(port: int, workdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`make demo`, once through, in a shell with `env`."""
    command = [sys.executable, "-m", "receiver.fakes.demo", "--once", "--port", str(port)]
    return subprocess.run(
        [*command, "--workdir", str(workdir)],
        env={**os.environ, **env},
        cwd=workdir.parent,  # as `make demo` runs in the checkout, beside its .env
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_make_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    """Whatever the user's shell or .env sets for their own receiver: with RECEIVER_WORKER=false
    (for a separate worker) the demo forwarded nothing and failed after a minute."""
    (tmp_path / ".env").write_text("RECEIVER_REFETCH_EMBEDS=off\n")
    done = demo(free_port(), tmp_path / "demo", RECEIVER_WORKER="false")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("submitted ") == 6
    forwarded = done.stdout.split("forwarded to the consumer:")[1].split("\n\n")[0]
    assert len(forwarded.strip().splitlines()) == 6
    assert "refetched=True" in forwarded


def test_make_demo_says_when_its_port_is_taken(tmp_path: Path) -> None:
    """With `make run` on 8000, the demo's receiver could not listen and its callbacks went to
    the other one, refused for their secret; it now stops at once and says what to do."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = demo(port, tmp_path / "demo")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"port {port} is taken (is `make run` going?): make demo DEMO_PORT=8100"
    )
