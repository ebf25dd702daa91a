"""(b) The naive durable receiver: verify, parse, then INSERT + COMMIT per request with
synchronous=FULL, one connection, no batching (what most webhook handlers do)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECRET = os.environ["RUNFLOW_WEBHOOK_SECRET"].encode()
conn = sqlite3.connect(os.environ["NAIVE_DATABASE"], isolation_level=None, check_same_thread=False)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA synchronous = FULL")
conn.execute(
    "CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY, evaluation_id TEXT, body BLOB)"
)


async def webhook(request: Request) -> Response:
    body = await request.body()
    expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("runflow-signature", "")):
        return JSONResponse({"ok": False}, status_code=401)
    payload = json.loads(body)
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO deliveries (evaluation_id, body) VALUES (?, ?)", (payload["id"], body)
    )
    conn.execute("COMMIT")
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/webhooks/runflow", webhook, methods=["POST"])])
