"""Discord webhooks: one embed per verdict, nothing pings (design.md §6)."""

from __future__ import annotations

import json
import math
import re

import httpx

from ..messages import discord_message
from ..sinkspec import SinkSpec
from .base import Event
from .web import WebSink, json_body, response_error

_JSON = {"content-type": "application/json"}
API_VERSION = 10
_WEBHOOK_PATH = re.compile(r"/api/(?:v[0-9]+/)?webhooks/")


def versioned(url: str) -> str:
    """`url` on API_VERSION. A webhook URL as Discord shows it names no version, so it gets
    the default one (v6), whose 429 answers are in milliseconds, not the documented seconds."""
    parsed = httpx.URL(url)
    found = _WEBHOOK_PATH.match(parsed.path)
    if found is None:  # not Discord's own path (a relay): posted to as configured
        return url
    path = f"/api/v{API_VERSION}/webhooks/" + parsed.path[found.end() :]
    return str(parsed.copy_with(path=path))


def body_retry_after(response: httpx.Response) -> float | None:
    """Discord's 429 body says `retry_after` in (fractional) seconds, more precisely than
    its `Retry-After` header, which is rounded up to whole seconds."""
    if response.status_code != 429:
        return None
    try:
        body = json.loads(response.text)
    except ValueError:
        return None
    value = body.get("retry_after") if isinstance(body, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def bucket_empty_for(response: httpx.Response) -> float | None:
    """Seconds until the webhook's rate-limit bucket refills when this answer used it up
    (`X-RateLimit-Remaining: 0`, `X-RateLimit-Reset-After`): the next request would get a
    429. Discord asks clients to wait for it rather than run into the limit."""
    if response.headers.get("x-ratelimit-remaining", "").strip() != "0":
        return None
    try:
        seconds = float(response.headers.get("x-ratelimit-reset-after", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


class DiscordSink(WebSink):
    # A webhook takes a handful of messages per couple of seconds: post one at a time.
    concurrency = 1

    def __init__(self, spec: SinkSpec, http: httpx.AsyncClient) -> None:
        super().__init__(spec, http)
        # wait=true: Discord answers only once the message exists, with a real status. Merged
        # into the configured query, which may name a thread (`thread_id`).
        self.url = str(httpx.URL(versioned(spec.url)).copy_merge_params({"wait": "true"}))

    async def send(self, event: Event) -> None:
        response = await self.post(json_body(discord_message(event)), _JSON)
        error = response_error(self.spec, response, retry_after=body_retry_after(response))
        if error is not None:
            raise error
        refill = bucket_empty_for(response)
        if refill is not None:
            self.hold(refill)
