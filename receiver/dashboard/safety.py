"""Small guards for the dashboard: where a redirect may go, how a form body is read."""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request

from ..errors import BadRequest, PayloadTooLarge
from ..web import read_body

MAX_FORM_BYTES = 32 * 1024  # a 2,000-character reason in any script, URL-encoded


def local_path(target: str | None, default: str = "/") -> str:
    """Only same-site paths: never `//host`, a scheme, or a backslash trick (open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


async def form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind our pages send), bounded in size."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise BadRequest("expected a form (application/x-www-form-urlencoded)")
    try:
        body = await read_body(request, MAX_FORM_BYTES)
    except PayloadTooLarge:
        raise BadRequest("form is too large") from None
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("form is not valid UTF-8 urlencoded data") from None
