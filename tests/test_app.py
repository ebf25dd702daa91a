"""receiver/app.py: how the app answers and logs what no handler expected."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from receiver.app import create_app
from receiver.fakes.server import serve_in_thread
from receiver.protocol import WebhookProtocol
from receiver.store import Store

from .helpers import auth, make_settings


class Broken(Store):
    """A store with a bug in one read."""

    def list_evaluations(self, *args: object, **kwargs: object) -> tuple[list[object], None]:
        raise RuntimeError("a bug in a read")


def test_an_unhandled_error_is_logged_once_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette answers it 500 (app.server_error logs it, with the request) and then raises
    it again for the server: uvicorn logged the same traceback a second time as "Exception in
    ASGI application", with nothing to say which request it was."""
    settings = make_settings(tmp_path, worker=False)
    app = create_app(settings, store=Broken(settings.database))
    with caplog.at_level(logging.INFO), serve_in_thread(app, http=WebhookProtocol) as url:
        response = httpx.get(f"{url}/api/evaluations", headers=auth())
        assert httpx.get(f"{url}/healthz").is_success  # the server carries on
    assert response.status_code == 500
    assert response.json() == {
        "ok": False,
        "error": "internal error; the server log has the details",
    }
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert [(r.name, r.getMessage()) for r in tracebacks] == [
        ("receiver", "unhandled error on GET /api/evaluations")
    ]
    assert "Exception in ASGI application" not in caplog.text
