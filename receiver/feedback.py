"""Feedback on an evaluation: sent to Runflow through the client, then what Runflow answers is
stored as the evaluation's state. One path for the CLI, the API and the dashboard."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from .config import Settings
from .errors import BadRequest, NotFound
from .runflow import client_for
from .store import Store
from .times import now

RATINGS: dict[str, bool | None] = {"up": True, "down": False, "clear": None}


def _check_reason(reason: str) -> None:
    """JSON can carry "\\ud800" and "\\u0000"; no text Runflow or SQLite takes the first, and
    PostgreSQL's text cannot hold the second."""
    if "\x00" in reason:
        raise BadRequest("reason must not contain NUL characters")
    if not reason.isascii():
        try:
            reason.encode()
        except UnicodeEncodeError:
            raise BadRequest("reason must be text: it holds a lone surrogate escape") from None


async def send_feedback(
    settings: Settings,
    store: Store,
    http: httpx.AsyncClient,
    evaluation_id: str,
    is_positive: bool | None,
    reason: str | None,
) -> dict[str, Any]:
    """Raises NotFound for an evaluation this receiver never saw, BadRequest for a reason
    Runflow would refuse or the store cannot hold, RunflowError for Runflow's own refusals."""
    if reason is not None:
        _check_reason(reason)
    await store.acatch_up()
    if not await asyncio.to_thread(store.has_evaluation, evaluation_id):  # off the loop
        raise NotFound(f"no evaluation {evaluation_id!r}")
    client = client_for(settings, http)
    evaluation = await client.evaluation_feedback(evaluation_id, is_positive, reason)
    await store.record(evaluation, "feedback", now())
    return evaluation
