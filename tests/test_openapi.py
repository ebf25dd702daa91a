"""The OpenAPI document (receiver/openapi.py) against what the app answers where schemathesis
(tests/test_schema.py) does not look: request headers it never sends."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from receiver import openapi
from receiver.app import create_app

from .helpers import auth, make_settings


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text; version=1.0.0"])
def test_every_content_type_of_metrics_is_in_the_document(
    tmp_path: Path, accept: str | None
) -> None:
    """The document says OpenMetrics comes when the Accept header asks: its 200 lists it."""
    documented = openapi.document()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    headers = {**auth(), **({"accept": accept} if accept else {})}
    with TestClient(create_app(make_settings(tmp_path, worker=False))) as client:
        response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in documented


def test_the_webhooks_503_documents_its_retry_after() -> None:
    """A callback the store did not commit in time gets Retry-After (store/deadlines.py)."""
    documented = openapi.document()["paths"]["/webhooks/runflow"]["post"]["responses"]["503"]
    assert documented["headers"]["Retry-After"]["schema"] == {"type": "integer"}
