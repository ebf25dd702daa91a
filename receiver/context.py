"""What every request handler needs, built by create_app and opened by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from starlette.requests import Request

from .config import Settings
from .metrics import Metrics
from .store import Store
from .worker import Worker

STATE_KEY = "receiver"  # the lifespan state entry that holds the Context (protocol.py reads it)


@dataclass
class Context:
    settings: Settings
    store: Store
    http: httpx.AsyncClient
    worker: Worker | None = None
    metrics: Metrics = field(default_factory=Metrics)

    def notify(self) -> None:
        """New work is stored: wake the in-process worker, if any."""
        if self.worker is not None:
            self.worker.notify()


def context(request: Request) -> Context:
    ctx: Context = request.app.state.receiver
    return ctx
