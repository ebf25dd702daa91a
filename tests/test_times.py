"""receiver/times.py: one fixed-width UTC text form, and `now` in it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from receiver.times import format_time, now, parse_moment, parse_time


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 11, 20, 9, 14, 43, 352000, tzinfo=UTC), "2026-11-20T09:14:43.352000Z"),
        (
            datetime(2026, 11, 20, 10, 14, 43, tzinfo=timezone(timedelta(hours=1))),
            "2026-11-20T09:14:43.000000Z",
        ),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000Z"),
    ],
)
def test_format_time(moment: datetime, text: str) -> None:
    assert format_time(moment) == text


def test_now_is_this_moment_in_the_same_form() -> None:
    before = datetime.now(UTC)
    stamp = now()
    after = datetime.now(UTC)
    assert len(stamp) == len("2026-11-20T09:14:43.352000Z")
    assert format_time(parse_time(stamp)) == stamp
    assert (
        before - timedelta(milliseconds=1) <= parse_time(stamp) <= after + timedelta(milliseconds=1)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", "2026-11-18T00:00:00.000000Z"),
        ("2026-01-01", "2026-01-01T00:00:00.000000Z"),
        ("2026-01-01T10:00:00+01:00", "2026-01-01T09:00:00.000000Z"),
        ("junk", "expected an ISO 8601 time (2026-11-20T09:00:00Z) or a duration (24h, 7d)"),
        ("99999999999d", "duration '99999999999d' is too long"),
        ("0001-01-01T00:00:00+01:00", "'0001-01-01T00:00:00+01:00' is out of range in UTC"),
    ],
)
def test_parse_moment_says_why_it_refuses(text: str, expected: str) -> None:
    reference = datetime(2026, 11, 25, tzinfo=UTC)
    try:
        found = parse_moment(text, reference=reference)
    except ValueError as exc:
        found = str(exc)
    assert found.startswith(expected)
