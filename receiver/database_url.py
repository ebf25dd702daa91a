"""RECEIVER_DATABASE values: a SQLite path or a PostgreSQL URL, and how one may be shown."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

DATABASE_SETTING = "RECEIVER_DATABASE"  # or DATABASE_URL, when only that is set
SCHEMES = ("postgres://", "postgresql://")
SECRET_PARAMETERS = ("password", "sslpassword")


def is_postgres_url(database: str) -> bool:
    return database.startswith(SCHEMES)


def redact(database: str) -> str:
    """The setting as it may be shown or logged: a URL's password, in its user part or as a
    `password`/`sslpassword` query parameter (libpq reads both), becomes `***`."""
    if "://" not in database:
        return database
    parts = urlsplit(database)
    netloc, query = parts.netloc, "&".join(map(_masked, parts.query.split("&")))
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    if (netloc, query) == (parts.netloc, parts.query):
        return database
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _masked(pair: str) -> str:
    name, equals, _ = pair.partition("=")
    return f"{name}=***" if equals and unquote(name).lower() in SECRET_PARAMETERS else pair
