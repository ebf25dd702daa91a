"""What every command shares: settings, the store opened for reading or writing, output."""

from __future__ import annotations

import contextlib
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .app import forwarding
from .config import Settings
from .store import Store
from .times import parse_moment


def load_settings(*, sinks: bool = True) -> Settings:
    """The settings; `sinks=False` for a command that forwards nothing (query, show, backup…),
    so it runs without the sinks' secrets in the shell."""
    return Settings.from_env(sinks=sinks)


def existing_database(settings: Settings) -> None:
    """Commands other than `migrate` and the servers never create a database: at a mistyped
    RECEIVER_DATABASE (or without the service's settings) they would act on an empty one and
    report nothing to do."""
    if not settings.postgres and not Path(settings.database).exists():
        raise click.ClickException(
            f"no database at {settings.database!r}: set RECEIVER_DATABASE to the server's "
            "(or make one with `receiver migrate`)"
        )


def reading_store(settings: Settings) -> Store:
    existing_database(settings)
    store = Store(settings.database, pool_size=settings.database_pool_size)
    store.check_schema()
    return store


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def moment(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else parse_moment(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def say(line: str) -> None:
    """Print one line of output that holds payload strings, with every control character
    shown as an escape (`\\x1b`): a client_ref or judge's text then cannot move the cursor,
    recolour or retitle the terminal, or forge lines, as the dashboard and chat escape theirs.
    """
    click.echo(visible(line))


def visible(text: str) -> str:
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def first_secret(secret: str | None) -> str:
    if secret:
        return secret
    secrets = load_settings(sinks=False).webhook_secrets
    if not secrets:
        raise click.ClickException(
            "no secret: pass --secret or set RUNFLOW_WEBHOOK_SECRET (whsec_...)"
        )
    return secrets[0]


@contextlib.contextmanager
def writing_store(settings: Settings, *, create: bool = False) -> Iterator[Store]:
    """The store with its writer running, for commands that change something; only with
    `create` (`receiver submit`, which records what it sent) may it make the database."""
    if not create:
        existing_database(settings)
    store = Store(
        settings.database,
        forwarding=forwarding(settings),
        pool_size=settings.database_pool_size,
    )
    store.open()
    try:
        yield store
    finally:
        store.close()
