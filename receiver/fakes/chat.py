"""Fake Slack incoming webhook and fake Discord webhook, faithful to what the sinks rely on:
paths, status codes, error bodies, rate-limit answers, and the message limits (a message the
real service would refuse is refused here too)."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..messages import (
    DISCORD_DESCRIPTION,
    DISCORD_FIELD,
    DISCORD_FIELDS,
    DISCORD_TITLE,
    DISCORD_TOTAL,
    SLACK_BLOCKS,
    SLACK_FIELD,
    SLACK_HEADER,
    SLACK_TEXT,
    embed_size,
)
from .common import FakeEndpoint, retry_after_header

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
# Discord's API version when the URL names none (webhook URLs as Discord shows them), and the
# first version whose rate-limit answers are in seconds rather than milliseconds.
DEFAULT_VERSION = 6
SECONDS_FROM = 8
_VERSION = re.compile(r"v[0-9]{1,2}")


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _text_of(value: Any) -> str:
    return value.get("text", "") if isinstance(value, dict) else ""


def slack_block_problem(block: Any) -> str | None:
    """Why Slack would refuse this block (`invalid_blocks`), for the limits the sink relies on."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return "a block must be an object with a type"
    kind = block["type"]
    if kind == "header" and not 0 < len(_text_of(block.get("text"))) <= SLACK_HEADER:
        return f"header text must be 1 to {SLACK_HEADER} characters"
    if kind == "section":
        fields = block.get("fields") or []
        if not block.get("text") and not fields:
            return "a section needs text or fields"
        if len(_text_of(block.get("text"))) > SLACK_TEXT:
            return f"section text must be at most {SLACK_TEXT} characters"
        if len(fields) > 10 or any(len(_text_of(f)) > SLACK_FIELD for f in fields):
            return f"at most 10 fields of at most {SLACK_FIELD} characters"
    if kind == "image" and not (block.get("image_url") and block.get("alt_text")):
        return "an image needs image_url and alt_text"
    return None


class FakeSlack(FakeEndpoint):
    """POST {path}: `ok` for a JSON object with `text` or `blocks`; 400 `invalid_payload`
    (not a JSON object), `no_text` (neither) or `invalid_blocks` otherwise; 404 `no_service`
    for any other path. `reject_images = True` refuses messages with an image block, as
    Slack does when it cannot fetch the image."""

    def __init__(self, path: str = "/services/T0FAKE000/B0FAKE000/fakeSlackWebhookToken42") -> None:
        super().__init__()
        self.path = path
        self.reject_images = False
        self.app = Starlette(routes=[Route("/{rest:path}", self._handle, methods=_METHODS)])

    def url(self, base: str) -> str:
        """The webhook URL on a server at `base` (from `serve_in_thread`)."""
        return base + self.path

    async def _handle(self, request: Request) -> Response:
        if request.url.path != self.path or request.method != "POST":
            return PlainTextResponse("no_service", 404)
        fault = await self._take_fault()
        if fault is not None and fault.status >= 300:
            default = "rate_limited" if fault.status == 429 else "internal_error"
            headers = retry_after_header(fault)
            return PlainTextResponse(fault.body or default, fault.status, headers=headers)
        body = await request.body()
        message = _object(body)
        if message is None:
            return PlainTextResponse("invalid_payload", 400)
        text, blocks = message.get("text"), message.get("blocks")
        if not (isinstance(text, str) and text) and not (isinstance(blocks, list) and blocks):
            return PlainTextResponse("no_text", 400)
        if blocks is not None:
            if not isinstance(blocks, list) or len(blocks) > SLACK_BLOCKS:
                return PlainTextResponse("invalid_blocks", 400)
            if any(slack_block_problem(block) for block in blocks):
                return PlainTextResponse("invalid_blocks", 400)
            if self.reject_images and any(b.get("type") == "image" for b in blocks):
                return PlainTextResponse("invalid_blocks", 400)
        self._record(request, body)
        return PlainTextResponse("ok")


def embed_problem(embed: Any) -> str | None:
    """Why Discord would answer 50035 Invalid Form Body for this embed, if it would."""
    if not isinstance(embed, dict):
        return "an embed must be an object"
    fields = embed.get("fields", [])
    if len(embed.get("title", "")) > DISCORD_TITLE:
        return f"title: at most {DISCORD_TITLE}"
    if len(embed.get("description", "")) > DISCORD_DESCRIPTION:
        return f"description: at most {DISCORD_DESCRIPTION}"
    if not isinstance(fields, list) or len(fields) > DISCORD_FIELDS:
        return f"fields: at most {DISCORD_FIELDS}"
    for item in fields:
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, str) or not 0 < len(value) <= DISCORD_FIELD:
            return f"fields.value: 1 to {DISCORD_FIELD}"
        if not isinstance(item.get("name"), str) or not 0 < len(item["name"]) <= 256:
            return "fields.name: 1 to 256"
    if embed_size(embed) > DISCORD_TOTAL:
        return f"embeds: at most {DISCORD_TOTAL} characters in all"
    return None


