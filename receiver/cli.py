"""The `receiver` command. User mistakes end with one line on stderr and exit status 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx

from .config import Settings
from .errors import ReceiverError
from .feedback import RATINGS, send_feedback
from .normalize import STATUSES
from .signing import sign
from .store import EvaluationFilter, Store
from .store.outbox import STATES
from .times import now, parse_moment


class Group(click.Group):
    """Turns our errors into click's one-line `Error: …` with exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ReceiverError as exc:
            raise click.ClickException(str(exc)) from None


def load_settings() -> Settings:
    return Settings.from_env()


def reading_store(settings: Settings) -> Store:
    if not Path(settings.database).exists():
        raise click.ClickException(
            f"no database at {settings.database!r} (RECEIVER_DATABASE); "
            "run `receiver serve` or `receiver migrate` first"
        )
    store = Store(settings.database)
    store.migrate()
    return store


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="receiver")
def cli() -> None:
    """Verified, durable webhook receiver for Runflow image evaluations."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: $PORT or 8000).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
def serve(host: str, port: int | None, workers: int) -> None:
    """Run the HTTP server: webhook, API and dashboard."""
    import uvicorn

    from .app import create_app

    settings = load_settings()
    settings.check_ingest()
    Store(settings.database).migrate()
    port = port or settings.port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    base = f"http://{shown}:{port}"
    click.echo(f"receiver: callback URL  {settings.public_url or base}/webhooks/runflow")
    click.echo(f"receiver: dashboard     {base}/")
    click.echo(f"receiver: database      {settings.database}")
    if settings.dashboard_token_generated:
        click.echo(
            f"receiver: dashboard token {settings.dashboard_token} "
            "(generated; set RECEIVER_DASHBOARD_TOKEN to keep one across restarts)"
        )
    else:
        click.echo("receiver: API token     RECEIVER_DASHBOARD_TOKEN (as Authorization: Bearer)")
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port)
    else:
        os.environ["RECEIVER_DASHBOARD_TOKEN"] = settings.dashboard_token
        uvicorn.run("receiver.app:from_env", factory=True, host=host, port=port, workers=workers)


@cli.command()
def migrate() -> None:
    """Create the database or bring its schema up to date (safe to run again)."""
    settings = load_settings()
    applied = Store(settings.database).migrate()
    if applied:
        click.echo(f"applied migrations {', '.join(map(str, applied))} to {settings.database}")
    else:
        click.echo(f"{settings.database} is up to date")


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else parse_moment(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@cli.command()
@click.option("--client-ref", help="Exact client_ref.")
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--passed/--failed", "passed", default=None, help="Verdict passed or not.")
@click.option("--task-type")
@click.option("--failure-code")
@click.option("--since", callback=_moment, help="ISO time or duration ago (24h, 7d).")
@click.option("--until", callback=_moment, help="ISO time or duration ago.")
@click.option("--search", "q", help="Text search in id, client_ref, task type, issues.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def query(as_json: bool, limit: int, **filters: Any) -> None:
    """List evaluations, newest first."""
    items, _ = reading_store(load_settings()).list_evaluations(EvaluationFilter(**filters), limit)
    if as_json:
        echo_json(items)
        return
    header = ("id", "client_ref", "status", "passed", "score", "task_type", "received_at")
    table = [header] + [
        (*(_cell(item[key]) for key in header[:-1]), item["received_at"][:19]) for item in items
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not items:
        click.echo("(no evaluations match)")


@cli.command()
@click.argument("evaluation_id")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def show(evaluation_id: str, as_json: bool) -> None:
    """Everything about one evaluation: verdict, issues, deliveries, forwards."""
    found = reading_store(load_settings()).get_evaluation(evaluation_id)
    if found is None:
        raise click.ClickException(f"no evaluation {evaluation_id!r}")
    if as_json:
        echo_json(found)
        return
    ev = found["evaluation"]
    verdict = {True: "passed", False: "not passed", None: "no verdict"}[ev["passed"]]
    lines = [
        f"evaluation   {ev['id']}",
        f"client_ref   {_cell(ev['client_ref'])}",
        f"status       {_cell(ev['status'])}"
        + (f" ({ev['failure_code']})" if ev["failure_code"] else ""),
        f"verdict      {verdict}, score {_cell(ev['score'])}",
        f"task_type    {_cell(ev['task_type'])}",
        f"attempt      {_cell(ev['attempt_number'])}"
        + (f", parent {ev['parent_evaluation_id']}" if ev["parent_evaluation_id"] else "")
        + (", superseded" if ev["superseded"] else ""),
        f"completed_at {_cell(ev['completed_at'])}",
        f"received_at  {ev['received_at']}",
    ]
    lines += [f"top issue    {label}" for label in ev["top_issues"]]
    lines += [
        f"issue        {i['category']}/{i['subcategory']}: {i['detail']} (judge {i['judge']})"
        for i in found["issues"]
    ]
    lines += [
        f"delivery     #{d['id']} {d['received_at']} {d['source']} {d['outcome']}"
        f" receipts={d['receipts']} request_id={_cell(d['request_id'])}"
        for d in found["deliveries"]
    ]
    lines += [
        f"forward      #{f['id']} {f['sink']} {f['state']} attempts={f['attempts']}"
        for f in found["forwards"]
    ]
    click.echo("\n".join(lines))


@cli.command()
@click.option("--since", callback=_moment, help="ISO time or duration ago (24h, 7d).")
@click.option("--task-type")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(since: str | None, task_type: str | None, as_json: bool) -> None:
    """Counts, pass rate and top issues."""
    result = reading_store(load_settings()).stats(
        EvaluationFilter(since=since, task_type=task_type)
    )
    if as_json:
        echo_json(result)
        return
    rate = "-" if result["pass_rate"] is None else f"{result['pass_rate']:.1%}"
    click.echo(f"evaluations  {result['total']}")
    for status, number in sorted(result["by_status"].items()):
        click.echo(f"  {status:<10} {number}")
    click.echo(f"pass rate    {rate} ({result['passed']} passed, {result['not_passed']} not)")
    click.echo(f"mean score   {_cell(result['mean_score'])}")
    for row in result["failure_codes"]:
        click.echo(f"failure      {row['failure_code']}: {row['count']}")
    for row in result["top_issues"][:10]:
        click.echo(f"top issue    {row['label']}: {row['count']}")


def _first_secret(secret: str | None) -> str:
    if secret:
        return secret
    secrets = load_settings().webhook_secrets
    if not secrets:
        raise click.ClickException(
            "no secret: pass --secret or set RUNFLOW_WEBHOOK_SECRET (whsec_...)"
        )
    return secrets[0]


@cli.command(name="sign")
@click.argument("file", type=click.File("rb"))
@click.option("--secret", help="Signing secret (default: first of RUNFLOW_WEBHOOK_SECRET).")
def sign_command(file: Any, secret: str | None) -> None:
    """Print the Runflow-Signature of FILE's exact bytes (`-` reads stdin)."""
    click.echo(sign(file.read(), _first_secret(secret)))


