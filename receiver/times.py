"""Timestamps: one fixed-width UTC text form, so string order is time order in every query."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def format_time(moment: datetime) -> str:
    """`2026-11-20T09:14:43.352000Z`: fixed width, always UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> str:
    return format_time(datetime.now(UTC))


def parse_time(text: str) -> datetime:
    """Parse ISO 8601 (`Z` or an offset; a bare date means midnight UTC). Raises ValueError."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def normalize_time(value: object) -> str | None:
    """A payload timestamp in our stored form, or None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return format_time(parse_time(value))
    except ValueError:
        return None


def shift(stamp: str, seconds: float) -> str:
    """A stored time moved by `seconds`."""
    return format_time(parse_time(stamp.replace("Z", "+00:00")) + timedelta(seconds=seconds))


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `24h`, `7d`, `2w`. Raises ValueError."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"expected a duration like 15m, 24h or 7d, got {text!r}")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def parse_moment(text: str, *, reference: datetime | None = None) -> str:
    """A filter bound: an ISO timestamp/date, or a duration meaning that long ago."""
    try:
        return format_time(parse_time(text))
    except ValueError:
        pass
    try:
        delta = parse_duration(text)
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time (2026-11-20T09:00:00Z) or a duration (24h, 7d), "
            f"got {text!r}"
        ) from None
    return format_time((reference or datetime.now(UTC)) - delta)
