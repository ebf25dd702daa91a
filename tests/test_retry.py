"""Backoff (receiver/retry.py): exponential with full jitter, capped; Retry-After honoured."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from receiver.retry import backoff, parse_retry_after


def highest(low: float, high: float) -> float:
    """The jitter at its top: the longest wait it may give."""
    return high


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [
        (1, None, 2.0),  # base
        (2, None, 4.0),  # doubles
        (5, None, 32.0),
        (20, None, 3600.0),  # capped at RECEIVER_RETRY_MAX
        (10_000, None, 3600.0),  # an exponent that large is no overflow
        (1, 30.0, 30.0),  # the other side asks for longer: it wins
        (1, 1.0, 2.0),  # … not shorter
        (1, 86_400.0, 3600.0),  # … and never past the cap
    ],
)
def test_backoff(attempt: int, retry_after: float | None, expected: float) -> None:
    assert backoff(attempt, 2.0, 3600.0, retry_after, rand=highest) == expected


def test_the_jitter_is_full() -> None:
    """Anywhere from 0 to the exponential bound: retries of many sinks spread out."""
    bounds = []
    backoff(3, 2.0, 3600.0, rand=lambda low, high: bounds.append((low, high)) or low)
    assert bounds == [(0, 8.0)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("Wed, 25 Nov 2026 00:01:00 GMT", 60.0),
        ("Wed, 25 Nov 2026 00:00:00 GMT", 0.0),  # past: now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 25, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now) == expected