def sample_callback(event: str, client_ref: str) -> dict[str, Any]:
    """A bare evaluation object like the ones Runflow sends."""
    stamp = datetime.now(UTC).isoformat()
    passed = event == "completed"
    return {
        "id": str(uuid.uuid4()),
        "status_code": event,
        "task_type": "headshot",
        "generation_prompt": "studio lighting, neutral grey background, navy blazer",
        "generated_image_url": "https://cdn.example.com/renders/sample.png",
        "overall_passed": False if passed else None,
        "weighted_pass_rate": 0.62 if passed else None,
        "top_issues": ["Left hand has six fingers", "Collar asymmetry"] if passed else None,
        "failure_code": None if passed else "invalid_media",
        "attempt_number": 1,
        "parent_evaluation_id": None,
        "superseded_at": None,
        "client_ref": client_ref,
        "created_at": stamp,
        "updated_at": stamp,
        "completed_at": stamp,
    }


@cli.command(name="send-test")
@click.argument("url", required=False)
@click.option("--event", type=click.Choice(["completed", "failed"]), default="completed")
@click.option("--client-ref", default="send-test", show_default=True)
@click.option("--secret", help="Signing secret (default: first of RUNFLOW_WEBHOOK_SECRET).")
def send_test(url: str | None, event: str, client_ref: str, secret: str | None) -> None:
    """POST a signed sample callback to URL (default: this machine's receiver)."""
    settings = load_settings()
    url = url or f"http://127.0.0.1:{settings.port}/webhooks/runflow"
    body = json.dumps(sample_callback(event, client_ref)).encode()
    headers = {
        "content-type": "application/json",
        "runflow-signature": sign(body, _first_secret(secret)),
        "runflow-request-id": f"send-test-{uuid.uuid4()}",
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code != 200:
        raise click.ClickException(f"{url} refused the callback")
    click.echo(f"see it: receiver show {response.json()['evaluation_id']}")


@contextlib.contextmanager
def writing_store(settings: Settings) -> Iterator[Store]:
    """The store with its writer running, for commands that change something."""
    from .app import forwarding

    store = Store(settings.database, forwarding=forwarding(settings))
    store.open()
    try:
        yield store
    finally:
        store.close()


@cli.command()
def worker() -> None:
    """Run the forwarding worker as its own process (with RECEIVER_WORKER=false on `serve`)."""
    from .app import forwarding, http_client
    from .worker import Worker

    settings = load_settings()

    async def run() -> None:
        store = Store(settings.database, forwarding=forwarding(settings))
        http = http_client()
        runner = Worker.from_settings(settings, store, http)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
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
@click.option("--dead", is_flag=True, help="Only dead letters.")
@click.option("--state", type=click.Choice(STATES), help="Only this state.")
@click.option("--sink", help="Only this sink.")
@click.option("--retry", "retry_id", type=int, metavar="ID", help="Send forward ID again.")
@click.option("--retry-all-dead", is_flag=True, help="Send every dead forward again.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def forwards(
    dead: bool,
    state: str | None,
    sink: str | None,
    retry_id: int | None,
    retry_all_dead: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List forwards (the outbox), or send dead ones again."""
    settings = load_settings()
    if retry_id is not None or retry_all_dead:
        with writing_store(settings) as store:
            if retry_id is not None:
                asyncio.run(store.retry_forward(retry_id, now()))
                click.echo(f"forward {retry_id} is pending again")
            else:
                count = asyncio.run(store.retry_dead(now(), sink))
                click.echo(f"{count} dead forward(s) pending again")
        return
    items = reading_store(settings).list_forwards(
        state="dead" if dead else state, sink=sink, limit=limit
    )
    if as_json:
        echo_json(items)
        return
    for item in items:
        click.echo(
            f"#{item['id']} {item['sink']} {item['state']} attempts={item['attempts']}"
            f" {item['event_type']} {item['evaluation_id']}"
            + (f" error: {item['last_error']}" if item["last_error"] else "")
        )
    if not items:
        click.echo("(no forwards match)")


@cli.command()
@click.argument("delivery_id", type=int)
def replay(delivery_id: int) -> None:
    """Forward a stored delivery's verdict again to every sink that wants it."""
    with writing_store(load_settings()) as store:
        queued = asyncio.run(store.replay_delivery(delivery_id, now()))
    click.echo(f"delivery {delivery_id}: {queued} forward(s) queued (same event ids)")


@cli.command()
@click.argument("evaluation_id")
def refetch(evaluation_id: str) -> None:
    """Fetch an evaluation from the Runflow API now and store it as the current state."""
    from .app import http_client
    from .runflow import client_for

    settings = load_settings()

    async def run(store: Store) -> None:
        async with http_client() as http:
            client = client_for(settings, http)
            found = await client.get_evaluation(evaluation_id, settings.refetch_embeds)
        if not isinstance(found, dict) or found.get("id") != evaluation_id:
            raise click.ClickException("Runflow answered with a different or malformed evaluation")
        await store.refetched(found, now())

    with writing_store(settings) as store:
        asyncio.run(run(store))
    click.echo(f"refetched {evaluation_id}; see: receiver show {evaluation_id}")


@cli.command()
def reconcile() -> None:
    """Run one reconciliation pass now: poll evaluations stuck non-terminal."""
    from .app import http_client
    from .runflow import client_for
    from .worker import Worker

    settings = load_settings()

    async def run(store: Store) -> dict[str, int]:
        async with http_client() as http:
            client_for(settings, http)  # a missing RUNFLOW_API_KEY is named here
            return await Worker.from_settings(settings, store, http).reconcile()

    with writing_store(settings) as store:
        counts = asyncio.run(run(store))
    click.echo(
        f"polled {counts['polled']}: {counts['verdicts']} verdict(s) stored, "
        f"{counts['pending']} still pending, {counts['errors']} error(s)"
    )


@cli.command()
@click.argument("image_url")
@click.option("--task-type", required=True, help="What the image is for (1-100 characters).")
@click.option("--client-ref", help="Your correlation label (at most 255 characters).")
@click.option("--prompt", "generation_prompt", help="The prompt the image was generated from.")
@click.option("--description", "task_description", help="What a good image shows.")
@click.option("--instructions", "evaluation_instructions", help="Extra instructions for judges.")
@click.option("--reference", "references", multiple=True, help="Reference image URL (up to 4).")
@click.option("--idempotency-key", help="Default: derived from the request, so a retry is safe.")
@click.option("--json", "as_json", is_flag=True, help="Print Runflow's answer as JSON.")
def submit(
    image_url: str,
    references: tuple[str, ...],
    idempotency_key: str | None,
    as_json: bool,
    **fields: str | None,
) -> None:
    """Submit an image to Runflow for evaluation, with this receiver as the callback URL."""
    from .app import http_client
    from .runflow import client_for

    settings = load_settings()
    if not settings.public_url:
        raise click.ClickException(
            "RECEIVER_PUBLIC_URL is not set: Runflow calls back "
            "RECEIVER_PUBLIC_URL/webhooks/runflow"
        )
    request: dict[str, Any] = {
        "generated_image_url": image_url,
        "callback_url": f"{settings.public_url}/webhooks/runflow",
        **{name: value for name, value in fields.items() if value is not None},
    }
    if references:
        request["reference_images"] = [{"url": url} for url in references]

    async def run(store: Store) -> dict[str, Any]:
        async with http_client() as http:
            evaluation = await client_for(settings, http).submit(request, idempotency_key)
        await store.record(evaluation, "submit", now())
        return evaluation

    with writing_store(settings) as store:
        evaluation = asyncio.run(run(store))
    if as_json:
        echo_json(evaluation)
        return
    click.echo(
        f"submitted {evaluation['id']} ({evaluation.get('status_code')}); "
        f"Runflow calls back {request['callback_url']}"
    )


@cli.command()
@click.argument("evaluation_id")
@click.option("--up", "rating", flag_value="up", help="Thumbs up.")
@click.option("--down", "rating", flag_value="down", help="Thumbs down.")
@click.option("--clear", "rating", flag_value="clear", help="Remove the rating.")
@click.option("--reason", help="Why (1-2000 characters; dropped with --clear).")
def feedback(evaluation_id: str, rating: str | None, reason: str | None) -> None:
    """Rate an evaluation in Runflow and store what Runflow answers."""
    if rating is None:
        raise click.ClickException("say --up, --down or --clear")
    from .app import http_client

    settings = load_settings()

    async def run(store: Store) -> dict[str, Any]:
        async with http_client() as http:
            return await send_feedback(
                settings, store, http, evaluation_id, RATINGS[rating], reason
            )

    with writing_store(settings) as store:
        evaluation = asyncio.run(run(store))
    shown = {True: "up", False: "down", None: "cleared"}[evaluation.get("feedback_is_positive")]
    click.echo(f"feedback on {evaluation_id}: {shown}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every user mistake (ours or click's usage errors) exits 1 with one line."""
    try:
        cli.main(args=argv, prog_name="receiver", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
