"""Fill a receiver database with realistic evaluations, fast: bulk inserts into the real schema.

    python bench/generate.py --count 1000000 --db PATH [--days 90] [--seed 1]

Each evaluation is built the way ingest builds it (a signed callback body, then a refetched
object with judges, merged and reduced to columns by receiver.normalize), so the rows are the
ones the ingest path would write; client_refs, rollups and search come from the store's own
code after the load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vocabulary import CATEGORIES, FAILURES, LABELS, TASK_TYPES, pick
from receiver.events import event_id
from receiver.normalize import columns, judge_issues, merge, normalize
from receiver.signing import sign
from receiver.store import Store, rollups, search
from receiver.store.client_refs import refresh_client_ref
from receiver.times import format_time, shift

SECRET = "whsec_bench"
SINKS_SINCE_DAYS = 30  # sinks were configured this long ago: older verdicts have no outbox rows
BATCH = 5000
EVALUATION_COLUMNS = [
    "id", "client_ref", "status", "event", "passed", "score", "task_type", "failure_code",
    "top_issues", "issue_text", "attempt_number", "parent_evaluation_id", "superseded",
    "superseded_at", "created_at", "completed_at", "received_at", "updated_at", "run_id",
    "image_url", "refetched", "feedback_is_positive", "feedback_reason", "source", "data",
    "refetch_state", "refetch_attempts", "refetch_next_at", "refetch_error", "next_poll_at",
    "poll_attempts",
]  # fmt: skip


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def uuid7(rng: random.Random, moment: datetime) -> str:
    """Time-ordered ids like Runflow's (UUIDv7): 48 bits of milliseconds, then random."""
    bits = (int(moment.timestamp() * 1000) << 80) | rng.getrandbits(80)
    bits = (bits & ~(0xF << 76)) | (0x7 << 76)
    return str(uuid.UUID(int=(bits & ~(0x3 << 62)) | (0x2 << 62)))


@dataclass
class Batch:
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    issues: list[tuple[Any, ...]] = field(default_factory=list)
    deliveries: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[Any, ...]] = field(default_factory=list)


