"""`make bench`: the same signed load against (a) a bare Starlette app, (b) a naive durable
receiver, (c) receiver with default settings, (d) receiver with --workers 2 and (e) the floor
(bench/apps/floor.py: the least a durable receiver in CPython does), one after another.
Each system runs --rounds times (3), in turn; the table shows each one's median run by
requests/s (p50, p99, peak RSS, the ratios to (a), (b) and (e)) and the range of p99 over all its
runs, and the JSON holds every run. After each receiver run it checks that every 200 was
stored. receiver applies callbacks after acknowledging them (store/backlog.py): for it the
table also shows how many were still queued when the load stopped, how long applying them
took with the server left running, the sustained rate (200s over load time plus that) and
whether every one was applied.

`--postgres` (`make bench-postgres`) runs (a), (b), (c) and then receiver on PostgreSQL with
1, 2 and 4 workers: a durable server (fsync on) from the Debian package, started in a temp dir
with its WAL warmed up (`postgres`), a fresh database per run.

Load: wrk (Debian package `wrk`) with 32 connections, pinned to its own core; each request is a
unique ~2 KB callback signed with the secret below. Without wrk (or with `--load python`),
bench/load.py sends the same load: a Python client, compared with wrk in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, cast

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.generate import uuid7  # noqa: E402
from receiver.signing import sign  # noqa: E402

SECRET = "whsec_bench_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa"
TEMPLATE = json.loads((ROOT / "tests/fixtures/runflow/evaluation-completed.json").read_text())


def bodies(path: Path, count: int, disorder: int, size: int = 2048) -> tuple[int, list[str]]:
    """`count` unique signed callbacks of about `size` bytes; returns the body size and the
    evaluation ids in the file's order (the order they are sent in).

    Ids are UUIDv7 like Runflow's, minted in submission order, 5 per millisecond; evaluations
    finish out of order, so each callback arrives up to `disorder` places after its id's.
    """
    rng = random.Random(6)
    start = datetime(2026, 11, 23, tzinfo=UTC)
    minted = [uuid7(rng, start + timedelta(milliseconds=n / 5)) for n in range(count)]
    arrival = sorted(range(count), key=lambda n: n + rng.random() * disorder)
    order = []
    with path.open("w") as out:
        for number, minted_at in enumerate(arrival):
            body = {
                **TEMPLATE,
                "id": minted[minted_at],
                "client_ref": f"bench-{number % 5000}",
            }
            order.append(body["id"])
            text = json.dumps(body, separators=(",", ":"))
            body["evaluation_instructions"] = "x" * max(0, size - len(text) - 30)
            raw = json.dumps(body, separators=(",", ":"))
            out.write(f"{sign(raw.encode(), SECRET)} {raw}\n")
        out.flush()
        os.fsync(out.fileno())  # else the kernel writes its ~300 MB back during a later run
    return len(raw), order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the server and its children (uvicorn workers), in MB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for one in pids:
        status = Path(f"/proc/{one}/status")
        if status.exists():
            found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
            total += int(found.group(1)) if found else 0
    return total / 1024


def load(
    generator: str, url: str, seconds: int, connections: int, cpus: str, env: dict[str, str]
) -> dict[str, Any]:
    """`seconds` of closed-loop load from `connections` connections, pinned to `cpus`."""
    if generator == "python":
        command = [
            sys.executable,
            str(ROOT / "bench/load.py"),
            f"--url={url}/webhooks/runflow",
            f"--seconds={seconds}",
            f"--connections={connections}",
        ]
    else:
        # A 30 s timeout: with wrk's 2 s, a slower answer would leave the latencies unseen.
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"]
        command += ["--latency", "-s"]
        command += [str(ROOT / "bench/wrk_post.lua"), url]
    done = subprocess.run(
        ["taskset", "-c", cpus, *command], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode:
        raise SystemExit(f"{generator} failed: {done.stdout} {done.stderr}")
    if generator == "python":
        return cast(dict[str, Any], json.loads(done.stdout))
    out = done.stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "responses": requests,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(map(int, failed.groups())) if failed else 0,
    }


Query = Callable[[str], list[tuple[Any, ...]]]  # the rows of a query on the system's database


def every_200_stored(stored: set[str], order: list[str], oks: int, connections: int) -> bool:
    """Whether no acknowledged callback is missing, by id. Bodies go out in the file's order,
    each connection waiting for its answer, so when the load stops at most `connections`
    are in flight: every body before position `oks - connections` got its 200 and must be
    stored (a count would let up to `connections` lost ones by), and none after position
    `oks + connections` was sent. A run that went round the file must have stored all."""
    answered = set(order[: max(0, oks - connections)])
    sent = set(order[: oks + connections])
    return answered <= stored <= sent


def run_system(
    generator: str,
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    cpus: str,
    load_cpus: str,
    seconds: int,
    connections: int,
    query: Query | None,
    applies: bool,
    order: list[str],
) -> dict[str, Any]:
    """One system under load. For receiver (`applies`), also how many callbacks were still
    queued to be applied when the load stopped, how long applying them took, and the
    sustained rate: 200s over the load time plus that."""
    os.sync()  # no earlier run's writeback competes with this one for the disk
    server = subprocess.Popen(
        ["taskset", "-c", cpus, *command],
        env=env,
        cwd=Path(env["BENCH_BODIES"]).parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.post(f"{url}/webhooks/runflow", content=b"{}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        result = load(generator, url, seconds, connections, load_cpus, env)
        # The same signed load for every system: any refusal or lost answer fails the run.
        result["clean"] = result["non_2xx"] == 0 and result.get("socket_errors", 0) == 0
        oks = result["responses"] - result["non_2xx"]

        def count(sql: str) -> int:
            assert query is not None
            return int(query(sql)[0][0])

        if query is not None and applies:
            stopped = time.monotonic()
            result["queued_at_end"] = count("SELECT count(*) FROM apply_queue")
            while count("SELECT count(*) FROM apply_queue") and time.monotonic() < stopped + 900:
                time.sleep(0.05)
            result["apply_after_s"] = round(time.monotonic() - stopped, 2)
            result["sustained_per_s"] = round(oks / (seconds + result["apply_after_s"]))
        time.sleep(0.5)  # let in-flight requests finish
        result["peak_rss_mb"] = round(peak_rss_mb(server.pid), 1)
    finally:
        server.terminate()
        server.wait(30)
    if query is not None:
        stored = {row[0] for row in query("SELECT evaluation_id FROM deliveries")}
        result["stored"] = len(stored)
        # wrk calls the script's request() once before the load, to check it: the first body
        # is not sent, and the file goes round from the second.
        sent = order[1:] + order[:1] if generator == "wrk" else order
        result["all_200s_stored"] = result["clean"] and every_200_stored(
            stored, sent, oks, connections
        )
        if applies:  # every body is a distinct evaluation
            result["all_applied"] = count("SELECT count(*) FROM evaluations") == len(stored)
    result["system"] = name
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A system's median run by requests/s, with the range of p99 over every run, the highest
    peak RSS of any, and the verdicts of all of them (one lost callback in any run shows)."""
    median = dict(sorted(runs, key=lambda r: r["requests_per_s"])[len(runs) // 2])
    median["p99_range_ms"] = (min(r["p99_ms"] for r in runs), max(r["p99_ms"] for r in runs))
    median["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    for verdict in ("clean", "all_200s_stored", "all_applied"):
        if verdict in median:
            median[verdict] = all(r[verdict] for r in runs)
    return median


def query_sqlite(database: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(database)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def query_postgres(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


# WAL segments (16 MB each) a warmed-up server keeps to recycle: see `postgres`.
WAL_SEGMENTS = 64


@contextmanager
def postgres(work: Path) -> Iterator[Callable[[str], str]]:
    """A durable PostgreSQL server (tests/postgres.py's, with fsync on) whose WAL is warm, as on
    a server that has been running; yields a function that creates a fresh database and
    returns its URL.

    Why warm: a new cluster creates each 16 MB WAL segment as it fills, writing it full of
    zeros (`wal_init_zero`) inside the commit that crosses into it: every ~7,500 callbacks an
    ack batch waited 15-50 ms, which set the p99 (docs/performance.md). A running server
    recycles old segments instead; `min_wal_size` keeps a gigabyte of them."""
    from tests.postgres import PostgresService

    class Durable(PostgresService):
        tuning: ClassVar[tuple[str, ...]] = (f"min_wal_size={WAL_SEGMENTS * 16}MB",)

    binary = Durable.find()
    if binary is None:
        raise SystemExit("PostgreSQL is not installed: apt-get install -y postgresql")
    server = Durable(binary, work)
    server.start()
    server.admin("CREATE TABLE warm (x int)")
    for _ in range(WAL_SEGMENTS):  # a segment each, recycled by the checkpoint below
        server.admin("INSERT INTO warm VALUES (1)", "SELECT pg_switch_wal()")
    server.admin("DROP TABLE warm", "CHECKPOINT")

    def create(name: str) -> str:
        database = re.sub(r"\W+", "_", name)
        server.admin(f"CREATE DATABASE {database}")
        return server.url_for(database)

    try:
        yield create
    finally:
        server.close()


SQLITE = ("bare", "naive", "receiver", "receiver --workers 2", "floor")
POSTGRES = (
    "bare",
    "naive",
    "receiver",
    "postgresql",
    "postgresql --workers 2",
    "postgresql --workers 4",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of every system, in turn; the table shows each one's median run",
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--bodies",
        type=int,
        default=150_000,
        help="distinct signed callbacks (wrk starts them again after the last)",
    )
    parser.add_argument(
        "--disorder", type=int, default=2_000, help="how far out of id order callbacks arrive"
    )
    parser.add_argument("--only", help="comma-separated system names")
    parser.add_argument("--postgres", action="store_true", help="receiver on PostgreSQL too")
    parser.add_argument(
        "--load",
        choices=("wrk", "python"),
        default="wrk" if shutil.which("wrk") else "python",
        help="the load generator: wrk (the default where installed) or bench/load.py",
    )
    parser.add_argument("--json", type=Path)
    options = parser.parse_args(argv)
    name = "ingest-postgres" if options.postgres else "ingest"
    output = options.json or ROOT / f"bench/results/{name}.json"
    if options.load == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk, or --load python")
    if options.load == "python":
        print("load: bench/load.py (docs/performance.md compares it with wrk)", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="receiver-bench-"))
    body_file = work / "bodies.txt"
    size, order = bodies(body_file, options.bodies, options.disorder)
    # Default settings: none of this shell's RECEIVER_*/RUNFLOW_*, and servers start in `work`,
    # away from any .env (a RUNFLOW_API_KEY there would turn refetching on).
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "RUNFLOW_"))},
        "BENCH_BODIES": str(body_file),
        "RUNFLOW_WEBHOOK_SECRET": SECRET,
        "RECEIVER_DASHBOARD_TOKEN": "bench",
        "PYTHONPATH": str(ROOT),
    }
    python = sys.executable
    uvicorn = [python, "-m", "uvicorn", "--no-access-log", "--log-level", "warning"]
    serve = [python, "-m", "receiver", "serve"]
    # name: (command, server cores, store); the load generator always runs on core 1.
    systems: dict[str, tuple[list[str], str, str | None]] = {
        "bare": ([*uvicorn, "bench.apps.bare:app"], "0", None),
        "naive": ([*uvicorn, "bench.apps.naive:app"], "0", "sqlite"),
        "receiver": (serve, "0", "sqlite"),
        "receiver --workers 2": ([*serve, "--workers", "2"], "0,1", "sqlite"),
        "floor": ([python, "-m", "bench.apps.floor"], "0", "sqlite"),
        "postgresql": (serve, "0", "postgresql"),
        "postgresql --workers 2": ([*serve, "--workers", "2"], "0,1", "postgresql"),
        "postgresql --workers 4": ([*serve, "--workers", "4"], "0,1", "postgresql"),
    }
    wanted = options.only.split(",") if options.only else POSTGRES if options.postgres else SQLITE
    if unknown := set(wanted) - set(systems):
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {sorted(systems)}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted}
    with postgres(work) if options.postgres else nullcontext() as create:
        for turn in range(1, options.rounds + 1):
            for name in wanted:
                command, cpus, store = systems[name]
                run = f"{name} {turn}"
                database = ""
                query: Query | None = None
                if store == "sqlite":
                    path = work / f"{run.replace(' ', '_')}.db"
                    database, query = str(path), partial(query_sqlite, path)
                elif store == "postgresql":
                    if create is None:
                        raise SystemExit(f"{name!r} needs --postgres")
                    database = create(run)
                    query = partial(query_postgres, database)
                port = free_port()
                env = {
                    **base_env,
                    "NAIVE_DATABASE": database,
                    "RECEIVER_DATABASE": database,
                    "PORT": str(port),
                }
                print(f"running {name} (round {turn} of {options.rounds}) …", file=sys.stderr)
                runs[name].append(
                    run_system(
                        options.load,
                        name,
                        [*command, "--port", str(port)],
                        env,
                        port,
                        cpus,
                        "1",
                        options.seconds,
                        options.connections,
                        query,
                        command[: len(serve)] == serve,  # receiver: it applies after acking
                        order,
                    )
                )
    results = [summary(runs[name]) for name in wanted]
    by_name = {r["system"]: r for r in results}
    for result in results:
        for base in ("bare", "naive", "floor"):
            if base in by_name:
                result[f"x_{base}"] = round(
                    result["requests_per_s"] / by_name[base]["requests_per_s"], 2
                )
    header = (
        f"{'system':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99 range':>14}{'RSS MB':>9}"
        f"{'x bare':>8}{'x naive':>9}{'x floor':>9}{'queued':>8}{'apply s':>9}{'sustained':>10}"
        "  clean stored=200s applied"
    )
    print(
        f"\n{options.load}: {options.connections} connections, {options.seconds}s each,"
        f" {size} B signed bodies;"
        f" median of {options.rounds} rounds (by req/s), p99 range over all of them"
    )
    print(header)
    for r in results:
        print(
            f"{r['system']:<22}{r['requests_per_s']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{'{:.1f}-{:.1f}'.format(*r['p99_range_ms']):>14}{r['peak_rss_mb']:>9.1f}"
            f"{r.get('x_bare', 0):>8.2f}{r.get('x_naive', 0):>9.2f}{r.get('x_floor', 0):>9.2f}"
            f"{r.get('queued_at_end', '-'):>8}{r.get('apply_after_s', '-'):>9}"
            f"{r.get('sustained_per_s', '-'):>10}"
            f"  {r['clean']!s:<5} {r.get('all_200s_stored', '-')!s:<11} {r.get('all_applied', '-')}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "load": options.load,
                "body_bytes": size,
                "connections": options.connections,
                "seconds": options.seconds,
                "rounds": options.rounds,
                "results": results,
                "runs": runs,
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