class FakeDiscord(FakeEndpoint):
    """POST /api/v{N}/webhooks/{id}/{token}, or /api/webhooks/{id}/{token} as Discord shows
    the URL (no version: the default, v6): 204, or 200 with the created message when
    `?wait=true`; 429 with Discord's JSON body and `Retry-After` header, in seconds from v8 on
    (`retry_after` a float, the header rounded up to whole seconds) but in milliseconds before
    (discord-api-docs #2360, #4722); 400 code 50006 (empty) or 50035 (limits); 404/401 for an
    unknown webhook id or a wrong token. With `bucket = (requests, seconds)`, every answer
    tells the bucket's state in `X-RateLimit-*` headers, and a request past it gets a 429."""

    def __init__(
        self,
        webhook_id: str = "112233445566778899",
        token: str = "fakeDiscordToken42",  # noqa: S107 (a fake)
    ) -> None:
        super().__init__()
        self.webhook_id = webhook_id
        self.token = token
        self.path = f"/api/webhooks/{webhook_id}/{token}"
        self._ids = itertools.count(1300000000000000000)
        # (requests, seconds): the webhook's rate limit, told in X-RateLimit-* headers and
        # enforced with a 429 once used up (None: no limit, only the faults tests queue).
        self.bucket: tuple[int, float] | None = None
        self._window = (0.0, 0)  # (when the bucket was last refilled, requests since)
        self.app = Starlette(routes=[Route("/{rest:path}", self._handle, methods=_METHODS)])

    def url(self, base: str) -> str:
        return base + self.path

    def reset(self) -> None:
        super().reset()
        with self._cond:
            self.bucket = None
            self._window = (0.0, 0)

    def _spend(self) -> dict[str, str] | None:
        """Take one request from the bucket: its X-RateLimit-* headers, or None when it
        was empty (or there is no bucket, then the headers are {})."""
        with self._cond:
            if self.bucket is None:
                return {}
            size, seconds = self.bucket
            now = time.monotonic()
            start, used = self._window
            if now - start >= seconds:
                start, used = now, 0
            if used >= size:
                return None
            self._window = (start, used + 1)
        reset_after = start + seconds - now
        return {
            "x-ratelimit-limit": str(size),
            "x-ratelimit-remaining": str(size - used - 1),
            "x-ratelimit-reset": f"{time.time() + reset_after:.3f}",
            "x-ratelimit-reset-after": f"{reset_after:.3f}",
            "x-ratelimit-bucket": "fakebucket0000000000000000000000",
        }

    def _refill_in(self) -> float:
        with self._cond:
            seconds = self.bucket[1] if self.bucket else 0.0
            return max(0.001, self._window[0] + seconds - time.monotonic())

    @staticmethod
    def _limited(wait: float, version: int, header: bool) -> Response:
        """Discord's 429: seconds from v8 on, milliseconds before."""
        seconds = version >= SECONDS_FROM
        limited = {
            "message": "You are being rate limited.",
            "retry_after": wait if seconds else math.ceil(wait * 1000),
            "global": False,
        }
        headers = {}
        if header:
            whole = str(max(1, math.ceil(wait))) if seconds else str(math.ceil(wait * 1000))
            headers = {"retry-after": whole, "x-ratelimit-scope": "user"}
        return JSONResponse(limited, 429, headers=headers)

    async def _handle(self, request: Request) -> Response:
        parts = request.url.path.strip("/").split("/")
        version = DEFAULT_VERSION
        if len(parts) > 1 and _VERSION.fullmatch(parts[1]):
            version = int(parts.pop(1)[1:])
        if parts[:2] != ["api", "webhooks"] or len(parts) != 4 or parts[2] != self.webhook_id:
            return JSONResponse({"message": "Unknown Webhook", "code": 10015}, 404)
        if parts[3] != self.token:
            return JSONResponse({"message": "Invalid Webhook Token", "code": 50027}, 401)
        if request.method != "POST":
            return JSONResponse({"message": "405: Method Not Allowed", "code": 0}, 405)
        fault = await self._take_fault()
        if fault is not None and fault.status == 429:
            wait = fault.retry_after if fault.retry_after is not None else 1.0
            return self._limited(wait, version, fault.header and fault.retry_after is not None)
        if fault is not None and fault.status >= 300:
            message = fault.body or f"{fault.status}: fault injected by the test"
            return JSONResponse({"message": message, "code": 0}, fault.status)
        bucket = self._spend()
        if bucket is None:
            return self._limited(self._refill_in(), version, header=True)
        body = await request.body()
        payload = _object(body)
        if payload is None:
            return JSONResponse({"message": "Cannot send an empty message", "code": 50006}, 400)
        embeds = payload.get("embeds") or []
        if not payload.get("content") and not embeds:
            return JSONResponse({"message": "Cannot send an empty message", "code": 50006}, 400)
        problems = (
            [p for p in map(embed_problem, embeds) if p] if isinstance(embeds, list) else ["embeds"]
        )
        if len(embeds) > 10 or problems or len(payload.get("content") or "") > 2000:
            invalid = {"message": "Invalid Form Body", "code": 50035, "errors": problems}
            return JSONResponse(invalid, 400)
        self._record(request, body)
        if request.query_params.get("wait", "").lower() not in ("true", "1"):
            return Response(status_code=204, headers=bucket)
        return JSONResponse(
            {
                "id": str(next(self._ids)),
                "type": 0,
                "content": payload.get("content") or "",
                "embeds": embeds,
                "mentions": [],
                "channel_id": "998877665544332211",
                "webhook_id": self.webhook_id,
                "timestamp": datetime.now(UTC).isoformat(),
            },
            headers=bucket,
        )
