"""bench/forwarding.py's own accounting: where a run's CPU went (per thread of the server) and
where verdicts waited (a read-only look at the queues). Nothing here is timed."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from bench.forwarding import backlogs, thread_cpu
from receiver.store import Store


def test_cpu_is_counted_per_thread_user_and_kernel_apart() -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        used = thread_cpu(os.getpid())
    finally:
        stop.set()
        other.join()
    assert {"loop user", "loop kernel"} <= set(used)
    assert f"thread {other.native_id} user" in used
    assert all(seconds >= 0 for seconds in used.values())


def test_callbacks_not_applied_and_forwards_not_sent_are_counted(tmp_path: Path) -> None:
    database = tmp_path / "bench.db"
    Store(str(database)).migrate()
    conn = sqlite3.connect(database)
    with conn:
        conn.execute("INSERT INTO apply_queue (delivery_id) VALUES (1), (2)")
    conn.close()
    assert backlogs(database) == (2, 0)
