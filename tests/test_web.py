from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from receiver import api
from receiver.app import create_app
from receiver.config import Settings
from receiver.signing import sign
from receiver.store import Store

from .database import connect, sqlite_only
from .helpers import SECRET_A, SECRET_B, SIGNATURES, count, fixture, make_settings, post_callback

COMPLETED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"
FAILED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e22"


@pytest.mark.parametrize(
    ("name", "outcome", "evaluation_id"),
    [
        ("evaluation-completed.json", "stored", COMPLETED_ID),
        ("evaluation-completed-envelope.json", "stored", COMPLETED_ID),
        ("evaluation-failed.json", "stored", FAILED_ID),
        ("evaluation-failed-envelope.json", "stored", FAILED_ID),
        ("get-evaluation-embedded.json", "stored", COMPLETED_ID),
        ("run-completed.json", "ignored", None),
    ],
)
@pytest.mark.parametrize("secret_column", [0, 1], ids=["secret-a", "secret-b"])
def test_every_fixture_is_accepted_with_its_listed_signature(
    client: TestClient, name: str, outcome: str, evaluation_id: str | None, secret_column: int
) -> None:
    body = fixture(name)
    response = client.post(
        "/webhooks/runflow",
        content=body,
        headers={"runflow-signature": SIGNATURES[name][secret_column]},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "ok": True,
        "outcome": outcome,
        "delivery_id": 1,
        "evaluation_id": evaluation_id,
    }


def test_the_delivery_is_kept_byte_for_byte(client: TestClient, settings: Settings) -> None:
    body = fixture("evaluation-completed.json")
    post_callback(client, body, SECRET_B, headers={"runflow-request-id": "req-1"})
    conn = connect(settings.database)
    stored, request_id, secret_index = conn.execute(
        "SELECT body, request_id, secret_index FROM deliveries"
    ).fetchone()
    assert stored == body
    assert (request_id, secret_index) == ("req-1", 1)


BAD_SIGNATURES = {
    "missing": None,
    "empty": "",
    "63-chars": "a" * 63,
    "65-chars": "a" * 65,
    "non-hex": "g" * 64,
    "other-body": sign(fixture("evaluation-failed.json"), SECRET_A),
    "unknown-secret": sign(fixture("evaluation-completed.json"), "whsec_nope"),
}


@pytest.mark.parametrize("signature", BAD_SIGNATURES.values(), ids=BAD_SIGNATURES.keys())
def test_bad_signatures_are_refused_and_store_nothing(
    client: TestClient, settings: Settings, signature: str | None
) -> None:
    headers = {} if signature is None else {"runflow-signature": signature}
    response = client.post(
        "/webhooks/runflow", content=fixture("evaluation-completed.json"), headers=headers
    )
    assert response.status_code == 401
    assert response.json()["ok"] is False
    assert "Runflow-Signature" in response.json()["error"]
    assert count(settings, "deliveries") == count(settings, "quarantine") == 0


def test_a_body_changed_by_one_byte_is_refused(client: TestClient, settings: Settings) -> None:
    body = fixture("evaluation-completed.json")
    signature = sign(body, SECRET_A)
    tampered = body.replace(b'"overall_passed":false', b'"overall_passed":true ')
    response = client.post(
        "/webhooks/runflow", content=tampered, headers={"runflow-signature": signature}
    )
    assert response.status_code == 401
    assert count(settings, "deliveries") == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"text"', "must be a JSON object, got str"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"id": "x", "score": NaN}', "NaN is not valid JSON"),
        (b'{"id": "x", "score": 1e999}', "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"status": "completed"}', "no evaluation id"),
        (b'{"evaluation_id": 42}', "evaluation id must be"),
        (b'{"id": "x", "status_code": "done"}', "status must be one of"),
        (b'{"id": "x", "event": 5}', "event must be a string"),
    ],
    ids=[
        "not-json",
        "empty",
        "array",
        "string",
        "bad-utf8",
        "nan",
        "huge-number",
        "deep-nesting",
        "no-id",
        "id-not-string",
        "unknown-status",
        "event-not-string",
    ],
)
def test_signed_but_unusable_bodies_get_400_and_are_quarantined(
    client: TestClient, settings: Settings, body: bytes, reason: str
) -> None:
    response = post_callback(client, body)
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert count(settings, "deliveries") == count(settings, "evaluations") == 0
    conn = connect(settings.database)
    assert conn.execute("SELECT body FROM quarantine").fetchone()[0] == body


