"""The local dashboard: server-rendered pages (Jinja2), one small script, no external assets.
Log in once with the dashboard token; every state-changing form carries a CSRF token."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import actions, pages
from .render import HERE, html_errors


def routes() -> list[BaseRoute]:
    protected, act = pages.protected, html_errors
    return [
        Route("/login", pages.login, methods=["GET"]),
        Route("/login", act(actions.login), methods=["POST"]),
        Route("/logout", act(actions.logout), methods=["POST"]),
        Route("/", protected(pages.overview), methods=["GET"]),
        Route("/evaluations", protected(pages.evaluations), methods=["GET"]),
        Route(
            "/evaluations/{evaluation_id:path}/feedback", act(actions.feedback), methods=["POST"]
        ),
        Route("/evaluations/{evaluation_id:path}", protected(pages.evaluation), methods=["GET"]),
        Route("/client-refs/{client_ref:path}", protected(pages.client_ref), methods=["GET"]),
        Route("/forwards", protected(pages.forwards), methods=["GET"]),
        Route("/forwards/retry-dead", act(actions.retry_dead), methods=["POST"]),
        Route("/forwards/{forward_id:int}/retry", act(actions.retry), methods=["POST"]),
        Route("/partials/rows", protected(pages.rows), methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
