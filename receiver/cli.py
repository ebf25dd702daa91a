"""The `receiver` command. User mistakes end with one line on stderr and exit status 1."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import cli_read, cli_runflow, logs
from .cliutil import existing_database, load_settings, program_name, reading_store
from .config import MIN_TOKEN_CHARS
from .database_url import is_postgres_url
from .errors import ReceiverError
from .store import Store
from .supervisor import HTTP_PROTOCOL, STARTED_WITH, given_metrics_dir, supervise

if TYPE_CHECKING:
    import uvicorn


class Group(click.Group):
    """Turns our errors into click's one-line `Error: …` with exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ReceiverError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="receiver")
def cli() -> None:
    """Verified, durable webhook receiver for Runflow image evaluations."""


def exit_zero_after_graceful_stop(server: uvicorn.Server) -> None:
    """uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again to the handler
    that was there before it; with this one the process then exits 0 (as `receiver worker`
    does) instead of dying of the signal (143/130, a failure to `docker stop` and most
    supervisors). A signal before uvicorn has taken over exits 0 at once. A second Ctrl-C
    forces uvicorn out without the app's shutdown (the worker's batch in flight is sent again
    once its lease runs out): that exits 130, without the traceback of the shutdown that
    never came."""

    def stop(signum: int, frame: object) -> None:
        if server.force_exit:
            logging.getLogger("receiver").warning(
                "forced to stop: the worker's forwards in flight go out again after their lease"
            )
            logging.shutdown()
            os._exit(130)
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def check_listen(host: str, port: int) -> None:
    """Bind and let go before the banner: a taken port (8000 often is) or a wrong --host
    otherwise shows as a uvicorn log line with exit status 3 after a banner that says it
    serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "choose another port with --port or PORT, or another --host"
        ) from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: $PORT or 8000).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
def serve(host: str, port: int | None, workers: int) -> None:
    """Run the HTTP server: webhook, API and dashboard."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from .app import check_sinks, create_app

    settings = load_settings()
    log_config = logs.configure(settings.log_format, settings.log_level, sys.stderr)
    settings.check_ingest()
    check_sinks(settings)  # a sink that cannot work stops the start here, before any worker
    Store(settings.database, setting=settings.database_setting).migrate()
    port = port or settings.port
    metrics_dir = given_metrics_dir()  # a mistake there stops the start before the banner
    check_listen(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    shown = f"[{shown}]" if ":" in shown else shown  # an IPv6 address, in a URL
    base = f"http://{shown}:{port}"
    click.echo(f"receiver: callback URL  {settings.public_url or base}/webhooks/runflow")
    click.echo(f"receiver: dashboard     {base}/")
    click.echo(f"receiver: database      {settings.database_shown}")
    if settings.dashboard_token_generated:
        click.echo(
            f"receiver: dashboard token {settings.dashboard_token} "
            "(generated; set RECEIVER_DASHBOARD_TOKEN to keep one across restarts)"
        )
    else:
        click.echo("receiver: API token     RECEIVER_DASHBOARD_TOKEN (as Authorization: Bearer)")
    if settings.allow_unsigned:  # else said only once a callback comes, in the logs
        click.echo(
            "receiver: warning       RECEIVER_ALLOW_UNSIGNED=true: callbacks without a"
            " Runflow-Signature are accepted (local development only)"
        )
    for name in settings.short_tokens():  # never the token itself
        click.echo(
            f"receiver: warning       {name} is shorter than {MIN_TOKEN_CHARS} characters:"
            " easy to guess; make one with python -c 'import secrets;"
            " print(secrets.token_urlsafe(24))'"
        )
    if workers == 1:
        app = create_app(settings, metrics_dir=metrics_dir)
        config = uvicorn.Config(
            app, host=host, port=port, http=HTTP_PROTOCOL, log_config=log_config, access_log=False
        )
        server = uvicorn.Server(config)
        exit_zero_after_graceful_stop(server)
        gc.freeze()  # the start-up heap is permanent: full collections stop walking it
        server.run()
        if not server.started:  # as uvicorn.run: the app's start-up failed, and said why
            sys.exit(STARTUP_FAILURE)
        return
    if not is_postgres_url(settings.database):
        click.echo(
            "receiver: note          on SQLite the workers take turns on one write lock:"
            " one process answers more callbacks per second (docs/performance.md)"
        )
    os.environ["RECEIVER_DASHBOARD_TOKEN"] = settings.dashboard_token
    os.environ[STARTED_WITH] = settings.fingerprint()
    supervise(host, port, workers, settings.log_format, settings.log_level)


@cli.command()
def migrate() -> None:
    """Create the database or bring its schema up to date (safe to run again)."""
    settings = load_settings(sinks=False)
    applied = Store(settings.database, setting=settings.database_setting).migrate()
    if applied:
        shown = settings.database_shown
        click.echo(f"applied migrations {', '.join(map(str, applied))} to {shown}")
    else:
        click.echo(f"{settings.database_shown} is up to date")


@cli.command()
def worker() -> None:
    """Run the forwarding worker as its own process (with RECEIVER_WORKER=false on `serve`)."""
    from .app import forwarding, http_client
    from .worker import Worker

    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level, sys.stderr)
    given_metrics_dir()  # its counters go there when set (prometheus-client reads it)

    async def run() -> None:
        store = Store(
            settings.database,
            setting=settings.database_setting,
            forwarding=forwarding(settings),
            pool_size=settings.database_pool_size,
            max_backlog=settings.max_backlog,
        )
        http = http_client()
        runner = Worker.from_settings(settings, store, http)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        store.on_applied(partial(loop.call_soon_threadsafe, runner.notify))
        store.open()
        try:
            await runner.start()
            names = ", ".join(spec.name for spec in settings.sinks) or "none"
            click.echo(f"receiver: worker running (sinks: {names}); Ctrl-C stops it")
            await stop.wait()
        finally:
            await runner.stop()
            await http.aclose()
            store.close()

    asyncio.run(run())


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def backup(path: Path) -> None:
    """Write a consistent copy of the database to PATH while the receiver keeps running."""
    from .store.maintenance import backup as copy

    settings = load_settings(sinks=False)
    if settings.postgres:
        raise click.ClickException(
            "receiver backup copies a SQLite file; on PostgreSQL use pg_dump (see deploy/README.md)"
        )
    existing_database(settings)  # any schema: the copy to keep before `receiver migrate`
    counts = copy(settings.database, path)
    click.echo(
        f"backed up {settings.database} to {path}: {counts['evaluations']} evaluations, "
        f"{counts['deliveries']} deliveries, {counts['outbox']} forwards"
    )


