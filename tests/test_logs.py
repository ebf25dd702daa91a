"""No secret or token ever reaches the logs: representative flows (good, refused, oversized and
malformed callbacks, API calls with right and wrong tokens, the dashboard login, feedback and
refetch against the fake Runflow with its API key, Slack, Discord and signed http sinks that
fail once and then deliver, `receiver send-test` and `receiver refetch`) are run against a real
server at debug level and in process, and everything logged is searched for every secret."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.config import Settings
from receiver.fakes.chat import FakeDiscord, FakeSlack
from receiver.fakes.recorder import Recorder
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.logs import QUIET_LIBRARIES
from receiver.signing import sign

from .helpers import SECRET_A, SECRET_B, fixture
from .leaks import assert_no_secrets, find_leaks, url_secrets
from .servers import ReceiverProcess, run_cli

EVALUATION_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"  # evaluation-completed.json
SINKS_TOML = """
[[sinks]]
name = "ops-slack"
type = "slack"
url = "env:SLACK_WEBHOOK_URL"

[[sinks]]
name = "qa-discord"
type = "discord"
url = "env:DISCORD_WEBHOOK_URL"

[[sinks]]
name = "billing"
type = "http"
url = "env:BILLING_URL"
secret = "env:BILLING_WEBHOOK_SECRET"

