"""What every request handler needs, built by create_app and opened by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from .config import Settings
from .store import Store


@dataclass
class Context:
    settings: Settings
    store: Store


def context(request: Request) -> Context:
    ctx: Context = request.app.state.receiver
    return ctx