ASK_BELOW = "1d"  # a retention shorter than this empties the dashboard: asked at a terminal


@cli.command()
@click.option("--older-than", "age", required=True, help="Age, e.g. 90d, 12w, 36h.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--yes", "-y", is_flag=True, help=f"Do not ask (asked under {ASK_BELOW} at a terminal)."
)
def prune(age: str, dry_run: bool, yes: bool) -> None:
    """Delete evaluations (with their deliveries, issues and forwards) last touched longer ago
    than --older-than; never one whose forward, refetch or reconciliation is still pending."""
    from .cliutil import writing_store
    from .times import ago

    try:
        cutoff = ago(age)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    settings = load_settings(sinks=False)
    if dry_run:
        counts = reading_store(settings).prune_counts(cutoff)
        click.echo(f"would prune before {cutoff} (nothing deleted): {_pruned(counts)}")
        return
    if not yes and cutoff > ago(ASK_BELOW) and sys.stdin.isatty():
        counts = reading_store(settings).prune_counts(cutoff)  # scripts are never asked
        click.confirm(
            f"--older-than {age} keeps less than {ASK_BELOW}: delete {_pruned(counts)}?",
            abort=True,
        )
    with writing_store(settings, forwards=False) as store:
        counts = asyncio.run(store.prune(cutoff))
    click.echo(f"pruned before {cutoff}: {_pruned(counts)}")


def _pruned(counts: dict[str, int]) -> str:
    return (
        f"{counts['evaluations']} evaluations, {counts['deliveries']} deliveries, "
        f"{counts['forwards']} forwards, {counts['quarantine']} quarantined bodies"
    )


for command in (
    cli_read.query,
    cli_read.show,
    cli_read.stats,
    cli_read.forwards,
    cli_read.replay,
    cli_runflow.sign_command,
    cli_runflow.send_test,
    cli_runflow.refetch,
    cli_runflow.reconcile,
    cli_runflow.submit,
    cli_runflow.feedback,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every user mistake (ours or click's usage errors) exits 1 with one line."""
    try:
        prog_name = program_name(sys.argv[0], sys.executable, os.environ.get("PATH"))
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
