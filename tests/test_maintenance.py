"""`receiver backup`: online while callbacks keep arriving, consistent, and restorable."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.normalize import normalize, parse_body
from receiver.signing import sign
from receiver.sinkspec import SinkSpec
from receiver.store import (
    Delivery,
    EvaluationFilter,
    Forwarding,
    Outcome,
    Store,
    maintenance,
    outbox,
    rollups,
)
from receiver.store.ingest import accept
from receiver.times import ago

from .database import POSTGRES, connect, database_for, sqlite_only
from .helpers import SECRET_A, TOKEN, fixture
from .servers import ReceiverProcess, run_cli


def callback(number: int) -> bytes:
    body = json.loads(fixture("evaluation-completed.json"))
    body["id"] = f"0193a7c2-0000-7000-8000-{number:012d}"
    return json.dumps(body).encode()


def one_evaluation(database: Path) -> Path:
    """`database`, made with one evaluation stored."""
    store = Store(str(database))
    store.open()
    try:
        asyncio.run(store.ingest(Delivery(callback(1), normalize(parse_body(callback(1))))))
    finally:
        store.close()
    return database


@sqlite_only
def test_backup_while_writing_then_restore(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    stop = threading.Event()
    sent: list[int] = []
    with ReceiverProcess(live) as server:

        def keep_posting() -> None:
            with httpx.Client(base_url=server.url) as client:
                number = 0
                while not stop.is_set() and number < 2000:
                    body = callback(number)
                    client.post(
                        "/webhooks/runflow",
                        content=body,
                        headers={"runflow-signature": sign(body, SECRET_A)},
                    )
                    sent.append(number)
                    number += 1

        writer = threading.Thread(target=keep_posting)
        writer.start()
        try:
            while len(sent) < 50:
                stop.wait(0.01)
            done = run_cli("backup", str(tmp_path / "copy.db"), cwd=live, env=server.env)
        finally:
            stop.set()
            writer.join()
    assert done.returncode == 0, done.stderr
    assert "backed up" in done.stdout
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    evaluations = copy.execute("SELECT count(*) FROM evaluations").fetchone()[0]
    deliveries = copy.execute("SELECT count(*) FROM deliveries").fetchone()[0]
    queued = copy.execute("SELECT count(*) FROM apply_queue").fetchone()[0]
    copy.close()
    # Each delivery is applied or still queued (applied by the restored server), never half.
    assert 50 <= evaluations + queued == deliveries <= len(sent)

    restored = tmp_path / "restored"
    restored.mkdir()
    (tmp_path / "copy.db").rename(restored / "receiver.db")
    with ReceiverProcess(restored) as server:
        page = httpx.get(
            f"{server.url}/api/evaluations",
            params={"limit": 500},
            headers={"authorization": f"Bearer {TOKEN}"},
        ).json()
        total = len(page["items"])
        assert total == min(deliveries, 500)  # the queued ones applied at start or by this read
        again = run_cli("backup", str(restored / "receiver.db"), cwd=restored, env=server.env)
    assert again.returncode == 1
    assert again.stderr.strip().endswith("exists; choose a new path (a backup never overwrites)")


@sqlite_only
@pytest.mark.parametrize("folder", ["x#y", "a?b", "100%"])
def test_backup_of_a_database_whose_path_has_uri_characters(tmp_path: Path, folder: str) -> None:
    """The source is opened by URI: `x#y/receiver.db` read a new empty file `x` (a traceback,
    and a `.partial` left behind)."""
    database = one_evaluation(tmp_path / folder / "receiver.db")
    env = {"RECEIVER_DATABASE": str(database), "RUNFLOW_WEBHOOK_SECRET": SECRET_A}
    done = run_cli("backup", str(tmp_path / "copy.db"), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("SELECT count(*) FROM evaluations").fetchone() == (1,)
    copy.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["copy.db", folder])


def test_prune_keeps_everything_with_work_left_and_the_stats_follow(tmp_path: Path) -> None:
    sink = SinkSpec(name="consumer", type="http", url="http://127.0.0.1:9/")
    store = Store(str(tmp_path / "r.db"), forwarding=Forwarding(sinks=(sink,), refetch=True))
    store.open()

    def post(number: int, **fields: object) -> None:
        body = json.loads(fixture("get-evaluation-embedded.json"))
        body.update(
            id=f"0193a7c2-0000-7000-8000-{number:012d}", client_ref=f"ref-{number}", **fields
        )
        raw = json.dumps(body).encode()
        asyncio.run(store.ingest(Delivery(raw, normalize(parse_body(raw)))))

    try:
        for number in range(6):
            post(number)
        post(6, status_code="running", completed_at=None)
        post(7)
        run = fixture("run-completed.json")
        asyncio.run(store.ingest(Delivery(run, normalize(parse_body(run)))))
        asyncio.run(store.quarantine(b"not json", "bad", {}, None))
        conn = sqlite3.connect(tmp_path / "r.db")
        old = "2020-01-01T00:00:00.000000Z"
        conn.execute("UPDATE evaluations SET updated_at = ?, received_at = ?", (old, old))
        conn.execute("UPDATE deliveries SET received_at = ?, last_received_at = ?", (old, old))
        conn.execute("UPDATE quarantine SET received_at = ?", (old,))
        conn.execute("UPDATE evaluations SET refetch_state = 'done' WHERE id NOT LIKE '%0001'")
        conn.execute("UPDATE evaluations SET next_poll_at = NULL WHERE id NOT LIKE '%0006'")
        conn.execute(
            "UPDATE evaluations SET updated_at = '2999-01-01T00:00:00.000000Z'"
            " WHERE id LIKE '%0005'"
        )
        rollups.rebuild(conn)  # rows were backdated by hand
        conn.commit()
        outcomes = [Outcome(n, "done", old) for n in (1, 2, 4, 5, 6, 7)]
        asyncio.run(store.finish_forwards(outcomes, old))
        conn.execute("UPDATE evaluations SET refetch_state = 'pending' WHERE id LIKE '%0001'")
        conn.commit()
        # 7: a callback acknowledged, not applied yet (its delivery must stay, to be applied)
        later = json.loads(fixture("get-evaluation-embedded.json"))
        later.update(id="0193a7c2-0000-7000-8000-000000000007", client_ref="ref-7")
        later["feedback"] = {"is_positive": False, "reason": "blurry"}
        raw = json.dumps(later).encode()
        acknowledged = accept(conn, Delivery(raw, normalize(parse_body(raw))))
        conn.commit()
        would = store.prune_counts("2025-01-01T00:00:00.000000Z")
        counts = asyncio.run(store.prune("2025-01-01T00:00:00.000000Z"))
        store.catch_up()
        applied = store.get_evaluation(later["id"])
        kept = {row[0][-1] for row in conn.execute("SELECT id FROM evaluations")}
        stats = store.stats(EvaluationFilter())
        refs = {row[0] for row in conn.execute("SELECT client_ref FROM client_refs")}
        leftover_issues = conn.execute(
            "SELECT count(*) FROM issues WHERE evaluation_id NOT IN (SELECT id FROM evaluations)"
        ).fetchone()[0]
        conn.close()
    finally:
        store.close()
    # 1: refetch pending; 2: forward pending; 5: touched recently; 6: still being reconciled;
    # 7: a callback waiting to be applied
    assert kept == {"1", "2", "5", "6", "7"}
    assert counts == {"evaluations": 3, "deliveries": 4, "forwards": 3, "quarantine": 1}
    assert would == counts  # --dry-run counts what prune then deletes
    assert stats["total"] == 5
    assert refs == {"ref-1", "ref-2", "ref-5", "ref-6", "ref-7"}
    assert applied is not None
    assert acknowledged.delivery_id in [d["id"] for d in applied["deliveries"]]
    assert leftover_issues == 0


def test_prune_command(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "RECEIVER_DATABASE": str(tmp_path / "r.db"),
        "RUNFLOW_WEBHOOK_SECRET": SECRET_A,
    }
    assert run_cli("migrate", cwd=tmp_path, env=env).returncode == 0
    done = run_cli("prune", "--older-than", "90d", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "pruned before" in done.stdout
    bad = run_cli("prune", "--older-than", "soon", cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert "--older-than" in bad.stderr


def _prune(tmp_path: Path, *args: str, answer: bytes | None) -> tuple[int, str, int]:
    """`receiver prune ARGS` on a database of one evaluation 13 hours old, at a terminal
    that answers `answer`, or without one (None: a script, cron): its status, output and the
    evaluations left."""
    database = one_evaluation(tmp_path / "r.db")
    with sqlite3.connect(database) as conn:  # last touched 13 hours ago
        conn.execute("UPDATE evaluations SET updated_at = ?", (ago("13h"),))
    env = {"PATH": "/usr/bin:/bin", "RECEIVER_DATABASE": str(database)}
    terminal, stdin = os.openpty() if answer is not None else (None, subprocess.DEVNULL)
    done = subprocess.Popen(
        [sys.executable, "-m", "receiver", "prune", *args],
        cwd=tmp_path,
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if terminal is not None:
        os.close(stdin)
        os.write(terminal, answer or b"")
    output, _ = done.communicate(timeout=60)
    if terminal is not None:
        os.close(terminal)
    with sqlite3.connect(database) as conn:
        (left,) = conn.execute("SELECT count(*) FROM evaluations").fetchone()
    return done.returncode, output.decode(), left


@sqlite_only
@pytest.mark.parametrize(
    ("args", "answer", "status", "said", "left"),
    [
        # --dry-run counts and deletes nothing, at a terminal or not
        (["--older-than", "0d", "--dry-run"], None, 0, "would prune before", 1),
        (["--older-than", "0d", "--dry-run"], b"", 0, "1 evaluations, 1 deliveries", 1),
        # under a day, a terminal is asked first, with what would go
        (["--older-than", "0d"], b"n\n", 1, "delete 1 evaluations, 1 deliveries", 1),
        (["--older-than", "12h"], b"y\n", 0, "pruned before", 0),
        (["--older-than", "0d", "--yes"], b"", 0, "pruned before", 0),
        # a script is never asked (it would hang, or fail): it runs as it always did
        (["--older-than", "0d"], None, 0, "pruned before", 0),
        (["--older-than", "1d"], b"", 0, "pruned before", 1),  # a day or more: not asked
    ],
)
def test_prune_looks_first_and_asks_before_emptying_the_database_at_a_terminal(
    tmp_path: Path,
    args: list[str],
    answer: bytes | None,
    status: int,
    said: str,
    left: int,
) -> None:
    """`--older-than 0d` deleted every evaluation at once, with no way to look first."""
    returncode, output, remaining = _prune(tmp_path, *args, answer=answer)
    assert returncode == status, output
    assert said in output
    assert remaining == left
    assert "Traceback" not in output


@pytest.mark.skipif(not POSTGRES, reason="SQLite writes one transaction at a time")
def test_prune_keeps_a_callback_another_server_acknowledges_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another server acknowledges a new callback of an evaluation prune has chosen, after it
    chose: the delivery stays, and is applied."""
    url = database_for(tmp_path / "r.db")
    store = Store(url)
    store.open()
    old = "2020-01-01T00:00:00.000000Z"
    try:
        asyncio.run(store.ingest(Delivery(callback(1), normalize(parse_body(callback(1))))))
        conn = connect(url)
        conn.execute("UPDATE evaluations SET updated_at = ?, next_poll_at = NULL", (old,))
        later = json.loads(callback(1))
        later["feedback"] = {"is_positive": False, "reason": "blurry"}
        raw = json.dumps(later).encode()
        forget = rollups.forget
        acked = []

        def forget_while_another_server_acks(c: sqlite3.Connection, ids: list[str]) -> None:
            forget(c, ids)
            other = connect(url)
            other.execute("BEGIN")
            acked.append(accept(other, Delivery(raw, normalize(parse_body(raw)))))
            other.execute("COMMIT")

        monkeypatch.setattr(rollups, "forget", forget_while_another_server_acks)
        asyncio.run(store.prune("2025-01-01T00:00:00.000000Z"))
        monkeypatch.setattr(rollups, "forget", forget)
        store.catch_up()
        found = store.get_evaluation(later["id"])
    finally:
        store.close()
    (receipt,) = acked
    assert receipt.outcome == "stored"
    assert found is not None
    assert [d["id"] for d in found["deliveries"]] == [receipt.delivery_id]