def test_unsigned_callbacks_only_when_allowed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, webhook_secrets=(), allow_unsigned=True)
    with TestClient(create_app(settings)) as client:
        response = post_callback(client, fixture("evaluation-completed.json"), secret=None)
        assert response.json()["outcome"] == "stored"
        wrong = post_callback(client, fixture("evaluation-failed.json"), secret="whsec_wrong")
        assert wrong.status_code == 401


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_bodies_over_the_limit_get_413(tmp_path: Path, declared: bool) -> None:
    settings = make_settings(tmp_path, max_body_bytes=1024)
    body = b'{"id": "x", "pad": "' + b"a" * 2000 + b'"}'
    with TestClient(create_app(settings)) as client:
        headers = {"runflow-signature": sign(body, SECRET_A)}
        content = body if declared else iter([body[:1000], body[1000:]])
        response = client.post("/webhooks/runflow", content=content, headers=headers)
    assert response.status_code == 413
    assert "limit" in response.json()["error"]
    assert count(settings, "deliveries") == count(settings, "quarantine") == 0


def test_the_same_body_twice_is_a_duplicate(client: TestClient, settings: Settings) -> None:
    body = fixture("evaluation-completed.json")
    first = post_callback(client, body).json()
    second = post_callback(client, body, SECRET_B).json()
    assert first["outcome"] == "stored"
    assert second == {**first, "outcome": "duplicate"}
    assert count(settings, "deliveries") == count(settings, "evaluations") == 1
    conn = connect(settings.database)
    assert conn.execute("SELECT receipts FROM deliveries").fetchone()[0] == 2


@sqlite_only
def test_a_store_that_cannot_write_answers_503_never_200(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = Store(settings.database, busy_timeout=0.05)
    with TestClient(create_app(settings, store=store)) as client:
        blocker = sqlite3.connect(settings.database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            response = post_callback(client, fixture("evaluation-completed.json"))
            assert response.status_code == 503
            assert "cannot write" in response.json()["error"]
            assert client.get("/readyz").status_code == 503
        finally:
            blocker.execute("ROLLBACK")
        again = post_callback(client, fixture("evaluation-completed.json"))
        assert again.json()["outcome"] == "stored"
        assert client.get("/readyz").status_code == 200


@sqlite_only
def test_readiness_answers_503_when_the_writer_cannot_get_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding the writers' flock (a long CLI write) made /readyz hang for
    as long as it held it: a probe must answer, and 503 says the store cannot write now."""
    monkeypatch.setattr(api, "READY_TIMEOUT", 0.2)
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        turns = os.open(f"{settings.database}-writer.lock", os.O_RDONLY | os.O_CREAT)
        fcntl.flock(turns, fcntl.LOCK_EX)
        try:
            response = client.get("/readyz")
        finally:
            os.close(turns)
        assert response.status_code == 503
        assert "took no write within 0.2 s" in response.json()["error"]
        assert client.get("/readyz").status_code == 200


def test_unpaired_surrogates_are_stored_not_crashed_on(
    client: TestClient, settings: Settings
) -> None:
    body = b'{"id": "e-1", "status_code": "completed", "client_ref": "bad\\ud800ref"}'
    assert post_callback(client, body).json()["outcome"] == "stored"
    conn = connect(settings.database)
    assert conn.execute("SELECT client_ref FROM evaluations").fetchone()[0] == "bad\ufffdref"


def test_wrong_method_and_unknown_path_answer_json(client: TestClient) -> None:
    assert client.get("/webhooks/runflow").json() == {
        "ok": False,
        "error": "GET is not allowed here",
    }
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert json.loads(missing.text)["ok"] is False
