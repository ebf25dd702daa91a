"""What an HTTP destination's answer means for a delivery: done, retry (maybe after a wait the
destination asked for), or dead at once. Shared by the Slack, Discord and http sinks.

Chat webhook URLs are credentials, so no error message carries the URL or any long piece of
it: errors name the sink and the HTTP status.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..sinkspec import SinkSpec
from .base import OneByOne, SinkError

DEFAULT_TIMEOUT = 10.0
RETRYABLE = frozenset({408, 425, 429})
_EXCERPT = 200
_SECRET_PART = 8  # path segments and query values at least this long are redacted


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from `now`: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
    A date already past means "now" (0); anything unreadable means no wish (None)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def redact(text: str, url: str) -> str:
    """`text` without the URL or any of its longer path segments or query values, which is
    where chat webhooks keep their tokens (a server may echo them in an error body)."""
    parsed = httpx.URL(url)
    secrets = [url, parsed.path, parsed.query.decode(), parsed.userinfo.decode()]
    secrets += parsed.path.split("/") + [value for _, value in parsed.params.multi_items()]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _SECRET_PART:
            text = text.replace(secret, "[redacted]")
    return text


def _reason(response: httpx.Response, url: str) -> str:
    """A short, single-line, redacted excerpt of the error body (Slack: `no_service`,
    Discord: its JSON `message`)."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    line = " ".join(text.split())[:_EXCERPT]
    return redact(line, url)


def response_error(
    spec: SinkSpec,
    response: httpx.Response,
    *,
    retry_after: float | None = None,
    now: datetime | None = None,
) -> SinkError | None:
    """None for 2xx; else a SinkError: 408/425/429/5xx retryable (with the destination's
    `Retry-After`, unless the caller read a better `retry_after`), any other status dead."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    reason = _reason(response, spec.url)
    message = f"sink {spec.name!r}: HTTP {status}" + (f": {reason}" if reason else "")
    if status in RETRYABLE or status >= 500:
        wait = retry_after
        if wait is None:
            wait = parse_retry_after(response.headers.get("retry-after"), now)
        return SinkError(message, retry_after=wait, limited=status == 429)
    if 300 <= status < 400:
        message += " (redirects are not followed)"
    return SinkError(message, permanent=True)


def request_error(spec: SinkSpec, exc: Exception) -> SinkError:
    """Connection failures and timeouts are worth retrying; a malformed URL never is."""
    detail = redact(str(exc), spec.url)[:_EXCERPT]
    message = f"sink {spec.name!r}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    permanent = isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol)
    return SinkError(message, permanent=permanent)


def json_body(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode()


class WebSink(OneByOne):
    """One POST per event through the app's shared client; subclasses build the body."""

    def __init__(self, spec: SinkSpec, http: httpx.AsyncClient) -> None:
        super().__init__(spec)
        self.http = http
        self.timeout = DEFAULT_TIMEOUT
        self.url = spec.url  # where to post (a subclass may adjust the configured URL)

    async def post(self, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """The answer, whatever its status; transport failures become a SinkError (raised
        `from None`, so no traceback carries the URL)."""
        try:
            return await self.http.post(
                self.url,
                content=body,
                headers={"user-agent": "runflow-receiver", **headers},
                timeout=self.timeout,
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise request_error(self.spec, exc) from None
