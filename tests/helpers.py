"""Shared test data: the fixture bodies, their secrets and signatures, and small helpers."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import httpx2
from starlette.testclient import TestClient

from receiver.config import Settings
from receiver.signing import sign
from receiver.sinks import Event, SinkError
from receiver.sinkspec import SinkSpec

from .database import connect, database_for

ROOT = Path(__file__).resolve().parents[1]
# Exact copies of ../shared/fixtures/runflow (test_signing checks they still match).
FIXTURES = ROOT / "tests" / "fixtures" / "runflow"
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures" / "runflow"
TOKEN = "test-dashboard-token"


def _signature_table() -> tuple[str, str, dict[str, tuple[str, str]]]:
    lines = (FIXTURES / "signatures.txt").read_text().splitlines()
    secret_a = next(line.split(": ")[1] for line in lines if line.startswith("# secret A"))
    secret_b = next(line.split(": ")[1] for line in lines if line.startswith("# secret B"))
    table = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, with_a, with_b = line.split()
            table[name] = (with_a, with_b)
    return secret_a, secret_b, table


SECRET_A, SECRET_B, SIGNATURES = _signature_table()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "webhook_secrets": (SECRET_A, SECRET_B),
        "database": database_for(tmp_path / "receiver.db"),
        "dashboard_token": TOKEN,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def post_callback(
    client: TestClient,
    body: bytes,
    secret: str | None = SECRET_A,
    headers: dict[str, str] | None = None,
) -> httpx2.Response:
    sent = {"content-type": "application/json", **(headers or {})}
    if secret is not None:
        sent["runflow-signature"] = sign(body, secret)
    return client.post("/webhooks/runflow", content=body, headers=sent)


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def count(settings: Settings, table: str) -> int:
    """Rows in `table`, read straight from the database."""
    conn = connect(settings.database)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def rows(settings: Settings, sql: str, *params: object) -> list[sqlite3.Row]:
    conn = connect(settings.database)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class RecordingSink:
    """A destination (the `Sink` protocol) that records what arrives and fails on demand:
    each queued error in `failures` answers one event."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.received: list[Event] = []
        self.failures: list[SinkError] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def deliver(self, events: Sequence[Event]) -> list[SinkError | None]:
        results: list[SinkError | None] = []
        for event in events:
            if self.failures:
                results.append(self.failures.pop(0))
            else:
                self.received.append(event)
                results.append(None)
        return results
