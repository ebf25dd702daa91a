"""POST actions of the dashboard: log in/out, feedback, retries. Each checks the session and
its CSRF token, does the work through the same code as the API and CLI, and redirects back
with a notice or the error (Runflow's own message when it refuses)."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..api import row_id
from ..auth import COOKIE, SESSION_SECONDS, flash, identify, new_session, token_ok
from ..context import context
from ..errors import BadRequest, Forbidden, NotFound, ReceiverError
from ..feedback import RATINGS, send_feedback
from ..times import now
from .safety import form, local_path

log = logging.getLogger("receiver.dashboard")
KEPT_URL_BYTES = 4000


def back(
    request: Request,
    path: str,
    *,
    notice: str | None = None,
    error: str | None = None,
    **kept: str,
) -> Response:
    message = flash(context(request).settings.dashboard_token, notice=notice, error=error, **kept)
    joiner = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{joiner}{urlencode(message)}", status_code=303)


async def checked_form(request: Request) -> dict[str, str]:
    """The form of a logged-in browser whose CSRF token matches its session."""
    token = context(request).settings.dashboard_token
    identity = identify(request, token)
    if identity is None:
        raise Forbidden("log in first")
    fields = await form(request)
    if not identity.csrf_ok(token, fields.get("csrf")):
        raise Forbidden("the form's CSRF token does not match your session; reload the page")
    return fields


async def login(request: Request) -> Response:
    ctx = context(request)
    fields = await form(request)
    target = local_path(fields.get("next"))
    given = fields.get("token", "")
    if not token_ok(given, ctx.settings.dashboard_token):
        log.warning("dashboard login refused")
        return back(
            request, "/login?" + urlencode({"next": target}), error="That token is not right."
        )
    response = RedirectResponse(target, status_code=303)
    secure = request.url.scheme == "https" or (ctx.settings.public_url or "").startswith("https:")
    response.set_cookie(
        COOKIE,
        new_session(ctx.settings.dashboard_token),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    await checked_form(request)
    response = back(request, "/login", notice="Logged out.")
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def feedback(request: Request) -> Response:
    ctx = context(request)
    fields = await checked_form(request)
    evaluation_id = request.path_params["evaluation_id"]
    page = f"/evaluations/{quote(evaluation_id, safe='')}"
    rating = fields.get("rating", "")
    if rating not in RATINGS:
        return back(request, page, error="Choose 👍, 👎 or clear.")
    reason = fields.get("reason") or None
    try:
        await send_feedback(
            ctx.settings, ctx.store, ctx.http, evaluation_id, RATINGS[rating], reason
        )
    except NotFound:
        raise
    except ReceiverError as exc:  # a bad reason, no API key, or Runflow's own refusal
        # The reason back in the form, when the URL stays short enough for any proxy (8 KiB).
        kept = reason if reason and len(urlencode({"reason": reason})) <= KEPT_URL_BYTES else ""
        return back(request, page, error=f"Feedback not saved: {exc}", reason=kept)
    return back(
        request,
        page,
        notice={
            "up": "Thanks: 👍 sent to Runflow.",
            "down": "Thanks: 👎 sent to Runflow.",
            "clear": "Rating cleared in Runflow.",
        }[rating],
    )


async def retry(request: Request) -> Response:
    ctx = context(request)
    fields = await checked_form(request)
    target = local_path(fields.get("next"), "/forwards?state=dead")
    try:
        forward_id = row_id(request, "forward_id", "forward")
        await ctx.store.retry_forward(forward_id, now())
    except (BadRequest, NotFound) as exc:
        return back(request, target, error=str(exc))
    ctx.notify()
    return back(request, target, notice=f"Forward {forward_id} will be sent again.")


async def retry_dead(request: Request) -> Response:
    ctx = context(request)
    fields = await checked_form(request)
    sink = fields.get("sink") or None
    page = "/forwards?" + urlencode({"state": "dead", **({"sink": sink} if sink else {})})
    try:
        count = await ctx.store.retry_dead(now(), sink)
    except BadRequest as exc:  # a sink no longer configured
        return back(request, page, error=str(exc))
    ctx.notify()
    return back(request, page, notice=f"{count} dead forward(s) will be sent again.")
