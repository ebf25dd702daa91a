"""How a PostgreSQL error becomes a reason: one line, naming no server, user or database."""

from __future__ import annotations

import psycopg
import pytest

from receiver.store.pg_connection import describe


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
