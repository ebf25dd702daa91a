"""What the queue sinks share: a loggable address and failure texts without secrets."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

from ..sinkspec import TYPES, SinkSpec

# How long a queue remembers an event id to drop its second copy: far beyond any redelivery
# (a crashed worker's lease, RECEIVER_LEASE; a retry's wait, RECEIVER_RETRY_MAX).
DEDUPE_SECONDS = 86400


def option(spec: SinkSpec, key: str) -> Any:
    """A sink's own option; its documented default when the spec was made without it."""
    return spec.options.get(key, TYPES[spec.type][1][key])


def where(url: str) -> str:
    """`scheme://host:port/path`: no user, password or query, so it is safe in logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def reason(exc: BaseException, url: str) -> str:
    """`Type: message` of a client library's error, the URL's password blanked if echoed."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    password = urlsplit(url).password
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def body(event: dict[str, Any]) -> bytes:
    """The CloudEvent as compact UTF-8 JSON, the same bytes for every queue."""
    return _encode(event).encode()
