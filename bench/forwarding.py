"""`make bench-forwarding`: how fast the outbox drains into Redis, and how long a verdict takes
from its callback to the Redis stream.

- drain: 100,000 stored evaluations, each with a pending forward to one Redis sink, drained by a
  `receiver worker` process into a real `redis-server`; events/s from the first to the last
  stream entry, and every event id in the stream exactly once.
- latency: `receiver serve` (default settings, its in-process worker, the same Redis sink) under
  signed callbacks at a fixed rate (default 1,000/s for 20 s); per verdict, callback sent →
  stream entry added (the entry id's millisecond timestamp: the moment Redis made it visible).

Prints a table and writes bench/results/forwarding.json. The server or worker runs on core 0;
Redis and the load generator on core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ingest import SECRET, TEMPLATE, free_port  # noqa: E402
from receiver.config import load_sinks  # noqa: E402
from receiver.events import event_id  # noqa: E402
from receiver.normalize import normalize, parse_body  # noqa: E402
from receiver.signing import sign  # noqa: E402
from receiver.store import Delivery, Forwarding, Store  # noqa: E402
from receiver.store.ingest import ingest  # noqa: E402

STREAM = "runflow:evaluations"
SERVER_CPUS, LOAD_CPUS = "0", "1"
EVENT = "evaluation.completed"


def callback(number: int, run: str) -> bytes:
    """A unique completed-evaluation callback, like bench/ingest.py's (about 2 KB)."""
    body = {
        **TEMPLATE,
        "id": f"0193a7c2-{run}-7000-8000-{number:012d}",
        "client_ref": f"bench-{number % 5000}",
    }
    return json.dumps(body, separators=(",", ":")).encode()


def write_config(work: Path, redis_url: str) -> Path:
    path = work / "receiver.toml"
    path.write_text(
        f'[[sinks]]\nname = "pipeline"\ntype = "redis"\nurl = "{redis_url}"\n'
        f'stream = "{STREAM}"\nmaxlen = 1000000\n'
    )
    return path


@contextmanager
def redis_server(work: Path, appendfsync: str) -> Iterator[str]:
    """A private redis-server on a free loopback port (AOF on, like tests/services.py), on the
    load generator's core."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    data = work / f"redis-{port}"
    data.mkdir()
    process = subprocess.Popen(
        ["taskset", "-c", LOAD_CPUS, binary, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync, "--dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(30)


def environment(work: Path, database: Path, config: Path) -> dict[str, str]:
    """Default settings apart from what the bench must set; no API key, so no refetch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "RUNFLOW_"))}
    return {
        **env,
        "RUNFLOW_WEBHOOK_SECRET": SECRET,
        "RECEIVER_DASHBOARD_TOKEN": "bench",
        "RECEIVER_DATABASE": str(database),
        "RECEIVER_CONFIG": str(config),
        "PYTHONPATH": str(ROOT),
    }


def backlog(database: Path, config: Path, count: int) -> float:
    """`count` evaluations stored by the store's own ingest (one outbox row each), in large
    transactions without fsync: the rows ingest writes, only faster. Returns seconds taken."""
    started = time.monotonic()
    Store(str(database)).migrate()
    forwarding = Forwarding(sinks=load_sinks({"RECEIVER_CONFIG": str(config)}))
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    for offset in range(0, count, 5000):
        conn.execute("BEGIN")
        for number in range(offset, min(count, offset + 5000)):
            body = callback(number, "d000")
            ingest(conn, Delivery(body=body, callback=normalize(parse_body(body))), forwarding)
        conn.execute("COMMIT")
    pending = conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
    conn.close()
    if pending != count:
        raise SystemExit(f"backlog has {pending} pending forwards, expected {count}")
    return time.monotonic() - started


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def stream_ids(url: str) -> tuple[list[str], int, int]:
    """Every entry's event id, and the first and last entry's timestamps (ms)."""
    client = redis.Redis.from_url(url)
    ids: list[str] = []
    first = last = 0
    start = b"-"
    try:
        while True:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
                STREAM, start, "+", count=10_000
            )
            if not entries:
                break
            first = first or entry_ms(entries[0][0])
            last = entry_ms(entries[-1][0])
            ids += [fields[b"id"].decode() for _, fields in entries]
            start = b"(" + entries[-1][0]
    finally:
        client.close()
    return ids, first, last


def outbox_states(database: Path) -> dict[str, int]:
    conn = sqlite3.connect(database)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()