class Generator:
    def __init__(self, count: int, days: int, seed: int, end: datetime) -> None:
        self.rng = random.Random(seed)
        self.count, self.end = count, end
        self.start = end - timedelta(days=days)
        self.refs = max(1, count // 100)  # ~10k client_refs for 1M evaluations
        self.last_of_ref: dict[str, tuple[str, int]] = {}
        self.superseded: list[tuple[str, str]] = []
        self.delivery_id = 0

    def arrivals(self) -> list[datetime]:
        span = (self.end - self.start).total_seconds()
        offsets = sorted(self.rng.random() * span for _ in range(self.count))
        return [self.start + timedelta(seconds=offset) for offset in offsets]

    def evaluation(self, received: datetime, batch: Batch) -> None:
        rng = self.rng
        age = (self.end - received).total_seconds()
        stamp = format_time(received)
        completed = received - timedelta(seconds=rng.uniform(0.05, 3))
        created = completed - timedelta(seconds=rng.uniform(15, 90))
        evaluation_id = uuid7(rng, created)
        ref = f"customer-{int(self.refs * rng.random() ** 1.5):05d}-job"
        client_ref = None if rng.random() < 0.03 else ref
        attempt, parent = 1, None
        if client_ref in self.last_of_ref and rng.random() < 0.08:
            parent, previous = self.last_of_ref[client_ref]
            attempt = previous + 1
            self.superseded.append((parent, stamp))
        task_type = pick(rng, TASK_TYPES)
        roll = rng.random()
        status = "completed" if roll < 0.86 else "failed"
        if (age < 600 and roll > 0.7) or rng.random() < 0.004:
            status = rng.choice(["pending", "running"])
        passed = None
        if status == "completed":
            verdict = rng.random()
            passed = True if verdict < 0.68 else False if verdict < 0.97 else None
        score = None
        if passed is not None:
            score = round(rng.uniform(0.75, 1.0) if passed else rng.uniform(0.1, 0.75), 4)
        labels: list[str] = []
        if passed is False or (passed and rng.random() < 0.3):
            labels = [pick(rng, LABELS) for _ in range(rng.randint(1, 3 if not passed else 1))]
        terminal = status in ("completed", "failed")
        obj: dict[str, Any] = {
            "id": evaluation_id,
            "status_code": status,
            "task_type": task_type,
            "generated_image_url": f"https://cdn.example.com/renders/{evaluation_id}.png",
            "overall_passed": passed,
            "weighted_pass_rate": score,
            "top_issues": labels or None,
            "primary_action_code": None if passed in (True, None) else "regenerate",
            "parent_evaluation_id": parent,
            "attempt_number": attempt,
            "superseded_at": None,
            "eval_duration_ms": int((completed - created).total_seconds() * 1000),
            "feedback_is_positive": None,
            "created_at": created.isoformat(),
            "updated_at": (completed if terminal else created).isoformat(),
            "client_ref": client_ref,
            "completed_at": completed.isoformat() if terminal else None,
            "cost": "0.0400" if status == "completed" else None,
            "failure_code": pick(rng, FAILURES) if status == "failed" else None,
            "job_class_code": "standard",
        }
        values: dict[str, Any] = {"refetched": 0, "refetch_attempts": 0, "poll_attempts": 0}
        values.update(refetch_state=None, refetch_next_at=None, refetch_error=None)
        if terminal:
            body = dumps(obj).encode()
            fields = normalize(obj).fields
            self.delivery(batch, body, evaluation_id, stamp, status)
            values.update(source="webhook", next_poll_at=None, refetch_next_at=stamp)
            values["refetch_state"] = "pending" if age < 300 else "done"
            if age >= 300 and rng.random() < 0.03:
                values.update(refetch_state="failed", refetch_attempts=6, refetch_error="503")
            if values["refetch_state"] == "done":
                judges = self.judges(passed) if status == "completed" else []
                fields = merge(fields, {**obj, "judges": judges})
                values["refetched"] = 1
        else:
            fields = normalize(obj).fields
            values.update(source="submit", next_poll_at=shift(stamp, 600))
        cols = columns(fields)
        if client_ref is not None:
            self.last_of_ref[client_ref] = (evaluation_id, attempt)
        batch.evaluations.append(
            {
                **values,
                **cols,
                "id": evaluation_id,
                "event": f"evaluation.{status}" if terminal else None,
                "top_issues": dumps(cols["top_issues"]),
                "issue_text": search.issue_text(cols["top_issues"]),
                "superseded": 0,
                "received_at": stamp,
                "updated_at": shift(stamp, 2) if values["refetched"] else stamp,
                "data": dumps(fields),
            }
        )
        batch.issues += [(evaluation_id, *issue) for issue in judge_issues(fields)]
        if terminal and age < SINKS_SINCE_DAYS * 86400:
            self.forwards(batch, evaluation_id, status, passed, stamp, age)

    def judges(self, passed: bool | None) -> list[dict[str, Any]]:
        rng, found = self.rng, []
        for n in range(rng.randint(2, 5)):
            issues = []
            if passed is not True or rng.random() < 0.1:
                for _ in range(rng.choice([0, 1, 1, 2])):
                    category, subcategory = pick(rng, CATEGORIES)
                    issues.append(
                        {
                            "category": category,
                            "subcategory": subcategory,
                            "detail": pick(rng, LABELS),
                        }
                    )
            found.append({"name": f"judge-{n}", "passed": not issues, "issues": issues})
        return found

    def delivery(
        self, batch: Batch, body: bytes, evaluation_id: str, stamp: str, status: str
    ) -> None:
        self.delivery_id += 1
        signature = sign(body, SECRET)
        request_id = f"req_{self.delivery_id:09d}"
        headers = {
            "content-type": "application/json",
            "user-agent": "Runflow-Webhooks/1.0",
            "runflow-request-id": request_id,
            "runflow-signature": signature,
        }
        receipts = 2 if self.rng.random() < 0.02 else 1
        batch.deliveries.append(
            (self.delivery_id, stamp, shift(stamp, 30 * (receipts - 1)), receipts, "webhook",
             request_id, 0, hashlib.sha256(body).hexdigest(), "evaluation",
             f"evaluation.{status}", evaluation_id, "stored", dumps(headers), body)
        )  # fmt: skip

    def forwards(
        self, batch: Batch, evaluation_id: str, status: str, passed: bool | None, stamp: str,
        age: float,
    ) -> None:  # fmt: skip
        event = f"evaluation.{status}"
        sinks = ["pipeline"] + (["ops-slack"] if status == "failed" or passed is False else [])
        for sink in sinks:
            state, attempts, error, at = "done", 1, None, shift(stamp, 3)
            if age < 120:
                state, attempts, at = "pending", 0, stamp
            elif self.rng.random() < 0.003:
                state, attempts, error, at = "dead", 10, "HTTP 500 from sink", shift(stamp, 3600)
            batch.outbox.append(
                (event_id(evaluation_id, event), sink, evaluation_id, self.delivery_id, event,
                 state, attempts, at, error, stamp, at)
            )  # fmt: skip


def flush(conn: sqlite3.Connection, batch: Batch) -> None:
    names = ", ".join(EVALUATION_COLUMNS)
    marks = ", ".join(f":{name}" for name in EVALUATION_COLUMNS)
    conn.executemany(f"INSERT INTO evaluations ({names}) VALUES ({marks})", batch.evaluations)
    conn.executemany(
        "INSERT INTO issues (evaluation_id, judge, category, subcategory, detail)"
        " VALUES (?, ?, ?, ?, ?)",
        batch.issues,
    )
    conn.executemany(
        "INSERT INTO deliveries (id, received_at, last_received_at, receipts, source, request_id,"
        " secret_index, sha256, kind, event, evaluation_id, outcome, headers, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        batch.deliveries,
    )
    conn.executemany(
        "INSERT INTO outbox (event_id, sink, evaluation_id, delivery_id, event_type, state,"
        " attempts, next_attempt_at, last_error, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        batch.outbox,
    )


def generate(path: str, count: int, days: int, seed: int, end: datetime) -> None:
    if Path(path).exists():
        raise SystemExit(f"{path} exists: generate into a new file")
    Store(path).migrate()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    generator = Generator(count, days, seed, end)
    started = time.monotonic()
    arrivals = generator.arrivals()
    for offset in range(0, count, BATCH):
        batch = Batch()
        for received in arrivals[offset : offset + BATCH]:
            generator.evaluation(received, batch)
        conn.execute("BEGIN")
        flush(conn, batch)
        conn.execute("COMMIT")
        done = offset + len(batch.evaluations)
        print(f"\r{done:,} evaluations, {time.monotonic() - started:.0f}s", end="", flush=True)
    conn.execute("BEGIN")
    conn.executemany(
        "UPDATE evaluations SET superseded = 1, updated_at = ? WHERE id = ? AND superseded = 0",
        [(stamp, parent) for parent, stamp in generator.superseded],
    )
    for client_ref in generator.last_of_ref:
        refresh_client_ref(conn, client_ref, format_time(end))
    rollups.rebuild(conn)
    search.rebuild(conn)
    conn.execute("COMMIT")
    print(f"\n{count:,} evaluations in {time.monotonic() - started:.0f}s: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--db", required=True, help="a new SQLite file")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end", help="ISO time of the last arrival (default: now)")
    args = parser.parse_args()
    end = datetime.fromisoformat(args.end) if args.end else datetime.now(UTC)
    generate(args.db, args.count, args.days, args.seed, end.astimezone(UTC))


if __name__ == "__main__":
    main()
