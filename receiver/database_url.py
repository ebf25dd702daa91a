"""RECEIVER_DATABASE values: a SQLite path or a PostgreSQL URL, and how one may be shown."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("postgres://", "postgresql://")


def is_postgres_url(database: str) -> bool:
    return database.startswith(SCHEMES)


def redact(database: str) -> str:
    """The setting as it may be shown or logged: a URL's password becomes `***`."""
    if "://" not in database:
        return database
    parts = urlsplit(database)
    if parts.password is None:
        return database
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
