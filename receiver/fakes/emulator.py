"""The parts of the Runflow emulator that are not HTTP routing: how an evaluation is born,
what verdict it gets, what its callback body looks like, and how that callback is delivered
(signed, retried on an exponential schedule, abandoned after N attempts, every attempt logged).

`FakeRunflow` (runflow.py) composes these; they are separate so each can be read on its own.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from ..normalize import VERDICT_ONLY
from ..runflow_requests import is_loopback_host
from ..signing import sign

log = logging.getLogger(__name__)
EMBED_FIELDS = ("judges", "action", "gate_failures")
CallbackShape = Literal["bare", "envelope"]
SHAPES: tuple[CallbackShape, ...] = ("bare", "envelope")


def template() -> dict[str, Any]:
    """A completed evaluation with judges, action and gate_failures (the shared fixture)."""
    text = resources.files(__package__).joinpath("data/evaluation-embedded.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def timestamp() -> str:
    """Now as Runflow writes it: microseconds and a `+00:00` offset (contract §2)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Verdict:
    """How an evaluation ends: `completed` with `passed`, or `failed` with a failure code."""

    status: Literal["completed", "failed"]
    passed: bool | None = None
    failure_code: str | None = None


PASSED = Verdict("completed", passed=True)
NOT_PASSED = Verdict("completed", passed=False)
FAILED = Verdict("failed", failure_code="processing_failed")
VerdictPolicy = Verdict | Callable[[dict[str, Any]], Verdict]


def verdict_by_url(request: dict[str, Any]) -> Verdict:
    """The default rule, deterministic so demos and tests can choose an outcome by the image
    URL: `fail` or `invalid` in it → failed (`invalid_media`), `pass` or `good` → passed,
    anything else → completed but not passed (the template's judges and issues)."""
    url = str(request.get("generated_image_url", "")).lower()
    if "fail" in url or "invalid" in url:
        return Verdict("failed", failure_code="invalid_media")
    if "pass" in url or "good" in url:
        return PASSED
    return NOT_PASSED


def pending_evaluation(request: dict[str, Any], evaluation_id: str) -> dict[str, Any]:
    """The evaluation `POST /v1/evaluations` creates: pending, no verdict, no embeds yet."""
    base = template()
    now = timestamp()
    evaluation = {key: value for key, value in base.items() if key not in EMBED_FIELDS}
    evaluation.update(
        {
            "id": evaluation_id,
            "run_id": None,
            "status_code": "pending",
            "task_description": None,
            "generation_prompt": None,
            "evaluation_instructions": None,
            "input_attributes": None,
            "reference_images": [],
            "client_ref": None,
            "callback_url": None,
            "overall_passed": None,
            "weighted_pass_rate": None,
            "top_issues": None,
            "top_strengths": None,
            "check_summary": None,
            "analysis_modules_executed": 0,
            "primary_action_code": None,
            "eval_duration_ms": None,
            "cost": None,
            "failure_code": None,
            "source_code": "api",
            "job_class_code": request.get("job_class") or "standard",
            "created_at": now,
            "submitted_at": now,
            "updated_at": now,
            "completed_at": None,
            "links": {"self": f"/v1/evaluations/{evaluation_id}"},
            "judges": [],
            "gate_failures": [],
            "action": None,
        }
    )
    for key, value in request.items():
        if key != "job_class":
            evaluation[key] = copy.deepcopy(value)
    return evaluation


def finished(evaluation: dict[str, Any], verdict: Verdict, duration_ms: int) -> dict[str, Any]:
    """`evaluation` in its terminal state; a completed one gets the template's judges, action
    and gate failures (all passing, with no issues, when the verdict is a pass)."""
    done = copy.deepcopy(evaluation)
    now = timestamp()
    done.update(
        {
            "status_code": verdict.status,
            "updated_at": now,
            "completed_at": now,
            "eval_duration_ms": duration_ms,
        }
    )
    if verdict.status == "failed":
        done["failure_code"] = verdict.failure_code or "processing_failed"
        return done
    base = template()
    for key in VERDICT_ONLY["completed"]:
        done[key] = base[key]
    if verdict.passed:
        done.update(
            {
                "overall_passed": True,
                "weighted_pass_rate": 1.0,
                "top_issues": [],
                "check_summary": {"passed": 5, "failed": 0, "total": 5},
                "primary_action_code": "accept",
                "gate_failures": [],
                "action": {**base["action"], "primary_action": "accept"},
            }
        )
        done["action"].update(failure_summary=None, improved_prompt=None)
        for judge in done["judges"]:
            judge.update(passed=True, issues=[])
    _reown(done)
    return done


def _reown(evaluation: dict[str, Any]) -> None:
    """Give the embedded rows fresh ids pointing at this evaluation, as a real one would."""
    rows: list[dict[str, Any]] = [*evaluation["judges"], *evaluation["gate_failures"]]
    rows += [issue for judge in evaluation["judges"] for issue in judge.get("issues", [])]
    if evaluation.get("action"):
        rows.append(evaluation["action"])
    for row in rows:
        row["id"] = str(uuid.uuid4())
        row["evaluation_id"] = evaluation["id"]
    for judge in evaluation["judges"]:
        for issue in judge.get("issues", []):
            issue["evaluation_judge_id"] = judge["id"]


