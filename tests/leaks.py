"""Do secrets reach the logs? The check every test that collects logs can use.

`Secrets` holds what a test used (webhook secrets, tokens, API keys, webhook URLs, cookies) by
name; `assert_no_secrets` looks for each, in every form a log line could carry it (as is,
percent-encoded, JSON-escaped, base64), in server output or captured log records, and names
each leak with an excerpt in which the secret itself is masked.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from urllib.parse import quote

# Shorter values match too much by chance to mean anything.
MIN_LENGTH = 8
# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def forms(secret: str) -> set[str]:
    """The ways `secret` could be written into a log line."""
    found = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        json.dumps(secret)[1:-1],
        base64.b64encode(secret.encode()).decode().rstrip("="),
    }
    return {form for form in found if len(form) >= MIN_LENGTH}


def url_secrets(name: str, url: str) -> dict[str, str]:
    """A webhook URL and its last path piece: where Slack and Discord put the token."""
    token = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return {name: url, f"{name} (its token)": token}


def find_leaks(text: str, secrets: Mapping[str, str], where: str = "logs") -> list[str]:
    """One line per secret found in `text`: its name, where, and a masked excerpt."""
    leaks = []
    for name, secret in secrets.items():
        for form in sorted(forms(secret), key=len, reverse=True):
            at = text.find(form)
            if at < 0:
                continue
            excerpt = text[max(0, at - 80) : at + len(form) + 80].replace(form, f"<{name}>")
            leaks.append(f"{name} appears in {where}: …{excerpt}…")
            break
    return leaks


def records_text(records: Iterable[logging.LogRecord]) -> str:
    """Everything a formatter could print from `records`: message, extra fields, traceback."""
    lines = []
    formatter = logging.Formatter()
    for record in records:
        parts = [str(record.name), record.getMessage()]
        parts += [f"{key}={value!r}" for key, value in vars(record).items() if key not in _STANDARD]
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
        if record.stack_info:
            parts.append(record.stack_info)
        lines.append(" ".join(parts))
    return "\n".join(lines)


def assert_no_secrets(
    text: str | Iterable[logging.LogRecord], secrets: Mapping[str, str], where: str = "logs"
) -> None:
    """Fail, naming every leak, if any secret appears in `text` (or in log records)."""
    shown = text if isinstance(text, str) else records_text(text)
    short = [name for name, secret in secrets.items() if len(secret) < MIN_LENGTH]
    assert not short, f"too short to look for reliably: {short}"
    leaks = find_leaks(shown, secrets, where)
    assert not leaks, "\n".join(leaks)
