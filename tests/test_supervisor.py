"""`receiver serve --workers N`: its supervisor and its worker processes, for real."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from receiver.supervisor import LONGEST_WAIT, QUICK_DEATH, how_it_ended, restart_delay

from .database import sqlite_only
from .servers import ReceiverProcess

WAIT = 20.0  # seconds for what the tests wait on (a worker process starts in ~1 s)


def workers_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` and that run a worker (not the resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


@pytest.mark.parametrize(
    ("exitcode", "said"),
    [
        (0, "exit status 0"),
        (3, "exit status 3"),
        (-9, "killed by SIGKILL"),
        (-15, "killed by SIGTERM"),
    ],
)
def test_how_a_worker_ended(exitcode: int, said: str) -> None:
    assert how_it_ended(exitcode) == said


@pytest.mark.parametrize(
    ("lived", "last", "wait"),
    [
        (QUICK_DEATH, 0.0, 0.0),  # after a life: at once
        (3600.0, 8.0, 0.0),  # and the waits start over
        (0.5, 0.0, 1.0),  # died young: wait, longer each time
        (0.5, 1.0, 2.0),
        (0.5, 16.0, LONGEST_WAIT),
        (0.5, LONGEST_WAIT, LONGEST_WAIT),
    ],
)
def test_a_worker_that_keeps_dying_is_replaced_after_a_growing_wait(
    lived: float, last: float, wait: float
) -> None:
    assert restart_delay(lived, last) == wait


def test_a_worker_killed_again_soon_is_replaced_after_a_wait(tmp_path: Path) -> None:
    with ReceiverProcess(tmp_path, "--workers", "2", RECEIVER_WORKER="false") as server:
        assert server.process is not None
        until(lambda: len(workers_of(server.process.pid)) == 2, "two workers")
        os.kill(workers_of(server.process.pid)[0], signal.SIGKILL)  # young: the first wait
        until(lambda: b"starting another in 1s" in server.log.read_bytes(), "a wait")
        until(lambda: len(workers_of(server.process.pid)) == 2, "the replacement")
        assert server.stop() == 0


def test_the_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """They went on serving, holding the port: the service could not start again."""
    with ReceiverProcess(tmp_path, "--workers", "2", RECEIVER_WORKER="false") as server:
        assert server.process is not None
        until(lambda: len(workers_of(server.process.pid)) == 2, "two workers")
        workers = workers_of(server.process.pid)
        server.stop(signal.SIGKILL)
        try:
            until(lambda: not any(alive(pid) for pid in workers), "the workers to stop")
        finally:  # no orphan outlives a failed test
            for pid in filter(alive, workers):
                os.kill(pid, signal.SIGKILL)


@sqlite_only
def test_a_worker_that_cannot_start_again_stops_the_supervisor_with_status_3(
    tmp_path: Path,
) -> None:
    """A worker that died is replaced; when the replacement cannot start (here the database
    became unreadable), the supervisor stops with status 3, for the service manager to start
    it again later: it exited 0 (no restart by `Restart=on-failure`), and stayed down."""
    with ReceiverProcess(tmp_path, "--workers", "2", RECEIVER_WORKER="false") as server:
        assert server.process is not None
        until(lambda: len(workers_of(server.process.pid)) == 2, "two workers")
        first, second = workers_of(server.process.pid)
        os.kill(first, signal.SIGKILL)  # replaced: the database still opens
        until(lambda: b"killed by SIGKILL: starting another" in server.log.read_bytes(), "log")
        until(lambda: len(workers_of(server.process.pid)) == 2, "a replacement")
        database = tmp_path / "receiver.db"
        database.rename(tmp_path / "receiver.db.bak")
        database.write_bytes(b"not a database" * 1000)
        os.kill(second, signal.SIGKILL)
        assert server.process.wait(timeout=WAIT) == 3
    log = server.log.read_text()
    assert "failed to start: stopping (exit 3)" in log


def test_a_worker_started_on_changed_settings_stops_the_supervisor_with_status_3(
    tmp_path: Path,
) -> None:
    """A replacement reads .env and receiver.toml again: after an edit meant for the next
    restart it forwarded to other sinks than the workers still running (an added sink got
    some verdicts, not all). It refuses, and the service manager starts them all again."""
    sinks = tmp_path / "receiver.toml"
    sinks.write_text('[[sinks]]\nname = "hook"\ntype = "http"\nurl = "http://127.0.0.1:9/a"\n')
    with ReceiverProcess(tmp_path, "--workers", "2", RECEIVER_WORKER="false") as server:
        assert server.process is not None
        until(lambda: len(workers_of(server.process.pid)) == 2, "two workers")
        with sinks.open("a") as more:
            more.write('[[sinks]]\nname = "archive"\ntype = "http"\nurl = "http://127.0.0.1:9/b"\n')
        os.kill(workers_of(server.process.pid)[0], signal.SIGKILL)
        assert server.process.wait(timeout=WAIT) == 3
    log = server.log.read_text()
    assert "changed since `receiver serve` started" in log
    assert "failed to start: stopping (exit 3)" in log