[[sinks]]
name = "gone-slack"
type = "slack"
url = "env:GONE_SLACK_URL"
max_attempts = 1
"""


Client = httpx.Client | TestClient  # the same calls, over a socket or in process


def _unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_urlsafe(12)}"


@dataclass
class World:
    """The fakes a receiver talks to, and every secret in play (by name)."""

    runflow: FakeRunflow
    slack: FakeSlack
    discord: FakeDiscord
    billing: Recorder
    env: dict[str, str]
    secrets: dict[str, str] = field(default_factory=dict)


@contextmanager
def world() -> Iterator[World]:
    dashboard_token = _unique("dash-")
    api_key = _unique("rf_live_")
    metrics_token = _unique("metrics-")
    billing_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    runflow = FakeRunflow(api_key=api_key, callbacks_enabled=False)
    runflow.add(EVALUATION_ID)
    slack = FakeSlack(f"/services/T0LEAK000/B0LEAK000/{_unique('slackTok')}")
    discord = FakeDiscord(token=_unique("discordTok"))
    billing = Recorder()
    # Each destination fails once first, so error paths are logged too.
    runflow.fail_next(500)
    slack.fail_next(500)
    discord.fail_next(429, retry_after=0.1)
    billing.fail_next(503)
    with ExitStack() as stack:
        runflow_url = stack.enter_context(serve_in_thread(runflow.app))
        slack_url = slack.url(stack.enter_context(serve_in_thread(slack.app)))
        discord_url = discord.url(stack.enter_context(serve_in_thread(discord.app)))
        billing_url = stack.enter_context(serve_in_thread(billing.app)) + "/hooks/evaluations"
        # A revoked Slack webhook (Slack answers 404 no_service): its forward goes dead, and
        # the error kept for the API and dashboard must not carry the URL either.
        gone_url = slack_url.rsplit("/", 1)[0] + "/" + _unique("revokedTok")
        env = {
            "RECEIVER_DASHBOARD_TOKEN": dashboard_token,
            "RUNFLOW_API_KEY": api_key,
            "RUNFLOW_API_BASE": runflow_url,
            "RECEIVER_METRICS_TOKEN": metrics_token,
            "SLACK_WEBHOOK_URL": slack_url,
            "DISCORD_WEBHOOK_URL": discord_url,
            "BILLING_URL": billing_url,
            "BILLING_WEBHOOK_SECRET": billing_secret,
            "GONE_SLACK_URL": gone_url,
            "RECEIVER_LOG_LEVEL": "debug",
            "RECEIVER_MAX_BODY_BYTES": "4096",
            "RECEIVER_RETRY_BASE": "0.05",
            "RECEIVER_RETRY_MAX": "0.2",
        }
        found = World(runflow, slack, discord, billing, env)
        found.secrets = {
            "RUNFLOW_WEBHOOK_SECRET (first)": SECRET_A,
            "RUNFLOW_WEBHOOK_SECRET (second)": SECRET_B,
            "RECEIVER_DASHBOARD_TOKEN": dashboard_token,
            "RUNFLOW_API_KEY": api_key,
            "RECEIVER_METRICS_TOKEN": metrics_token,
            "BILLING_WEBHOOK_SECRET": billing_secret,
            **url_secrets("SLACK_WEBHOOK_URL", slack_url),
            **url_secrets("DISCORD_WEBHOOK_URL", discord_url),
            **url_secrets("GONE_SLACK_URL", gone_url),
        }
        yield found


def _callbacks(http: Client) -> None:
    """A good callback, a bad signature, a signed non-JSON body (400) and an oversized one."""
    good = fixture("evaluation-completed.json")
    assert _post(http, good, sign(good, SECRET_A)) == 200
    assert _post(http, good, sign(good, "whsec_not_the_secret")) == 401
    assert _post(http, b"{not json", sign(b"{not json", SECRET_B)) == 400
    big = b"{" + b" " * 5000 + b"}"
    assert _post(http, big, sign(big, SECRET_A)) == 413


def _post(http: Client, body: bytes, signature: str) -> int:
    headers = {"runflow-signature": signature, "content-type": "application/json"}
    return http.post("/webhooks/runflow", content=body, headers=headers).status_code


def _api(http: Client, token: str, wrong: str) -> None:
    bearer = {"authorization": f"Bearer {token}"}
    assert http.get("/api/evaluations", headers=bearer).status_code == 200
    assert http.get(f"/api/evaluations/{EVALUATION_ID}", headers=bearer).status_code == 200
    assert http.get("/api/stats", headers={"authorization": f"Bearer {wrong}"}).status_code == 401
    # A token put in the query string by mistake: refused, and never logged either.
    assert http.get("/api/evaluations", params={"access_token": token}).status_code == 401
    rated = http.patch(
        f"/api/evaluations/{EVALUATION_ID}/feedback",
        json={"is_positive": False, "reason": "hands are wrong"},
        headers=bearer,
    )
    assert rated.status_code == 200, rated.text


def _login(http: Client, token: str, wrong: str) -> str:
    """Log in with a wrong token, then the right one; the session cookie's value."""
    assert http.get("/login").status_code == 200
    refused = http.post("/login", data={"token": wrong, "next": "/"})
    assert refused.status_code == 303
    assert "receiver_session" not in refused.headers.get("set-cookie", "")
    accepted = http.post("/login", data={"token": token, "next": "/"})
    assert accepted.status_code == 303
    cookie = accepted.cookies["receiver_session"]
    assert http.get("/", headers={"cookie": f"receiver_session={cookie}"}).status_code == 200
    return cookie


