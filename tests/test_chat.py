"""The fake Slack and Discord webhooks answer as the real services do."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from receiver.fakes.chat import FakeSlack

from .sinkhelpers import served


@pytest.fixture(scope="module")
def slack() -> Iterator[tuple[FakeSlack, str]]:
    yield from served(FakeSlack())


@pytest.mark.parametrize(
    ("body", "status", "answer"),
    [
        (b"not json", 400, "invalid_payload"),
        (b"[1]", 400, "invalid_payload"),
        (b"{}", 400, "no_text"),
        (b'{"text": ""}', 400, "no_text"),
        (b'{"blocks": []}', 400, "no_text"),
        (b'{"username": "bot"}', 400, "no_text"),
        (b'{"text": "hello"}', 200, "ok"),
    ],
)
def test_slack_answers_no_text_for_a_message_without_text(
    slack: tuple[FakeSlack, str], body: bytes, status: int, answer: str
) -> None:
    fake, base = slack
    response = httpx.post(fake.url(base), content=body)
    assert (response.status_code, response.text) == (status, answer)