@pytest.mark.skipif(not POSTGRES, reason="SQLite writes one transaction at a time")
def test_prune_keeps_a_forward_another_process_retries_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`forwards --retry` commits after prune chose the evaluation: the forward, pending again,
    was deleted with it, and nothing was sent (the operator was told "pending")."""
    url = database_for(tmp_path / "r.db")
    sink = SinkSpec(name="consumer", type="http", url="http://127.0.0.1:9/")
    store = Store(url, forwarding=Forwarding(sinks=(sink,)))
    store.open()
    old = "2020-01-01T00:00:00.000000Z"
    try:
        asyncio.run(store.ingest(Delivery(callback(1), normalize(parse_body(callback(1))))))
        asyncio.run(store.finish_forwards([Outcome(1, "dead", old, "gone")], old))
        conn = connect(url)
        conn.execute("UPDATE evaluations SET updated_at = ?, next_poll_at = NULL", (old,))
        prunable = maintenance._prunable

        def look_while_another_process_retries(*args: Any, **kwargs: Any) -> list[str]:
            found = prunable(*args, **kwargs)
            if kwargs.get("among") is not None:  # prune's second look, under the locks
                other = connect(url)
                other.execute("BEGIN")
                outbox.retry_forward(other, 1, old, sinks=["consumer"])
                other.execute("COMMIT")
            return found

        monkeypatch.setattr(maintenance, "_prunable", look_while_another_process_retries)
        counts = asyncio.run(store.prune("2025-01-01T00:00:00.000000Z"))
        monkeypatch.setattr(maintenance, "_prunable", prunable)
        forwards = store.list_forwards(state=None, sink=None, limit=10)
        kept = store.get_evaluation(json.loads(callback(1))["id"])
    finally:
        store.close()
    assert counts["evaluations"] == 0
    assert [(f["id"], f["state"]) for f in forwards] == [(1, "pending")]
    assert kept is not None
