"""Timestamps: one fixed-width UTC text form, so string order is time order in every query."""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def format_time(moment: datetime) -> str:
    """`2026-11-20T09:14:43.352000Z`: fixed width (`%Y` drops the zeros of year 1), always UTC."""
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S.%f}Z"


@functools.lru_cache(maxsize=2)
def second(seconds: int) -> str:
    """`2026-11-20T09:14:43` for a Unix time: the same for every call in that second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def now() -> str:
    """format_time of this moment, for a quarter of its cost (it stamps every delivery)."""
    moment = time.time()
    seconds = int(moment)
    return f"{second(seconds)}.{int((moment - seconds) * 1_000_000):06d}Z"


def parse_time(text: str) -> datetime:
    """Parse ISO 8601 (`Z` or an offset; a bare date means midnight UTC). Raises ValueError."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first moment there is
        raise ValueError(f"{text[:40]!r} is out of range in UTC") from None
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
    try:
        return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:
        raise ValueError(f"duration {text[:40]!r} is too long") from None


def ago(text: str, *, reference: datetime | None = None) -> str:
    """The stored time a duration (`90d`) before `reference` (now). Raises ValueError."""
    delta = parse_duration(text)
    try:
        return format_time((reference or datetime.now(UTC)) - delta)
    except OverflowError:
        raise ValueError(f"duration {text[:40]!r} reaches back before year 1") from None


def parse_moment(text: str, *, reference: datetime | None = None) -> str:
    """A filter bound: an ISO timestamp/date, or a duration meaning that long ago. One that is
    either but out of range says so (too long, before year 1), as `prune` does."""
    if _DURATION.match(text.strip()):
        return ago(text, reference=reference)
    try:
        datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time (2026-11-20T09:00:00Z) or a duration (24h, 7d), "
            f"got {text!r}"
        ) from None
    return format_time(parse_time(text))
