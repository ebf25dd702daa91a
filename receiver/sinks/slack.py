"""Slack incoming webhooks: one Block Kit message per verdict (design.md §6)."""

from __future__ import annotations

from ..messages import slack_message
from .base import Event
from .web import WebSink, json_body, response_error

_JSON = {"content-type": "application/json; charset=utf-8"}


class SlackSink(WebSink):
    # Slack allows about one message a second per webhook: posting in order keeps under it.
    concurrency = 1

    async def send(self, event: Event) -> None:
        message = slack_message(event)
        response = await self.post(json_body(message), _JSON)
        if response.status_code == 400 and "invalid_blocks" in response.text:
            # Slack refuses the whole message when it cannot fetch the image; say it without.
            without = slack_message(event, image=False)
            if without != message:
                response = await self.post(json_body(without), _JSON)
        error = response_error(self.spec, response)
        if error is not None:
            raise error
