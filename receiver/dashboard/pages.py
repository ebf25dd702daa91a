"""GET pages. Reads are sync and run on the thread pool; a bad filter renders the page with
the reason instead of failing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .. import charts
from ..api import CHANGES, FILTERS, MAX_ROW_ID, evaluation_filter
from ..auth import identify
from ..context import context
from ..errors import BadRequest, NotFound
from ..normalize import STATUSES
from ..store import EvaluationFilter
from ..store.outbox import STATES
from ..times import now
from ..web import whole
from .render import Endpoint, html_errors, render, templates
from .safety import local_path

PAGE = 50


def protected(page: Callable[[Request], Response]) -> Endpoint:
    """Logged in (cookie or bearer), or off to /login and back here afterwards."""

    async def endpoint(request: Request) -> Response:
        identity = identify(request, context(request).settings.dashboard_token)
        if identity is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        request.state.sid = identity.sid
        request.state.bearer = identity.bearer
        return await run_in_threadpool(page, request)

    return html_errors(endpoint)


def login(request: Request) -> Response:
    return render(
        request, "login.html", next=local_path(request.query_params.get("next")), csrf=None
    )


def overview(request: Request) -> Response:
    ctx = context(request)
    store = ctx.store
    stats = store.stats(EvaluationFilter())
    # Every configured sink, also before its first forward (as /metrics shows them).
    depth: dict[str, dict[str, int]] = {spec.name: {} for spec in ctx.settings.sinks}
    depth |= store.outbox_depth()
    days = list(reversed(stats["per_day"][:30]))
    shown_at = now()  # after stats caught up, before the read: the live table's changes since
    recent, more = store.list_evaluations(EvaluationFilter(), 10)
    return render(
        request,
        "overview.html",
        nav="overview",
        stats=stats,
        recent=recent,
        live={"url": "/partials/rows?limit=10", "since": shown_at, "complete": more is None},
        sinks=sorted(depth.items()),
        dead=sum(states.get("dead", 0) for states in depth.values()),
        charts={
            "verdicts": charts.daily_verdicts(days),
            "rates": charts.daily_rates(days),
            "failures": charts.ranked(
                [(r["failure_code"], r["count"]) for r in stats["failure_codes"][:8]],
                "failures by failure_code",
            ),
            "categories": charts.ranked(
                [
                    (f"{r['category']}/{r['subcategory']}", r["count"])
                    for r in stats["top_issue_categories"][:8]
                ],
                "top issue categories",
                # Top issue labels come in every verdict; categories only with its judges.
                "no judges' issues yet: they come with a refetch or a full callback",
            ),
        },
    )


def evaluations(request: Request) -> Response:
    params = {k: v for k, v in request.query_params.items() if v != ""}
    chosen = {k: v for k, v in params.items() if k in FILTERS}
    cursor = params.get("cursor")
    sort = params.get("sort", "newest")
    values: dict[str, Any] = {
        "nav": "evaluations",
        "params": params,
        "statuses": STATUSES,
        "sort": sort,
        "items": [],
        "next_url": None,
        "first_page_url": None,
        "live": None,
        # "yet" would say the store is empty when the filters leave nothing; after a refused
        # filter there was no search to report on.
        "empty": "No evaluations match these filters." if chosen else "No evaluations yet.",
    }
    # Once what was acknowledged is applied (the read would apply it after this stamp) and
    # before the read: the live table asks for the changes since.
    context(request).store.catch_up()
    shown_at = now()
    try:
        where = evaluation_filter(chosen)
        if sort not in ("newest", "oldest"):
            raise BadRequest(f"sort must be newest or oldest, got {sort!r}")
        items, next_cursor = context(request).store.list_evaluations(
            where, PAGE, cursor, newest_first=sort == "newest"
        )
    except BadRequest as exc:
        refused = {**values, "error": str(exc), "empty": None}
        return render(request, "evaluations.html", status=400, **refused)
    keep = {**chosen, "sort": sort} if sort != "newest" else chosen
    values["items"] = items
    if next_cursor:
        values["next_url"] = "/evaluations?" + urlencode({**keep, "cursor": next_cursor})
    if cursor:
        values["first_page_url"] = "/evaluations?" + urlencode(keep)
    elif sort == "newest":
        values["live"] = {
            "url": "/partials/rows?" + urlencode({**chosen, "limit": PAGE}),
            "since": shown_at,
            "complete": next_cursor is None,
        }
    return render(request, "evaluations.html", **values)


def rows(request: Request) -> Response:
    """Rows for a live table (static/app.js): those written since `changed_since`, oldest
    change first, as they are now. Only the time bounds (`since`, `until`) choose them: one
    that no longer passes the other filters comes as a hidden `data-gone` row, so the table
    drops it. `X-Next-Cursor` follows on when more changed than `limit`. Without
    `changed_since`, the newest `limit` rows."""
    params = {k: v for k, v in request.query_params.items() if v != ""}
    limit = min(whole(params.get("limit", ""), MAX_ROW_ID) or 10, 100)
    where = evaluation_filter({k: v for k, v in params.items() if k in (*FILTERS, CHANGES)})
    store = context(request).store
    next_cursor = None
    if where.changed_since is None:
        items, _ = store.list_evaluations(where, limit)
    else:
        items, next_cursor = store.list_changes(where, limit, params.get("cursor"), flag=True)
    response = templates().TemplateResponse(request, "_rows.html", {"items": items})
    if next_cursor is not None:
        response.headers["x-next-cursor"] = next_cursor
    return response


def evaluation(request: Request) -> Response:
    store = context(request).store
    evaluation_id = request.path_params["evaluation_id"]
    if not evaluation_id:  # `/evaluations/` (the route takes any path: an id may hold `/`)
        return RedirectResponse("/evaluations", status_code=307)
    detail = store.get_evaluation(evaluation_id)
    if detail is None:
        raise NotFound(f"no evaluation {evaluation_id!r}")
    evaluation = detail["evaluation"]
    runflow = evaluation["runflow"]
    action = runflow.get("action") if isinstance(runflow.get("action"), dict) else {}
    image = evaluation["image_url"]
    return render(
        request,
        "evaluation.html",
        nav="evaluations",
        e=evaluation,
        r=runflow,
        detail=detail,
        action={
            "primary_action": action.get("primary_action") or runflow.get("primary_action_code"),
            "failure_summary": action.get("failure_summary"),
            "improved_prompt": action.get("improved_prompt"),
        },
        judges=[
            {
                **judge,
                "issues": _dicts(judge.get("issues")),
                "evidence": _list(judge.get("evidence")),
            }
            for judge in _dicts(runflow.get("judges"))
        ],
        gate_failures=_dicts(runflow.get("gate_failures")),
        lineage=store.lineage(evaluation_id),
        image_url=image if image and image.startswith(("https://", "http://")) else None,
    )


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects of a stored list. A signed body is stored as Runflow sent it, so its shape
    is checked where it is shown: a page must not fail on an unexpected one."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def client_ref(request: Request) -> Response:
    client_ref = request.path_params["client_ref"]
    found = context(request).store.get_client_ref(client_ref)
    if found is None:
        raise NotFound(f"no evaluation with client_ref {client_ref!r}")
    return render(request, "client_ref.html", nav="evaluations", ref=found)


def forwards(request: Request) -> Response:
    state = request.query_params.get("state") or "dead"
    if state not in STATES:
        raise BadRequest(f"state must be one of {', '.join(STATES)}, got {state!r}")
    sink = request.query_params.get("sink") or None
    after = request.query_params.get("after") or None
    if after is not None and not (after.isascii() and after.isdigit()):  # not the first page
        raise BadRequest(f"after must be a forward id, got {after!r}")
    after_id = None if after is None else whole(after, MAX_ROW_ID) or MAX_ROW_ID
    items = context(request).store.list_forwards(
        state=state, sink=sink, limit=PAGE + 1, after=after_id
    )
    more = len(items) > PAGE
    items = items[:PAGE]
    next_url = None
    if more:
        next_url = "/forwards?" + urlencode(
            {"state": state, **({"sink": sink} if sink else {}), "after": items[-1]["id"]}
        )
    return render(
        request,
        "forwards.html",
        nav="forwards",
        state=state,
        sink=sink,
        states=STATES,
        items=items,
        more=more,
        here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        next_url=next_url,
    )
