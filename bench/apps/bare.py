"""(a) The ceiling: Starlette + uvicorn that reads the body and answers 200."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    await request.body()
    return Response(b'{"ok":true}', media_type="application/json")


app = Starlette(routes=[Route("/webhooks/runflow", webhook, methods=["POST"])])
