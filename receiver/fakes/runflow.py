"""A Runflow emulator that behaves as documented (runflow-contract.md §1-5), for tests and demos.

- `POST /v1/evaluations`: validated with Runflow's limits (422 in Runflow's error shape),
  `Idempotency-Key` honoured (same key and body: the same evaluation; same key, other body:
  409), answers 202 with a pending evaluation. A background task then moves it to running and,
  after `callback_delay`, to completed or failed (by the `verdict` policy), and delivers a
  signed callback to its `callback_url` (emulator.py: retries, give-up, log).
- `GET /v1/evaluations/{id}?embed=…` reflects the current state.
- `PATCH /v1/evaluations/{id}/feedback` sets or clears the rating; `PATCH /v1/runs/{id}/feedback`
  refuses API keys with 403, as Runflow does (only user sessions may rate runs).
- Every endpoint checks the Bearer key, then takes the next queued fault (`fail_next`).

Serve `FakeRunflow().app` on loopback (`server.serve_in_thread`); tests steer it in-process.
For demos: `python -m receiver.fakes.runflow --port 8100 --secret whsec_…`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import EMBEDS
from ..runflow_requests import (
    IDEMPOTENCY_KEY_MAX,
    Problem,
    canonical_json,
    feedback_problems,
    is_uuid,
    submit_problems,
)
from .emulator import (
    FAILED,
    NOT_PASSED,
    PASSED,
    SHAPES,
    CallbackAttempt,
    CallbackSender,
    CallbackShape,
    Outcome,
    Verdict,
    VerdictPolicy,
    callback_body,
    finished,
    pending_evaluation,
    template,
    timestamp,
    verdict_by_url,
)

__all__ = ["FakeRunflow", "Fault", "Verdict", "error", "main", "template"]
log = logging.getLogger(__name__)
PAUSE_POLL = 0.01
RUN_FEEDBACK_FORBIDDEN = "Run feedback requires a user session; API keys cannot rate runs"
ERROR_CODES = {
    400: ("BAD_REQUEST", "Bad request"),
    401: ("UNAUTHORIZED", "Invalid or missing API key"),
    402: ("INSUFFICIENT_CREDITS", "Not enough credits"),
    403: ("FORBIDDEN", "The API key lacks the required scope"),
    404: ("NOT_FOUND", "Not found"),
    409: ("CONFLICT", "Conflict"),
    422: ("VALIDATION_ERROR", "Request validation failed"),
    429: ("RATE_LIMITED", "Too many requests"),
    503: ("SERVICE_UNAVAILABLE", "Service temporarily unavailable"),
}


def error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    errors: Sequence[Problem] = (),
) -> Response:
    """Runflow's error shape: `{code, message, errors}` (contract §5)."""
    body = {
        "code": code,
        "message": message,
        "errors": [{"field": p.field, "message": p.message} for p in errors],
    }
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class Fault:
    """The answer to one upcoming request instead of the normal one."""

    status: int | None = None  # None (or 2xx): answer normally, after `delay`
    retry_after: float | None = None  # sent as `Retry-After` when set
    delay: float = 0.0
    code: str | None = None  # default: the usual code for the status (ERROR_CODES)
    message: str | None = None


