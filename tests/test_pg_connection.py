"""How a PostgreSQL error becomes a reason: one line, naming no server, user or database."""

from __future__ import annotations

import psycopg
import pytest

from receiver.store.pg_connection import connect_options, describe


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            'connection failed: connection to server at "10.0.0.5", port 5432 failed: Connection'
            " refused\n\tIs the server running on that host and accepting TCP/IP connections?",
            'connection failed: connection to server at "…", port 5432 failed: Connection refused'
            " Is the server running on that host and accepting TCP/IP connections?",
        ),
        (
            'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: FATAL: '
            'password authentication failed for user "app"',
            'connection to server on socket "…" failed: FATAL: password authentication failed'
            ' for user "…"',
        ),
        ('FATAL: database "receiver" does not exist', 'FATAL: database "…" does not exist'),
        ("deadlock detected", "deadlock detected"),
        ("", "OperationalError"),
    ],
)
def test_a_reason_is_one_line_naming_nothing(message: str, reason: str) -> None:
    assert describe(psycopg.OperationalError(message)) == reason


@pytest.mark.parametrize(
    ("url", "idle", "user_timeout"),
    [
        ("postgresql://db.internal/receiver", 10, 30000),
        ("postgresql://db.internal/receiver?keepalives_idle=60", None, 30000),
        ("postgresql://db.internal/receiver?tcp_user_timeout=0&keepalives_idle=1", None, None),
    ],
)
def test_a_vanished_server_is_noticed_in_seconds_unless_the_url_says_otherwise(
    url: str, idle: int | None, user_timeout: int | None
) -> None:
    """libpq's defaults leave a write waiting about two hours for a host that vanished."""
    options = connect_options(url)
    assert options.get("keepalives_idle") == idle
    assert options.get("tcp_user_timeout") == user_timeout
    assert options["connect_timeout"] == 10
    assert options["keepalives"] == 1
