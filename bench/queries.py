"""`make bench-queries`: time the read paths of the dashboard, API and CLI on a generated DB.

    python bench/queries.py --db PATH [--runs 20] [--json bench/results/queries.json]

Each query runs once to warm the page cache, then `--runs` times through the store's own read
connection (the code the API and dashboard call). Prints query, p50, p95, max (ms) and rows;
writes the same as JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from receiver.store import EvaluationFilter, Store
from receiver.store.queries import CHANGED, encode_cursor
from receiver.times import format_time

F = EvaluationFilter


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    kib = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal")))
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def timed(run: Callable[[], int], runs: int) -> dict[str, Any]:
    rows = run()  # warm-up, not counted
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        rows = run()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "p50": round(statistics.median(samples), 2),
        "p95": round(samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))], 2),
        "max": round(samples[-1], 2),
        "rows": rows,
    }


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def deep_cursor(store: Store, where: EvaluationFilter, moment: str, newest_first: bool) -> str:
    """A cursor that starts a page at `moment` (the middle of the filter's time range): deep
    into the list, as after many pages."""
    bound = {"until": moment} if newest_first else {"since": moment}
    items, _ = store.list_evaluations(
        EvaluationFilter(**{**where.__dict__, **bound}), 1, newest_first=newest_first
    )
    if not items:
        return encode_cursor(moment, "")
    return encode_cursor(items[0]["received_at"], items[0]["id"])


def cases(store: Store, now: datetime) -> dict[str, Callable[[], int]]:
    """Name → a call that returns how many rows (items) it answered."""
    ago = {days: format_time(now - timedelta(days=days)) for days in (1, 7, 30)}
    day_old, _ = store.list_evaluations(F(status="completed", until=ago[1]), 50)
    sample = next(item for item in day_old if item["client_ref"] and item["refetched"])
    ref = sample["client_ref"]
    big_ref = "customer-00000-job"  # the most frequent one (skewed like real data)
    day = {days: (now - timedelta(days=days)).strftime("%Y-%m-%dT00:00:00.000000Z")
           for days in (7, 30)}  # fmt: skip

    oldest, _ = store.list_evaluations(F(), 1, newest_first=False)
    first = parse(oldest[0]["received_at"]) if oldest else now

    def page(
        where: EvaluationFilter, deep: bool = False, newest_first: bool = True
    ) -> Callable[[], int]:
        """One page of the list; deep, from a cursor found once, before it is timed."""
        cursor = None
        if deep:
            low = parse(where.since) if where.since else first
            middle = format_time(low + ((parse(where.until) if where.until else now) - low) / 2)
            cursor = deep_cursor(store, where, middle, newest_first)

        def timed() -> int:
            items, _ = store.list_evaluations(where, 50, cursor, newest_first=newest_first)
            return len(items)

        return timed

    def overview(where: EvaluationFilter) -> int:
        result = store.stats(where)
        store.outbox_depth()
        return len(result["per_day"])

    lists: dict[str, EvaluationFilter] = {
        "none": F(),
        "client_ref": F(client_ref=ref),
        "client_ref (largest)": F(client_ref=big_ref),
        "status=failed": F(status="failed"),
        "status=running": F(status="running"),
        "passed=true": F(passed=True),
        "passed=false": F(passed=False),
        "task_type=banner": F(task_type="banner"),
        "failure_code=timed_out": F(failure_code="timed_out"),
        "since=24h": F(since=ago[1]),
        "until=30d ago": F(until=ago[30]),
        "since 30d ago until 7d ago": F(since=ago[30], until=ago[7]),
        "status+task_type": F(status="completed", task_type="logo"),
        "passed+task_type": F(passed=False, task_type="interior"),
        "failure_code+task_type": F(failure_code="dispatch_failed", task_type="avatar"),
        "client_ref+status": F(client_ref=big_ref, status="failed"),
        "task_type+since=24h": F(task_type="product", since=ago[1]),
        "status+passed (empty)": F(status="failed", passed=True),
        "failure_code+passed (empty)": F(failure_code="timed_out", passed=True),
    }
    found: dict[str, Callable[[], int]] = {
        "overview (stats + outbox_depth)": lambda: overview(F()),
        "overview task_type=headshot": lambda: overview(F(task_type="headshot")),
        "overview since 7 days (whole days)": lambda: overview(F(since=day[7])),
        "overview since=24h (partial day)": lambda: overview(F(since=ago[1])),
        "overview since=30d (partial day)": lambda: overview(F(since=ago[30])),
        "overview client_ref (its rows)": lambda: overview(F(client_ref=big_ref)),
        "overview failure_code": lambda: overview(F(failure_code="timed_out")),
        "overview q=client_ref (text index)": lambda: overview(F(q=ref)),
    }
    for name, where in lists.items():
        found[f"list {name}"] = page(where)
        found[f"list {name}, deep"] = page(where, deep=True)
    found["list oldest first"] = page(F(), newest_first=False)
    found["list oldest first, deep"] = page(F(), deep=True, newest_first=False)
    found["list oldest status=failed, deep"] = page(
        F(status="failed"), deep=True, newest_first=False
    )
    for name, text in {
        "client_ref fragment": ref[9:14],
        "whole client_ref": ref,
        "evaluation id prefix": sample["id"][:23],
        "label word (common)": "Collar",
        "failure code": "timed_out",
        "no match": "zzzq",
        "two characters (no index)": "zq",
    }.items():
        found[f"search q={name}"] = page(F(q=text))
    found["search q=label word + status"] = page(F(q="Collar", status="completed"))
    found["search q=label word + disjoint status"] = page(F(q="Collar", status="failed"))
    # The live tables' poll (changed_since: what was written since, oldest change first) and
    # the API's; `flag` as the dashboard asks (time bounds only, each row says if it matches).
    back = {span: format_time(now - timedelta(seconds=span)) for span in (10, 3600, 86400)}
    back[30 * 86400] = ago[30]
    page_oldest = store.list_evaluations(F(status="failed"), 50)[0][-1]["received_at"]

    def changes(
        where: EvaluationFilter, flag: bool = False, deep: bool = False
    ) -> Callable[[], int]:
        cursor = None
        if deep:  # from the middle of the time range, as after many pages
            start = parse(where.changed_since or "")
            cursor = encode_cursor(CHANGED, format_time(start + (now - start) / 2), "")

        def timed() -> int:
            items, _ = store.list_changes(where, 50, cursor, flag=flag)
            return len(items)

        return timed

    found["changes: live poll, 10 s (overview, evaluations)"] = changes(
        F(changed_since=back[10]), flag=True
    )
    found["changes: live poll, 10 s, status=failed page"] = changes(
        F(changed_since=back[10], status="failed", since=page_oldest), flag=True
    )
    found["changes: live poll, 10 s, passed=false+q"] = changes(
        F(changed_since=back[10], passed=False, q="Collar"), flag=True
    )
    found["changes: last hour"] = changes(F(changed_since=back[3600]))
    found["changes: 24 h"] = changes(F(changed_since=back[86400]))
    found["changes: 24 h status=failed"] = changes(F(changed_since=back[86400], status="failed"))
    found["changes: 30 d, deep"] = changes(F(changed_since=back[30 * 86400]), deep=True)
    found["changes: 30 d client_ref"] = changes(F(changed_since=back[30 * 86400], client_ref=ref))
    found["changes: 30 d client_ref (largest)"] = changes(
        F(changed_since=back[30 * 86400], client_ref=big_ref)
    )
    found["detail get_evaluation"] = lambda: 1 if store.get_evaluation(sample["id"]) else 0
    found["detail lineage"] = lambda: len(store.lineage(sample["id"]))
    found["client_ref page"] = lambda: len((store.get_client_ref(ref) or {})["evaluations"])
    found["client_ref page (largest)"] = lambda: len(
        (store.get_client_ref(big_ref) or {})["evaluations"]
    )
    found["dead letters"] = lambda: len(store.list_forwards(state="dead", sink=None, limit=50))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", default="bench/results/queries.json")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    store = Store(args.db)
    store.migrate()  # new indexes and tables are part of what is measured
    now = datetime.now(UTC)
    newest, _ = store.list_evaluations(F(), 1)
    if newest:
        now = parse(newest[0]["received_at"])
    results = []
    print(f"{'query':<48} {'p50':>8} {'p95':>8} {'max':>8} {'rows':>6}")
    for name, run in cases(store, now).items():
        if args.only and args.only not in name:
            continue
        result = {"query": name, **timed(run, args.runs)}
        results.append(result)
        print(f"{name:<48} {result['p50']:>8.2f} {result['p95']:>8.2f} {result['max']:>8.2f}"
              f" {result['rows']:>6}", flush=True)  # fmt: skip
    total = store.stats(F())["total"]
    store.close()
    report = {
        "machine": machine(),
        "database": {"path": args.db, "bytes": Path(args.db).stat().st_size, "evaluations": total},
        "runs": args.runs,
        "ms": results,
    }
    if not args.only:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
