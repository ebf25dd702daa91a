"""`receiver backup`: online while callbacks keep arriving, consistent, and restorable."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import httpx

from receiver.signing import sign

from .helpers import SECRET_A, TOKEN, fixture
from .servers import ReceiverProcess, run_cli


def callback(number: int) -> bytes:
    body = json.loads(fixture("evaluation-completed.json"))
    body["id"] = f"0193a7c2-0000-7000-8000-{number:012d}"
    return json.dumps(body).encode()


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
    copy.close()
    assert 50 <= evaluations == deliveries <= len(sent)  # one transaction each: never half

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
        assert total == min(evaluations, 500)
        again = run_cli("backup", str(restored / "receiver.db"), cwd=restored, env=server.env)
    assert again.returncode == 1
    assert again.stderr.strip().endswith("exists; choose a new path (a backup never overwrites)")