def callback_body(evaluation: dict[str, Any], shape: CallbackShape) -> bytes:
    """The callback bytes: the bare evaluation (as GET shows it without embeds) or an event
    envelope shaped like the shared fixtures (contract §3 leaves both possible)."""
    if shape == "bare":
        body = {k: v for k, v in evaluation.items() if k not in EMBED_FIELDS}
    else:
        status = evaluation["status_code"]
        body = {
            "event": f"evaluation.{status}",
            "evaluation_id": evaluation["id"],
            "status": status,
            "client_ref": evaluation.get("client_ref"),
        }
        if status == "completed":
            for key in ("overall_passed", "weighted_pass_rate", "top_issues"):
                body[key] = evaluation.get(key)
        else:
            body["failure_code"] = evaluation.get("failure_code")
        body["created_at"] = evaluation.get("created_at")
        body["completed_at"] = evaluation.get("completed_at")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class CallbackAttempt:
    """One delivery attempt as the emulator made it. `status` is the HTTP answer, or None
    with `error` set when there was none (refused connection, timeout, not sent)."""

    evaluation_id: str
    attempt: int
    url: str
    status: int | None
    error: str | None
    at: float  # time.monotonic() when the attempt ended
    secret_index: int | None  # which of the configured secrets signed it (None: unsigned)
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


# `delivering` while retries remain; then `delivered` or `abandoned`. `disabled`: callbacks were
# switched off; `not_loopback`: refused to contact a non-loopback host (the default).
Outcome = Literal["delivering", "delivered", "abandoned", "disabled", "not_loopback"]


class CallbackSender:
    """Delivers callbacks the way contract §2 describes: any non-2xx, timeout or connection
    error is retried after `backoff * 2**(n-1)` seconds, up to `attempts` tries in all.

    Runs on the emulator's event loop; the log is read from the test's thread, so it sits
    behind a lock.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        attempts: int,
        backoff: float,
        timeout: float,
        loopback_only: bool,
    ) -> None:
        if attempts < 1:
            raise ValueError("callback_attempts must be at least 1")
        self.secrets = list(secrets)
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.loopback_only = loopback_only
        self.enabled = True
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._log: list[CallbackAttempt] = []
        self._outcomes: dict[str, Outcome] = {}

    @property
    def log(self) -> list[CallbackAttempt]:
        with self._lock:
            return list(self._log)

    @property
    def outcomes(self) -> dict[str, Outcome]:
        with self._lock:
            return dict(self._outcomes)

    def clear(self) -> None:
        with self._lock:
            self._log.clear()
            self._outcomes.clear()

    def _headers(self, body: bytes) -> tuple[dict[str, str], int | None]:
        """Signed with the next secret in turn, so rotation exercises every secret."""
        headers = {
            "content-type": "application/json",
            "user-agent": "Runflow-Emulator/1",
            "runflow-request-id": str(uuid.uuid4()),
        }
        secrets = list(self.secrets)
        if not secrets:
            return headers, None  # an org with no secret: unsigned, as Runflow does
        index = next(self._turn) % len(secrets)
        headers["runflow-signature"] = sign(body, secrets[index])
        return headers, index

    def _record(self, item: CallbackAttempt | None, evaluation_id: str, outcome: Outcome) -> None:
        with self._lock:
            if item is not None:
                self._log.append(item)
            self._outcomes[evaluation_id] = outcome

    async def deliver(self, evaluation_id: str, url: str, body: bytes) -> Outcome:
        if not self.enabled:
            self._record(None, evaluation_id, "disabled")
            return "disabled"
        host = urlsplit(url).hostname or ""
        if self.loopback_only and not is_loopback_host(host):
            refused = "not sent: host is not loopback"
            attempt = CallbackAttempt(
                evaluation_id, 0, url, None, refused, time.monotonic(), None, body
            )
            self._record(attempt, evaluation_id, "not_loopback")
            return "not_loopback"
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
            for number in range(1, self.attempts + 1):
                headers, secret_index = self._headers(body)
                status: int | None = None
                error: str | None = None
                try:
                    response = await http.post(url, content=body, headers=headers)
                    status = response.status_code
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                attempt = CallbackAttempt(
                    evaluation_id, number, url, status, error, time.monotonic(), secret_index, body
                )
                answer = status if status is not None else error
                log.info(
                    "callback %s attempt %d/%d: %s", evaluation_id, number, self.attempts, answer
                )
                if attempt.ok:
                    self._record(attempt, evaluation_id, "delivered")
                    return "delivered"
                last = number == self.attempts
                self._record(attempt, evaluation_id, "abandoned" if last else "delivering")
                if not last:
                    await asyncio.sleep(self.backoff * 2 ** (number - 1))
        log.warning("callback %s abandoned after %d attempts", evaluation_id, self.attempts)
        return "abandoned"