def drain(work: Path, count: int, appendfsync: str, timeout: float) -> dict[str, Any]:
    database = work / "drain.db"
    with redis_server(work, appendfsync) as url:
        config = write_config(work, url)
        print(f"drain: storing {count:,} evaluations …", file=sys.stderr)
        built = backlog(database, config, count)
        os.sync()  # the backlog was written without fsync: not back to disk during the drain
        client = redis.Redis.from_url(url)
        started = time.monotonic()
        worker = subprocess.Popen(
            ["taskset", "-c", SERVER_CPUS, sys.executable, "-m", "receiver", "worker"],
            env=environment(work, database, config),
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print("drain: worker running …", file=sys.stderr)
        try:
            length = 0
            while time.monotonic() - started < timeout:
                length = int(client.xlen(STREAM))
                if length >= count:
                    break
                time.sleep(0.02)
            wall = time.monotonic() - started
            time.sleep(1.0)  # anything sent twice would show up now
        finally:
            worker.terminate()
            worker.wait(30)
            client.close()
        ids, first, last = stream_ids(url)
    span = max(last - first, 1) / 1000
    return {
        "evaluations": count,
        "backlog_build_s": round(built, 1),
        "events_per_s": round((len(ids) - 1) / span),
        "first_to_last_s": round(span, 2),
        "wall_from_spawn_s": round(wall, 2),
        "xlen": len(ids),
        "distinct_event_ids": len(set(ids)),
        "outbox": outbox_states(database),
        "exactly_once": len(ids) == len(set(ids)) == count,
    }


async def connection(
    host: str, port: int, jobs: asyncio.Queue[tuple[str, bytes] | None], sent: dict[str, float]
) -> list[float]:
    """One keep-alive HTTP/1.1 connection taking requests off `jobs` until None; returns the
    response times. Raw asyncio streams: an HTTP client library costs more CPU than the server
    it measures, and its pool does not scale to hundreds of queued requests."""
    reader, writer = await asyncio.open_connection(host, port)
    answered: list[float] = []
    try:
        while (job := await jobs.get()) is not None:
            evaluation_id, request = job
            sent[evaluation_id] = time.time()
            began = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"callback {evaluation_id} answered {head.splitlines()[0]!r}")
            answered.append(time.perf_counter() - began)
    finally:
        writer.close()
    return answered


