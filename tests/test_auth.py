from __future__ import annotations

import pytest

from receiver.auth import SESSION_SECONDS, csrf_token, new_session, session_id, token_ok

TOKEN = "dashboard-token"


def test_a_fresh_session_verifies_and_binds_its_csrf_token() -> None:
    cookie = new_session(TOKEN, now=1_000_000)
    sid = session_id(cookie, TOKEN, now=1_000_100)
    assert sid is not None
    assert csrf_token(TOKEN, sid) != csrf_token(TOKEN, sid + "x")


@pytest.mark.parametrize(
    ("mutate", "at"),
    [
        (lambda c: c, 1_000_000 + SESSION_SECONDS),  # expired
        (lambda c: c, 999_000),  # issued in the future
        (lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"), 1_000_100),  # mac changed
        (lambda c: c.replace(".1000000.", ".1000001."), 1_000_100),  # issue time changed
        (lambda c: c.rsplit(".", 1)[0], 1_000_100),  # mac missing
        (lambda c: c[:-1] + "\xe9", 1_000_100),  # a character compare_digest refuses in a str
        (lambda c: "", 1_000_100),
    ],
    ids=["expired", "future", "mac", "issued", "no-mac", "non-ascii-mac", "empty"],
)
def test_tampered_or_expired_sessions_are_refused(mutate: object, at: int) -> None:
    cookie = new_session(TOKEN, now=1_000_000)
    assert session_id(mutate(cookie), TOKEN, now=at) is None  # type: ignore[operator]


def test_a_new_token_ends_every_session() -> None:
    cookie = new_session(TOKEN, now=1_000_000)
    assert session_id(cookie, "rotated-token", now=1_000_100) is None


@pytest.mark.parametrize(
    ("given", "ok"),
    [(TOKEN, True), (f" {TOKEN} ", True), ("nope", False), ("", False), ("t\xe9\ud800", False)],
)
def test_token_comparison(given: str, ok: bool) -> None:
    assert token_ok(given, TOKEN) is ok