def _wait_until_delivered(world: World, http: Client, timeout: float = 20) -> str:
    """Until Slack, Discord and the http sink each got the verdict (after failing once) and
    the revoked webhook's forward is dead; what the API then shows of the dead forwards."""
    bearer = {"authorization": f"Bearer {world.env['RECEIVER_DASHBOARD_TOKEN']}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivered = world.slack.received and world.discord.received and world.billing.received
        dead = http.get("/api/forwards", params={"state": "dead"}, headers=bearer)
        assert dead.status_code == 200, dead.text
        if delivered and dead.json()["items"]:
            assert dead.json()["items"][0]["last_error"]
            page = http.get("/forwards", params={"state": "dead"}, headers=bearer)
            assert page.status_code == 200
            return dead.text + page.text
        time.sleep(0.05)
    raise AssertionError("the sinks did not all receive the event, or none went dead")


def test_a_real_server_never_logs_a_secret(tmp_path: Path) -> None:
    (tmp_path / "receiver.toml").write_text(SINKS_TOML)
    wrong = _unique("wrong-token-")
    with world() as w:
        w.secrets["a wrong token someone sent"] = wrong
        server = ReceiverProcess(tmp_path, **w.env).start()
        try:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                _callbacks(http)
                _api(http, w.env["RECEIVER_DASHBOARD_TOKEN"], wrong)
                w.secrets["the session cookie"] = _login(
                    http, w.env["RECEIVER_DASHBOARD_TOKEN"], wrong
                )
                metrics = http.get(
                    "/metrics",
                    headers={"authorization": f"Bearer {w.env['RECEIVER_METRICS_TOKEN']}"},
                )
                assert metrics.status_code == 200
                shown = _wait_until_delivered(w, http)
            cli_env = {**server.env}
            sent = run_cli("send-test", f"{server.url}/webhooks/runflow", cwd=tmp_path, env=cli_env)
            assert sent.returncode == 0, sent.stderr
            refetched = run_cli("refetch", EVALUATION_ID, cwd=tmp_path, env=cli_env)
            assert refetched.returncode == 0, refetched.stderr
        finally:
            server.stop(signal.SIGTERM)
    assert w.runflow.requests, "the API key was used (refetch, feedback)"
    log = server.log.read_text()
    assert '"logger"' in log or "receiver" in log  # the server did log
    assert_no_secrets(log, w.secrets, "the server's output")
    assert_no_secrets(shown, w.secrets, "dead forwards in the API and dashboard")
    for name, done in (("send-test", sent), ("refetch", refetched)):
        assert_no_secrets(done.stdout + done.stderr, w.secrets, f"`receiver {name}` output")


def test_in_process_flows_never_log_a_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in QUIET_LIBRARIES:  # as `receiver serve` configures them (receiver/logs.py)
        caplog.set_level(logging.WARNING, logger=name)
    wrong = _unique("wrong-token-")
    with world() as w:
        w.secrets["a wrong token someone sent"] = wrong
        settings = _settings(tmp_path, w)
        app = create_app(settings)
        with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as http:
            _callbacks(http)
            _api(http, settings.dashboard_token, wrong)
            w.secrets["the session cookie"] = _login(http, settings.dashboard_token, wrong)
            _wait_until_delivered(w, http)
    assert caplog.records, "something was logged"
    assert_no_secrets(caplog.records, w.secrets, "the captured log records")


def _settings(tmp_path: Path, w: World) -> Settings:
    config = tmp_path / "receiver.toml"
    config.write_text(SINKS_TOML)
    env = {
        **w.env,
        "RUNFLOW_WEBHOOK_SECRET": f"{SECRET_A},{SECRET_B}",
        "RECEIVER_DATABASE": str(tmp_path / "receiver.db"),
        "RECEIVER_CONFIG": str(config),
    }
    return Settings.from_env(env, env_file=None)


def test_the_check_finds_a_secret_in_any_form() -> None:
    """The helper itself: a leak as is, percent-encoded, JSON-escaped or base64 is found."""
    secret = "whsec_abc/def+ghi=="
    named = {"the secret": secret}
    for text in (
        f"url=https://x/{secret}",
        "q=whsec_abc%2Fdef%2Bghi%3D%3D",
        json.dumps({"v": secret}),
        base64.b64encode(secret.encode()).decode(),
    ):
        assert find_leaks(text, named), text
    assert not find_leaks("nothing to see", named)
    with pytest.raises(AssertionError, match="the secret appears in logs"):
        assert_no_secrets(f"oops {secret}", named)
    records = [logging.makeLogRecord({"msg": "sent", "url": f"https://x/{secret}"})]
    with pytest.raises(AssertionError, match="the secret"):
        assert_no_secrets(records, named)