async def load(
    port: int, bodies: list[bytes], rate: float, connections: int
) -> tuple[dict[str, float], list[float], float]:
    """Offer `bodies` at a fixed rate to `connections` connections; returns evaluation id →
    wall time the request was written, the response times, and how far (s) a request at most
    waited for a free connection past its scheduled time."""
    sent: dict[str, float] = {}
    jobs: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
    workers = [
        asyncio.create_task(connection("127.0.0.1", port, jobs, sent)) for _ in range(connections)
    ]
    requests = []
    for body in bodies:
        head = (
            "POST /webhooks/runflow HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            "content-type: application/json\r\n"
            f"runflow-signature: {sign(body, SECRET)}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        requests.append((json.loads(body)["id"], head.encode() + body))
    scheduled: dict[str, float] = {}
    start = time.perf_counter()
    wall = time.time() - start
    for index, job in enumerate(requests):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        scheduled[job[0]] = wall + due
        jobs.put_nowait(job)
    for _ in workers:
        jobs.put_nowait(None)
    answered = [seconds for times in await asyncio.gather(*workers) for seconds in times]
    lag = max(sent[key] - scheduled[key] for key in sent)
    return sent, answered, lag


async def read_stream(url: str, expected: int, deadline: float) -> dict[str, int]:
    """A consumer: XREAD BLOCK until `expected` entries or the deadline; event id → entry ms,
    counting duplicates as they come (an id seen twice maps to -1)."""
    client = redis.asyncio.Redis.from_url(url)
    seen: dict[str, int] = {}
    last = "0-0"
    try:
        while len(seen) < expected and time.time() < deadline:
            reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = (
                await client.xread({STREAM: last}, count=1000, block=500)  # type: ignore[assignment]
            )
            for _, entries in reply:
                for entry, fields in entries:
                    key = fields[b"id"].decode()
                    seen[key] = -1 if key in seen else entry_ms(entry)
                    last = entry.decode()
    finally:
        await client.aclose()
    return seen


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds each thread of `pid` has used, in user space and in the kernel: the main
    thread (the event loop) as "loop", the others by thread id (Python does not name them for
    the kernel)."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "loop" if task.name == str(pid) else f"thread {task.name}"
        used[f"{name} user"] = int(fields[11]) / tick
        used[f"{name} kernel"] = int(fields[12]) / tick
    return used


def backlogs(database: Path) -> tuple[int, int]:
    """Callbacks waiting to be applied, and forwards waiting to be sent (a read-only look)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        queued = conn.execute("SELECT count(*) FROM apply_queue").fetchone()[0]
        pending = conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()
        return int(queued), int(pending[0])
    finally:
        conn.close()


async def watch(database: Path, samples: list[tuple[int, int]], stop: asyncio.Event) -> None:
    """Where verdicts wait, once a second: not applied yet, or not forwarded yet."""
    while not stop.is_set():
        with contextlib.suppress(sqlite3.Error):  # before the server made its tables
            samples.append(await asyncio.to_thread(backlogs, database))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def measure(
    port: int,
    redis_url: str,
    bodies: list[bytes],
    rate: float,
    connections: int,
    server: int,
    database: Path,
) -> dict[str, Any]:
    span = len(bodies) / rate
    reader = asyncio.create_task(read_stream(redis_url, len(bodies), time.time() + span + 60))
    samples: list[tuple[int, int]] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(database, samples, stop))
    before = thread_cpu(server)
    sent, answered, lag = await load(port, bodies, rate, connections)
    seen = await reader
    after = thread_cpu(server)
    stop.set()
    await watcher
    used = {name: after[name] - before.get(name, 0.0) for name in after}
    cpu = {
        name: round(seconds / len(sent) * 1e6, 1)
        for name, seconds in sorted(used.items(), key=lambda item: -item[1])
        if seconds > 0
    }
    cpu["all"] = round(sum(used.values()) / len(sent) * 1e6, 1)
    wanted = {event_id(evaluation_id, EVENT): when for evaluation_id, when in sent.items()}
    # An entry id's time is whole milliseconds, rounded down: +0.5 ms on average.
    latencies = [
        seen[key] + 0.5 - when * 1000 for key, when in wanted.items() if seen.get(key, -1) >= 0
    ]
    return {
        "callbacks": len(sent),
        "events": len(seen),
        "duplicates": sum(1 for value in seen.values() if value < 0),
        "missing": sum(1 for key in wanted if key not in seen),
        "exactly_once": len(latencies) == len(wanted) == len(seen),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "http_p50_ms": round(percentile(answered, 0.50) * 1000, 2),
        "http_p99_ms": round(percentile(answered, 0.99) * 1000, 2),
        "max_schedule_lag_ms": round(lag * 1000, 1),
        "cpu_us_per_callback": cpu,  # by server thread, from the load's start to the last entry
        "most_unapplied": max((queued for queued, _ in samples), default=0),
        "most_unforwarded": max((pending for _, pending in samples), default=0),
    }


def latency(
    work: Path, rate: float, seconds: float, connections: int, appendfsync: str
) -> dict[str, Any]:
    database = work / "latency.db"
    bodies = [callback(number, "e000") for number in range(int(rate * seconds))]
    with redis_server(work, appendfsync) as redis_url:
        config = write_config(work, redis_url)
        os.sync()  # nothing of the drain's left to write back during this run
        port = free_port()
        server = subprocess.Popen(
            ["taskset", "-c", SERVER_CPUS, sys.executable, "-m", "receiver", "serve",
             "--port", str(port)],
            env=environment(work, database, config),
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            print(f"latency: {rate:.0f} callbacks/s for {seconds:.0f} s …", file=sys.stderr)
            result = asyncio.run(
                measure(port, redis_url, bodies, rate, connections, server.pid, database)
            )
        finally:
            server.terminate()
            server.wait(30)
    return {"rate_per_s": rate, "seconds": seconds, **result, "outbox": outbox_states(database)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="drain backlog size")
    parser.add_argument("--rate", type=float, default=1000.0, help="callbacks/s (latency)")
    parser.add_argument("--seconds", type=float, default=20.0, help="latency run length")
    parser.add_argument("--connections", type=int, default=32, help="latency load connections")
    parser.add_argument("--appendfsync", default="always", choices=("always", "everysec", "no"))
    parser.add_argument("--only", choices=("drain", "latency"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/forwarding.json")
    options = parser.parse_args(argv)
    if shutil.which("taskset") is None:
        raise SystemExit("taskset is missing (util-linux)")
    os.sched_setaffinity(0, {int(LOAD_CPUS)})  # this process is the load generator
    work = Path(tempfile.mkdtemp(prefix="receiver-forwarding-"))
    results: dict[str, Any] = {"redis_appendfsync": options.appendfsync}
    try:
        if options.only in (None, "drain"):
            results["drain"] = drain(work, options.count, options.appendfsync, timeout=600)
        if options.only in (None, "latency"):
            results["latency"] = latency(
                work, options.rate, options.seconds, options.connections, options.appendfsync
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nRedis sink, AOF appendfsync={options.appendfsync}")
    if "drain" in results:
        d = results["drain"]
        print(
            f"drain   {d['evaluations']:>7,} forwards  {d['events_per_s']:>7,} events/s"
            f"  ({d['first_to_last_s']} s first→last, {d['wall_from_spawn_s']} s from spawn)"
            f"  xlen={d['xlen']:,} distinct={d['distinct_event_ids']:,}"
            f"  exactly once: {d['exactly_once']}"
        )
    if "latency" in results:
        r = results["latency"]
        print(
            f"latency {r['callbacks']:>7,} callbacks at {r['rate_per_s']:.0f}/s"
            f"  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  p99 {r['p99_ms']} ms"
            f"  max {r['max_ms']} ms  events={r['events']:,}  exactly once: {r['exactly_once']}"
            f"  (HTTP p50 {r['http_p50_ms']} ms, p99 {r['http_p99_ms']} ms)"
        )
        threads = ", ".join(f"{name} {us} µs" for name, us in r["cpu_us_per_callback"].items())
        print(
            f"        server CPU per callback: {threads}; at most {r['most_unapplied']:,}"
            f" unapplied and {r['most_unforwarded']:,} unforwarded (sampled each second)"
        )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