class FakeRunflow:
    """The emulator. State is read by tests from their own thread while the app runs in a
    uvicorn thread: mutations replace whole values, and counters sit behind a condition."""

    def __init__(
        self,
        api_key: str = "rf_test_key",
        *,
        callback_secrets: Sequence[str] = (),
        callback_shape: CallbackShape = "bare",
        callback_delay: float = 0.05,
        callback_attempts: int = 5,
        callback_backoff: float = 0.05,
        callback_timeout: float = 5.0,
        verdict: VerdictPolicy | None = None,
        callbacks_enabled: bool = True,
        allow_http_callbacks: bool = True,
        loopback_callbacks_only: bool = True,
        user_tokens: Collection[str] = (),
    ) -> None:
        """`callback_secrets` sign callbacks in turn (rotation); none: unsigned callbacks.
        `allow_http_callbacks` accepts `http://` callback URLs on loopback (real Runflow wants
        https). `loopback_callbacks_only` never contacts another host, so a test or demo
        cannot reach the internet. `user_tokens` are Bearer tokens treated as user sessions,
        the only callers allowed to rate runs."""
        if callback_shape not in SHAPES:
            raise ValueError(f"callback_shape must be one of {', '.join(SHAPES)}")
        self.api_key = api_key
        self.callback_shape: CallbackShape = callback_shape
        self.callback_delay = callback_delay
        self.verdict = verdict
        self.allow_http_callbacks = allow_http_callbacks
        self.user_tokens = set(user_tokens)
        # True: new evaluations stay pending until it is set back to False (GET, reconciliation)
        self.paused = False
        self.evaluations: dict[str, dict[str, Any]] = {}
        self.run_feedback: dict[str, dict[str, Any]] = {}
        self.faults: deque[Fault] = deque()
        self.requests: list[dict[str, Any]] = []
        self.sender = CallbackSender(
            callback_secrets,
            attempts=callback_attempts,
            backoff=callback_backoff,
            timeout=callback_timeout,
            loopback_only=loopback_callbacks_only,
        )
        self.sender.enabled = callbacks_enabled
        self._idempotency: dict[str, tuple[bytes, str]] = {}
        self._cond = threading.Condition()
        self._busy = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/evaluations", self.create_evaluation, methods=["POST"]),
                Route("/v1/evaluations/{evaluation_id}", self.get_evaluation, methods=["GET"]),
                Route(
                    "/v1/evaluations/{evaluation_id}/feedback",
                    self.evaluation_feedback,
                    methods=["PATCH"],
                ),
                Route("/v1/runs/{run_id}/feedback", self.run_feedback_route, methods=["PATCH"]),
            ],
            lifespan=self._lifespan,
        )

    # -- steering from tests ------------------------------------------------------------------

    @property
    def callbacks_enabled(self) -> bool:
        """False: evaluations still finish, but no callback is sent ("sender gave up")."""
        return self.sender.enabled

    @callbacks_enabled.setter
    def callbacks_enabled(self, value: bool) -> None:
        self.sender.enabled = value

    @property
    def callback_secrets(self) -> list[str]:
        return self.sender.secrets

    @callback_secrets.setter
    def callback_secrets(self, secrets: Sequence[str]) -> None:
        self.sender.secrets = list(secrets)

    @property
    def callback_log(self) -> list[CallbackAttempt]:
        """Every callback attempt so far, in order."""
        return self.sender.log

    @property
    def callback_outcomes(self) -> dict[str, Outcome]:
        """Per evaluation id: delivering, delivered, abandoned, disabled or not_loopback."""
        return self.sender.outcomes

    def add(self, evaluation_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Store an evaluation (the template with `fields` over it); returns it."""
        evaluation = template()
        evaluation["id"] = evaluation_id or str(uuid.uuid4())
        evaluation["links"] = {"self": f"/v1/evaluations/{evaluation['id']}"}
        evaluation.update(fields)
        self.evaluations[evaluation["id"]] = evaluation
        return evaluation

    def fail_next(
        self,
        status: int | None = 500,
        count: int = 1,
        *,
        retry_after: float | None = None,
        delay: float = 0.0,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """The next `count` requests answer `status` (or, with None, normally after `delay`)."""
        self.faults.extend(Fault(status, retry_after, delay, code, message) for _ in range(count))

    def reset(self) -> None:
        """Forget evaluations, idempotency keys, faults, requests and the callback log."""
        self.evaluations.clear()
        self.run_feedback.clear()
        self._idempotency.clear()
        self.faults.clear()
        self.requests.clear()
        self.sender.clear()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every evaluation has finished and its callback is delivered or given up
        (TimeoutError after `timeout`; never idle while `paused`). Safe from any thread."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._busy == 0, timeout):
                raise TimeoutError(f"{self._busy} evaluation(s) still in flight after {timeout}s")

    async def settled(self, timeout: float = 10.0) -> None:
        """`wait_idle` without blocking the caller's event loop."""
        await anyio.to_thread.run_sync(self.wait_idle, timeout)

    # -- background work ----------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """On shutdown, cancel evaluations still running, so the loop closes cleanly."""
        yield
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        with self._cond:
            self._busy += 1
        task = asyncio.create_task(self._tracked(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tracked(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            log.exception("fake Runflow: background evaluation failed")
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _decide(self, request: dict[str, Any]) -> Verdict:
        policy = self.verdict or verdict_by_url
        return policy if isinstance(policy, Verdict) else policy(request)

    async def _lifecycle(self, evaluation_id: str, request: dict[str, Any]) -> None:
        """pending (while `paused`) → running → completed/failed after `callback_delay`, then
        the callback."""
        started = time.monotonic()
        await asyncio.sleep(0)
        while self.paused:
            await asyncio.sleep(PAUSE_POLL)
        current = self.evaluations.get(evaluation_id)
        if current is None:
            return
        self.evaluations[evaluation_id] = {
            **current,
            "status_code": "running",
            "updated_at": timestamp(),
        }
        await asyncio.sleep(self.callback_delay)
        current = self.evaluations.get(evaluation_id)
        if current is None:
            return
        duration_ms = int((time.monotonic() - started) * 1000)
        done = finished(current, self._decide(request), duration_ms)
        self.evaluations[evaluation_id] = done
        url = done.get("callback_url")
        if url:
            await self.sender.deliver(evaluation_id, url, callback_body(done, self.callback_shape))

    # -- HTTP ---------------------------------------------------------------------------------

    def _caller(self, request: Request) -> Literal["api_key", "user"] | None:
        given = request.headers.get("authorization", "")
        if given == f"Bearer {self.api_key}":
            return "api_key"
        token = given.removeprefix("Bearer ")
        if token != given and token in self.user_tokens:
            return "user"
        return None

    async def _gate(self, request: Request) -> tuple[Any, Response | None]:
        """Record the request, check the key, apply a queued fault, parse a JSON body.
        Returns (body, None) to go on, or (None, the answer to send instead)."""
        raw = await request.body()
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": dict(request.query_params),
                "headers": dict(request.headers),
                "body": raw,
            }
        )
        if self._caller(request) is None:
            return None, error(401, "UNAUTHORIZED", "Invalid or missing API key")
        faulted = await self._fault()
        if faulted is not None:
            return None, faulted
        if request.method == "GET":
            return None, None
        try:
            body = json.loads(raw)
        except ValueError:
            return None, error(400, "BAD_REQUEST", "Body is not valid JSON")
        if not isinstance(body, dict):
            return None, error(400, "BAD_REQUEST", "Body must be a JSON object")
        return body, None

    async def _fault(self) -> Response | None:
        try:
            fault = self.faults.popleft()
        except IndexError:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is None or fault.status < 300:
            return None
        headers = None if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
        code, message = ERROR_CODES.get(fault.status, ("INTERNAL_ERROR", "Something went wrong"))
        return error(fault.status, fault.code or code, fault.message or message, headers)

    async def create_evaluation(self, request: Request) -> Response:
        body, refused = await self._gate(request)
        if refused is not None:
            return refused
        problems = submit_problems(body, allow_http_callbacks=self.allow_http_callbacks)
        if problems:
            return error(422, "VALIDATION_ERROR", "Request validation failed", errors=problems)
        key = request.headers.get("idempotency-key")
        canonical = canonical_json(body)
        if key is not None:
            if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
                message = f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters"
                return error(400, "BAD_REQUEST", message)
            seen = self._idempotency.get(key)
            if seen is not None and seen[1] in self.evaluations:
                if seen[0] != canonical:
                    message = "Idempotency-Key was already used with a different request"
                    return error(409, "IDEMPOTENCY_CONFLICT", message)
                shown = _shown(self.evaluations[seen[1]])
                return JSONResponse(shown, 202, headers={"idempotent-replayed": "true"})
        evaluation = pending_evaluation(body, str(uuid.uuid4()))
        self.evaluations[evaluation["id"]] = evaluation
        if key is not None:
            self._idempotency[key] = (canonical, evaluation["id"])
        self._start(self._lifecycle(evaluation["id"], body))
        return JSONResponse(_shown(evaluation), 202)

    async def get_evaluation(self, request: Request) -> Response:
        _, refused = await self._gate(request)
        if refused is not None:
            return refused
        evaluation = self.evaluations.get(request.path_params["evaluation_id"])
        if evaluation is None:
            return error(404, "NOT_FOUND", "Evaluation not found")
        wanted = [e for e in request.query_params.get("embed", "").split(",") if e]
        unknown = [e for e in wanted if e not in EMBEDS]
        if unknown:
            return error(400, "VALIDATION_ERROR", f"Unknown embed: {unknown[0]}")
        return JSONResponse(_shown(evaluation, wanted))

    async def evaluation_feedback(self, request: Request) -> Response:
        body, refused = await self._gate(request)
        if refused is not None:
            return refused
        evaluation_id = request.path_params["evaluation_id"]
        evaluation = self.evaluations.get(evaluation_id)
        if evaluation is None:
            return error(404, "NOT_FOUND", "Evaluation not found")
        problems = feedback_problems(body)
        if problems:
            return error(422, "VALIDATION_ERROR", "Request validation failed", errors=problems)
        rating = body["is_positive"]
        updated = {
            **evaluation,
            "feedback_is_positive": rating,
            "feedback_reason": None if rating is None else body.get("reason"),
            "updated_at": timestamp(),
        }
        self.evaluations[evaluation_id] = updated
        return JSONResponse(_shown(updated))

    async def run_feedback_route(self, request: Request) -> Response:
        body, refused = await self._gate(request)
        if refused is not None:
            return refused
        if self._caller(request) != "user":
            return error(403, "FORBIDDEN", RUN_FEEDBACK_FORBIDDEN)
        run_id = request.path_params["run_id"]
        if not is_uuid(run_id):
            return error(404, "NOT_FOUND", "Run not found")
        problems = feedback_problems(body)
        if problems:
            return error(422, "VALIDATION_ERROR", "Request validation failed", errors=problems)
        rating = body["is_positive"]
        stored = {
            "id": run_id,
            "feedback_is_positive": rating,
            "feedback_reason": None if rating is None else body.get("reason"),
        }
        self.run_feedback[run_id] = stored
        return JSONResponse(stored)


def _shown(evaluation: dict[str, Any], embeds: Sequence[str] = ()) -> dict[str, Any]:
    """The evaluation as the API shows it: embeds only when asked for."""
    return {k: v for k, v in evaluation.items() if k not in EMBEDS or k in embeds}


VERDICTS: dict[str, VerdictPolicy] = {
    "by-url": verdict_by_url,
    "passed": PASSED,
    "not-passed": NOT_PASSED,
    "failed": FAILED,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the emulator on loopback for a demo (see `--help`)."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m receiver.fakes.runflow",
        description="A local Runflow emulator: accepts submits, sends signed callbacks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        help="callback signing secret (whsec_…); repeat for rotation; none: unsigned callbacks",
    )
    parser.add_argument("--shape", choices=SHAPES, default="bare", help="callback body shape")
    parser.add_argument("--api-key", default="rf_test_key", help="the Bearer key it accepts")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds until a verdict")
    parser.add_argument("--attempts", type=int, default=5, help="callback tries before giving up")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubling")
    parser.add_argument("--verdict", choices=sorted(VERDICTS), default="by-url")
    parser.add_argument(
        "--any-callback-host",
        action="store_true",
        help="also deliver callbacks to non-loopback hosts (default: loopback only)",
    )
    args = parser.parse_args(argv)
    fake = FakeRunflow(
        args.api_key,
        callback_secrets=args.secret,
        callback_shape=args.shape,
        callback_delay=args.delay,
        callback_attempts=args.attempts,
        callback_backoff=args.backoff,
        verdict=VERDICTS[args.verdict],
        loopback_callbacks_only=not args.any_callback_host,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    signing = f"{len(args.secret)} secret(s)" if args.secret else "UNSIGNED callbacks"
    print(
        f"fake Runflow on http://{args.host}:{args.port} ({args.shape} callbacks, {signing}, "
        f"verdict {args.verdict}, {args.attempts} attempts)",
        flush=True,
    )
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
