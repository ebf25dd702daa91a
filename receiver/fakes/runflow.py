"""A fake Runflow API that behaves as documented (runflow-contract.md §4-5): Bearer auth,
embeds, Runflow's error shape, and switchable faults (429 with or without Retry-After, 5xx,
slow answers). Serve `FakeRunflow().app` on loopback; tests steer it in-process."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import EMBEDS


def template() -> dict[str, Any]:
    """A completed evaluation with judges, action and gate_failures (the shared fixture)."""
    text = resources.files(__package__).joinpath("data/evaluation-embedded.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"code": code, "message": message, "errors": []}, status_code=status, headers=headers
    )


@dataclass
class Fault:
    status: int | None = None  # None: answer normally, after `delay`
    retry_after: float | None = None
    delay: float = 0.0


class FakeRunflow:
    def __init__(self, api_key: str = "rf_test_key") -> None:
        self.api_key = api_key
        self.evaluations: dict[str, dict[str, Any]] = {}
        self.faults: deque[Fault] = deque()
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[Route("/v1/evaluations/{evaluation_id}", self.get_evaluation, methods=["GET"])]
        )

    def add(self, evaluation_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Store an evaluation (the template with `fields` over it); returns it."""
        evaluation = copy.deepcopy(template())
        evaluation["id"] = evaluation_id or str(uuid.uuid4())
        evaluation["links"] = {"self": f"/v1/evaluations/{evaluation['id']}"}
        evaluation.update(fields)
        self.evaluations[evaluation["id"]] = evaluation
        return evaluation

    def fail_next(
        self,
        status: int | None,
        *,
        count: int = 1,
        retry_after: float | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next `count` requests answer `status` (or, with None, normally after `delay`)."""
        self.faults.extend(Fault(status, retry_after, delay) for _ in range(count))

    async def _fault(self) -> Response | None:
        if not self.faults:
            return None
        fault = self.faults.popleft()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is None:
            return None
        headers = None if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
        if fault.status == 429:
            return error(429, "RATE_LIMITED", "Too many requests", headers)
        return error(fault.status, "INTERNAL_ERROR", "Something went wrong", headers)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    async def get_evaluation(self, request: Request) -> Response:
        self.requests.append(
            {
                "method": "GET",
                "path": request.url.path,
                "query": dict(request.query_params),
                "headers": dict(request.headers),
            }
        )
        if not self._authorized(request):
            return error(401, "UNAUTHORIZED", "Invalid or missing API key")
        faulted = await self._fault()
        if faulted is not None:
            return faulted
        evaluation = self.evaluations.get(request.path_params["evaluation_id"])
        if evaluation is None:
            return error(404, "NOT_FOUND", "Evaluation not found")
        wanted = [e for e in request.query_params.get("embed", "").split(",") if e]
        unknown = [e for e in wanted if e not in EMBEDS]
        if unknown:
            return error(400, "VALIDATION_ERROR", f"Unknown embed: {unknown[0]}")
        shown = {k: v for k, v in evaluation.items() if k not in EMBEDS or k in wanted}
        return JSONResponse(shown)
