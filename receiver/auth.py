"""Who may use the dashboard and /api: the bearer token, or a session cookie the browser got by
logging in with it. The cookie is signed with the token (changing the token ends every
session), HttpOnly and SameSite=Strict; state-changing requests also need a CSRF token bound to
the session."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import HTTPConnection

COOKIE = "receiver_session"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 7 * 86400


def _mac(token: str, purpose: str, value: str) -> str:
    return hmac.new(token.encode(), f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def new_session(token: str, now: float | None = None) -> str:
    """The cookie value: `<session id>.<issued>.<mac>`."""
    sid = f"{secrets.token_urlsafe(18)}.{int(now if now is not None else time.time())}"
    return f"{sid}.{_mac(token, 'session', sid)}"


def session_id(cookie: str | None, token: str, now: float | None = None) -> str | None:
    """The session id of a valid, unexpired cookie; None otherwise."""
    if not cookie or cookie.count(".") != 2:
        return None
    sid, _, mac = cookie.rpartition(".")
    if not _same(mac, _mac(token, "session", sid)):
        return None
    issued = sid.partition(".")[2]
    current = now if now is not None else time.time()
    if not issued.isdecimal() or not 0 <= current - int(issued) < SESSION_SECONDS:
        return None
    return sid


def csrf_token(token: str, sid: str) -> str:
    return _mac(token, "csrf", sid)


# Form fields a redirect may carry back to the form (signed with its message): what was typed
# is not lost when the action is refused.
KEPT = ("reason",)


def flash(
    token: str, *, notice: str | None = None, error: str | None = None, **kept: str
) -> dict[str, str]:
    """The query a redirect carries its message to the next page with, signed: a link made
    elsewhere cannot put its own words ("log in again at …") on the dashboard, nor in a form."""
    kind, text = ("notice", notice) if notice else ("error", error or "")
    carried = {key: kept[key] for key in KEPT if kept.get(key)}
    return {kind: text, **carried, "sig": _mac(token, f"flash-{kind}", _signed(text, carried))}


def flashed(token: str, query: Mapping[str, str], kind: str) -> str | None:
    """The `kind` message (notice, error) of a redirect made by `flash`, if its signature holds."""
    text = query.get(kind)
    signed = _signed(text or "", query)
    if not text or not _same(query.get("sig", ""), _mac(token, f"flash-{kind}", signed)):
        return None
    return text


def _signed(text: str, carried: Mapping[str, str]) -> str:
    return "\x00".join([text, *(carried.get(key, "") for key in KEPT)])


def token_ok(given: str, token: str) -> bool:
    return _same(given.strip(), token)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of what a client sent and what we expect. As bytes:
    compare_digest refuses str with non-ASCII characters, which a cookie or header may hold."""
    return hmac.compare_digest(given.encode(errors="surrogatepass"), expected.encode())


def bearer_ok(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and token_ok(given, token)


@dataclass(frozen=True)
class Identity:
    """How a request proved itself: by bearer token (scripts) or session cookie (browser)."""

    bearer: bool
    sid: str | None

    def csrf_ok(self, token: str, given: str | None) -> bool:
        """Bearer requests cannot be forged cross-site; cookie ones must echo the CSRF token."""
        if self.bearer:
            return True
        return self.sid is not None and _same(given or "", csrf_token(token, self.sid))


def identify(connection: HTTPConnection, token: str) -> Identity | None:
    if bearer_ok(connection.headers.get("authorization"), token):
        return Identity(bearer=True, sid=None)
    sid = session_id(connection.cookies.get(COOKIE), token)
    return Identity(bearer=False, sid=sid) if sid else None
