"""bench/ingest.py's check that every acknowledged callback was stored, by id."""

from __future__ import annotations

import pytest

from bench.ingest import every_200_stored

ORDER = [f"e-{n}" for n in range(10)]


@pytest.mark.parametrize(
    ("stored", "oks", "expected"),
    [
        (ORDER[:7], 6, True),  # the 200s, and some of what was in flight
        (ORDER[:4], 6, True),  # what was in flight (two connections) is not yet stored
        ([ORDER[0], *ORDER[2:7]], 6, False),  # one acknowledged callback lost
        ([*ORDER[:7], ORDER[9]], 6, False),  # stored what was never sent
        (ORDER, 15, True),  # went round the file: everything sent, everything stored
        (ORDER[1:], 15, False),  # … and one of them lost
        ([], 0, True),  # nothing answered 200
    ],
)
def test_every_200_stored(stored: list[str], oks: int, expected: bool) -> None:
    assert every_200_stored(set(stored), ORDER, oks, connections=2) is expected
