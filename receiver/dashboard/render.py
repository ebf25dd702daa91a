"""Rendering for the dashboard: the templates, the values every page gets, and error pages."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from ..auth import KEPT, csrf_token, flashed
from ..context import context
from ..errors import ReceiverError

HERE = Path(__file__).parent
Endpoint = Callable[[Request], Awaitable[Response]]


@functools.cache
def templates() -> Jinja2Templates:
    found = Jinja2Templates(directory=HERE / "templates")
    found.env.filters["segment"] = segment
    found.env.filters["decimals"] = decimals
    found.env.globals["client_ref_url"] = client_ref_url
    return found


def decimals(value: float, places: int = 2) -> str:
    """A number from a payload with `places` decimals; one no float holds (a 400-digit
    integer) as it came: `%.2f` of it raised, and the whole page was a 500."""
    try:
        return f"{float(value):.{places}f}"
    except OverflowError:
        return str(value)


def segment(value: str) -> str:
    """`value` as one path segment. Jinja's urlencode keeps `/`, so a client_ref `x/../y`
    would link to the page of `y`."""
    return quote(value, safe="")


def client_ref_url(client_ref: str) -> str:
    """Its page; for `.` and `..`, which a browser resolves as dot segments even encoded, its
    evaluations."""
    if client_ref in (".", ".."):
        return "/evaluations?" + urlencode({"client_ref": client_ref})
    return "/client-refs/" + segment(client_ref)


def render(request: Request, name: str, status: int = 200, **values: Any) -> Response:
    """`csrf` is the session's token for forms ("" under bearer auth, None when logged out)."""
    token = context(request).settings.dashboard_token
    if "csrf" not in values:
        sid = getattr(request.state, "sid", None)
        values["csrf"] = csrf_token(token, sid) if sid else ""
    shown = {kind: flashed(token, request.query_params, kind) for kind in ("error", "notice")}
    for kind, text in shown.items():
        values.setdefault(kind, text)
    signed = any(shown.values())  # then the fields it carried back are ours too
    values.setdefault(
        "kept", {key: request.query_params.get(key) for key in KEPT} if signed else {}
    )
    return templates().TemplateResponse(request, name, values, status_code=status)


def html_errors(endpoint: Endpoint) -> Endpoint:
    """Our errors as a page a person can read, with the same status the API would give."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ReceiverError as exc:
            return render(
                request, "error.html", status=exc.status, error=str(exc), status_code=exc.status
            )

    return wrapped
