"""receiver/times.py: one fixed-width UTC text form, and `now` in it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from receiver.times import format_time, now, parse_time


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
