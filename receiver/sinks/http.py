"""Plain webhooks: the CloudEvent JSON, signed the Standard Webhooks way (design.md §6)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from ..errors import ConfigError
from ..events import CONTENT_TYPE
from ..sinkspec import SinkSpec, parse_seconds
from ..webhook_signing import parse_private_key, parse_secret, webhook_headers
from .base import Event
from .web import WebSink, json_body, response_error

T = TypeVar("T")


def _option(spec: SinkSpec, key: str, parse: Callable[[object], T]) -> T | None:
    """The parsed option, or None when unset; a bad value is a ConfigError naming the sink
    and the key, never quoting the value (it is a secret)."""
    value = spec.options.get(key)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"sink {spec.name!r}: {key} {exc}") from None


class HttpSink(WebSink):
    """Keys are checked here, at startup, so a typo fails `receiver serve` at once instead of
    every delivery later."""

    def __init__(self, spec: SinkSpec, http: httpx.AsyncClient) -> None:
        super().__init__(spec, http)
        self.secret = _option(spec, "secret", parse_secret)
        self.private_key = _option(spec, "private_key", parse_private_key)
        timeout = _option(spec, "timeout", parse_seconds)
        if timeout is not None:
            self.timeout = timeout
        self.clock: Callable[[], float] = time.time

    def request(self, event: Event) -> tuple[bytes, dict[str, str]]:
        """Body and headers for `event`; the webhook id is the event id, stable across
        retries, so consumers can dedupe on it."""
        body = json_body(event)
        headers = webhook_headers(
            str(event["id"]),
            int(self.clock()),
            body,
            secret=self.secret,
            private_key=self.private_key,
        )
        return body, {**headers, "content-type": CONTENT_TYPE}

    async def send(self, event: Event) -> None:
        body, headers = self.request(event)
        error = response_error(self.spec, await self.post(body, headers))
        if error is not None:
            raise error
