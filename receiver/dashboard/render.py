"""Rendering for the dashboard: the templates, the values every page gets, and error pages."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from ..auth import csrf_token
from ..context import context
from ..errors import ReceiverError

HERE = Path(__file__).parent
Endpoint = Callable[[Request], Awaitable[Response]]


@functools.cache
def templates() -> Jinja2Templates:
    return Jinja2Templates(directory=HERE / "templates")


def render(request: Request, name: str, status: int = 200, **values: Any) -> Response:
    """`csrf` is the session's token for forms ("" under bearer auth, None when logged out)."""
    if "csrf" not in values:
        sid = getattr(request.state, "sid", None)
        values["csrf"] = csrf_token(context(request).settings.dashboard_token, sid) if sid else ""
    values.setdefault("error", request.query_params.get("error"))
    values.setdefault("notice", request.query_params.get("notice"))
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
