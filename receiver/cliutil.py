"""What every command shares: settings, the store opened for reading or writing, output."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .app import forwarding
from .config import Settings
from .store import Store, service
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
            f"no database at {settings.database!r}: set {settings.database_setting} to the"
            " server's (or make one with `receiver migrate`)"
        )


def reading_store(settings: Settings) -> Store:
    existing_database(settings)
    store = Store(
        settings.database,
        pool_size=settings.database_pool_size,
        setting=settings.database_setting,
    )
    store.check_schema()
    return store


def program_name(argv0: str, executable: str, search_path: str | None) -> str:
    """The program as the user can type it again: `receiver` when that is what their PATH
    finds, else the path they ran (`.venv/bin/receiver` after `make run`), or the Python
    that ran `-m receiver`, named the same way."""
    if Path(argv0).name == "__main__.py":
        return f"{program_name(executable, executable, search_path)} -m receiver"
    if not Path(argv0).is_file():  # embedded, or `-c`: no better name to give
        return "receiver"
    name = Path(argv0).name
    found = shutil.which(name, path=search_path)  # the same file, not one its links lead to
    if found and os.path.abspath(found) == os.path.abspath(argv0):
        return name
    return shlex.quote(argv0)


def command_line(*args: str) -> str:
    """A command to run next, with the program named as the user ran this one."""
    return " ".join((click.get_current_context().find_root().info_name or "receiver", *args))


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
def writing_store(
    settings: Settings, *, create: bool = False, forwards: bool = True
) -> Iterator[Store]:
    """The store with its writer running, for commands that change something; only with
    `create` (`receiver submit`, which records what it sent) may it make the database. It never
    migrates one that exists: a server may be running the version before. A command that may
    queue forwards (`forwards`) must have the service's sinks (store/service.py)."""
    made = not settings.postgres and not Path(settings.database).exists()
    if not create:
        existing_database(settings)
    store = Store(
        settings.database,
        setting=settings.database_setting,
        forwarding=forwarding(settings),
        pool_size=settings.database_pool_size,
        applies=False,  # the server's backlog, for the server's sinks
    )
    if not made:
        store.check_schema()
    store.open(migrate=made)
    try:
        recorded = store.service_forwarding() if forwards else None
        why = None if recorded is None else service.differs(recorded, store.forwarding)
        if why is not None:
            raise click.ClickException(why)
        yield store
    finally:
        store.close()
