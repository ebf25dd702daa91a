"""The Runflow API client. Only the configured origin is ever contacted, ids must be UUIDs
before they enter a URL, redirects are not followed, and errors are mapped per
runflow-contract.md §5 (5xx and 429 retryable; other 4xx not).

`get_evaluation` makes one attempt (the worker keeps its own retry schedule in the store);
`submit` and the feedback calls retry 429/5xx/timeouts in-process, at most `max_tries` times
with full-jitter backoff, never sooner than a `Retry-After` says. The API key is only ever put
in the Authorization header: it is not logged and not part of any message or repr.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from .config import Settings
from .errors import BadRequest, NotConfigured, ReceiverError
from .normalize import parse_body
from .retry import backoff, parse_retry_after
from .runflow_requests import (
    SubmitRequest,
    check_idempotency_key,
    derive_idempotency_key,
    is_loopback_host,
    validate_feedback,
)

log = logging.getLogger(__name__)
Sleep = Callable[[float], Awaitable[None]]
MAX_TRIES = 5  # Runflow suggests at most 5 tries (contract §5)


class RunflowError(ReceiverError):
    """Runflow refused or could not be reached. `retryable` says whether trying later helps."""

    status = 502

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        errors: Sequence[Any] = (),
        runflow_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.errors = list(errors)  # Runflow's per-field `errors`, when it sent any
        self.runflow_message = runflow_message  # Runflow's own `message`, when it sent one


def evaluation_path(evaluation_id: str) -> str:
    try:
        canonical = uuid.UUID(evaluation_id)
    except (ValueError, AttributeError, TypeError):
        raise RunflowError(f"evaluation id {evaluation_id!r} is not a UUID; not fetched") from None
    return f"/v1/evaluations/{canonical}"


def _checked_uuid(value: str, name: str) -> uuid.UUID:
    """A caller-given id, canonical, before it goes into a URL; BadRequest otherwise."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise BadRequest(f"{name} must be a UUID, got {value!r}") from None


class RunflowClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base: str,
        api_key: str,
        org_id: str | None = None,
        sleep: Sleep = asyncio.sleep,
        max_tries: int = MAX_TRIES,
        retry_base: float = 1.0,
        retry_max: float = 60.0,
        allow_http_callbacks: bool = False,
    ) -> None:
        """`sleep` is what waits between tries (tests pass a recorder). A `Retry-After`
        longer than `retry_max` is not waited out: the error is raised with `retry_after`
        set. `allow_http_callbacks` lets `callback_url` be plain http on a loopback host
        (a local receiver behind the fake Runflow); real Runflow requires https."""
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        self._http = http
        self._base = base.rstrip("/")
        self._headers = {"authorization": f"Bearer {api_key}", "accept": "application/json"}
        if org_id:
            self._headers["x-organization-id"] = org_id
        self._sleep = sleep
        self._max_tries = max_tries
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._allow_http_callbacks = allow_http_callbacks

    def __repr__(self) -> str:
        return f"RunflowClient(base={self._base!r})"

    async def _request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        url = self._base + path
        sent = {**self._headers, **(headers or {})}
        try:
            response = await self._http.request(
                method, url, headers=sent, follow_redirects=False, **kwargs
            )
        except httpx.TimeoutException:
            raise RunflowError(f"Runflow {method} {path} timed out", retryable=True) from None
        except httpx.ConnectError as exc:  # the setting to check, and why (refused, no such name)
            raise RunflowError(
                f"Runflow {method} {path} failed: cannot connect to {self._base} "
                f"(RUNFLOW_API_BASE): {exc or type(exc).__name__}",
                retryable=True,
            ) from None
        except httpx.HTTPError as exc:
            raise RunflowError(
                f"Runflow {method} {path} failed: {type(exc).__name__}", retryable=True
            ) from None
        if response.is_success:
            try:  # as strict as a callback: what Runflow answers is stored the same way
                return parse_body(response.content)
            except BadRequest as exc:
                raise RunflowError(
                    f"Runflow {method} {path} answered {response.status_code}: {exc}",
                    retryable=True,
                ) from None
        raise _error(method, path, response)

    async def get_evaluation(
        self, evaluation_id: str, embeds: Sequence[str] = ()
    ) -> dict[str, Any]:
        params = {"embed": ",".join(embeds)} if embeds else None
        found = await self._request("GET", evaluation_path(evaluation_id), params=params)
        if found.get("id") != evaluation_id:
            raise RunflowError("Runflow answered with a different or malformed evaluation")
        return found

    async def _retrying(self, method: str, path: str, **kwargs: Any) -> Any:
        """`_request`, tried again after retryable failures (safe: every call that uses this
        is idempotent, submit through its Idempotency-Key)."""
        for attempt in range(1, self._max_tries + 1):
            try:
                return await self._request(method, path, **kwargs)
            except RunflowError as exc:
                if not exc.retryable:
                    raise
                if attempt == self._max_tries:
                    raise _with_note(exc, f"gave up after {attempt} tries") from None
                if exc.retry_after is not None and exc.retry_after > self._retry_max:
                    raise _with_note(exc, f"Retry-After {exc.retry_after:g}s") from None
                delay = backoff(attempt, self._retry_base, self._retry_max, exc.retry_after)
                log.info("%s; try %d of %d in %.2fs", exc, attempt + 1, self._max_tries, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit(
        self, request: SubmitRequest | Mapping[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit an image for evaluation; returns the pending evaluation (202).

        Always sends an `Idempotency-Key`: `idempotency_key` when given, else one derived
        from the request body, so the same request submitted twice is one evaluation.
        """
        if not isinstance(request, SubmitRequest):
            request = SubmitRequest.from_dict(request)
        body = request.validated_json(allow_http_callbacks=self._allow_http_callbacks)
        key = (
            derive_idempotency_key(body)
            if idempotency_key is None
            else check_idempotency_key(idempotency_key)
        )
        found = await self._retrying(
            "POST", "/v1/evaluations", json=body, headers={"idempotency-key": key}
        )
        return _evaluation(found, "POST /v1/evaluations")

    async def evaluation_feedback(
        self, evaluation_id: str, is_positive: bool | None, reason: str | None = None
    ) -> dict[str, Any]:
        """Rate an evaluation (True up, False down, None clears); returns the evaluation."""
        path = f"/v1/evaluations/{_checked_uuid(evaluation_id, 'evaluation id')}/feedback"
        body = validate_feedback(is_positive, reason)
        return _evaluation(await self._retrying("PATCH", path, json=body), f"PATCH {path}")


def _evaluation(found: Any, what: str) -> dict[str, Any]:
    if not isinstance(found, dict) or not isinstance(found.get("id"), str):
        raise RunflowError(f"Runflow {what} answered with something that is not an evaluation")
    return found


def _with_note(exc: RunflowError, note: str) -> RunflowError:
    return RunflowError(
        f"{exc}; {note}",
        http_status=exc.http_status,
        code=exc.code,
        retryable=exc.retryable,
        retry_after=exc.retry_after,
        errors=exc.errors,
        runflow_message=exc.runflow_message,
    )


def _field_error(error: dict[str, Any]) -> str:
    """`field: message`, without saying the field twice when the message already names it."""
    field, message = str(error["field"]), str(error.get("message") or "is invalid")
    return message if message.startswith(field) else f"{field}: {message}"


def _detail(*parts: object) -> str:
    return ": ".join(str(part) for part in parts if part)


def _error(method: str, path: str, response: httpx.Response) -> RunflowError:
    code = message = None
    errors: list[Any] = []
    try:
        body = response.json()
        if isinstance(body, dict):
            code, message = body.get("code"), body.get("message")
            if isinstance(body.get("errors"), list):
                errors = body["errors"]
    except ValueError:
        pass
    status = response.status_code
    detail = _detail(code, message) or response.reason_phrase
    fields = [_field_error(e) for e in errors if isinstance(e, dict) and e.get("field")]
    if fields:
        detail += "; " + "; ".join(fields)
    return RunflowError(
        f"Runflow {method} {path} answered {status} ({detail})",
        http_status=status,
        code=code if isinstance(code, str) else None,
        retryable=status == 429 or status >= 500,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        errors=errors,
        runflow_message=message if isinstance(message, str) else None,
    )


def client_for(settings: Settings, http: httpx.AsyncClient) -> RunflowClient:
    """The client the settings describe. Plain-http callback URLs are allowed only when
    RECEIVER_PUBLIC_URL is on a loopback host (a local receiver behind the emulator)."""
    if not settings.runflow_api_key:
        raise NotConfigured("RUNFLOW_API_KEY is not set: this needs a Runflow API key")
    host = urlsplit(settings.public_url or "").hostname
    return RunflowClient(
        http,
        base=settings.runflow_api_base,
        api_key=settings.runflow_api_key,
        org_id=settings.runflow_org_id,
        retry_base=settings.retry_base,
        retry_max=min(settings.retry_max, 60.0),
        allow_http_callbacks=bool(host) and is_loopback_host(host or ""),
    )
