"""Commands that read the store or act on the outbox: query, show, stats, forwards, replay."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from .api import MAX_ROW_ID, forwards_after
from .cliutil import (
    cell,
    echo_json,
    load_settings,
    moment,
    reading_store,
    say,
    visible,
    writing_store,
)
from .normalize import STATUSES
from .store import EvaluationFilter, Store
from .store.outbox import STATES
from .times import now

ROW_ID = click.IntRange(1, MAX_ROW_ID)  # a larger number overflowed the query: a traceback

F = TypeVar("F", bound=Callable[..., Any])


def _given(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    """An empty text filter is refused, as the API refuses it: `--search ""` listed every
    evaluation and `--client-ref ""` none."""
    if value == "":
        raise click.BadParameter("must not be empty: leave the option out for no filter")
    return value


FILTERS = (
    click.option("--client-ref", callback=_given, help="Exact client_ref."),
    click.option("--status", type=click.Choice(STATUSES)),
    # Two flags, not a --passed/--failed pair: with a pair, `--passed --failed` took the last.
    click.option("--passed", "only_passed", is_flag=True, help="Verdict passed."),
    click.option(
        "--failed",
        "only_failed",
        is_flag=True,
        help="Verdict not passed (the dashboard's 'not passed'; for status failed, "
        "--status failed).",
    ),
    click.option("--task-type", callback=_given),
    click.option("--failure-code", callback=_given),
    click.option("--since", callback=moment, help="ISO time or duration ago (24h, 7d)."),
    click.option("--until", callback=moment, help="ISO time or duration ago."),
    click.option(
        "--search",
        "q",
        callback=_given,
        help="Text search: part of the id, client_ref, task type, failure code or a top issue.",
    ),
)


def page_options(command: F) -> F:
    """--limit and --cursor, as the API's `limit` and `cursor`, and --json."""
    for option in reversed(
        (
            click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True),
            click.option(
                "--cursor", metavar="CURSOR", help="Where the next page starts (printed last)."
            ),
            click.option("--json", "as_json", is_flag=True, help="Print JSON."),
        )
    ):
        command = option(command)
    return command


def _next_page(next_cursor: str | None, as_json: bool) -> None:
    """The option that continues a list cut at --limit: the table's last line; with --json on
    stderr, so stdout stays the JSON list it has always been."""
    if next_cursor is not None:
        click.echo(f"(more: repeat with --cursor {next_cursor})", err=as_json)


def evaluation_filters(command: F) -> F:
    """The filters of GET /api/evaluations, which /api/stats takes too: `query` and `stats`
    offer the same ones, `--passed` and `--failed` given to `command` as `passed`."""

    @functools.wraps(command)
    def filtered(*args: Any, only_passed: bool, only_failed: bool, **kwargs: Any) -> Any:
        if only_passed and only_failed:
            raise click.UsageError("--passed and --failed exclude each other: give one of them")
        kwargs["passed"] = True if only_passed else False if only_failed else None
        return command(*args, **kwargs)

    for option in reversed(FILTERS):
        filtered = option(filtered)
    return cast(F, filtered)


@click.command()
@evaluation_filters
@page_options
def query(as_json: bool, limit: int, cursor: str | None, **filters: Any) -> None:
    """List evaluations, newest first."""
    items, next_cursor = reading_store(load_settings(sinks=False)).list_evaluations(
        EvaluationFilter(**filters), limit, cursor
    )
    if as_json:
        echo_json(items)
        _next_page(next_cursor, as_json)
        return
    header = (
        "id",
        "client_ref",
        "status",
        "passed",
        "score",
        "task_type",
        "failure_code",  # why a failed one failed, as the dashboard's list shows
        "received_at",
    )
    table = [header] + [
        (*(visible(cell(item[key])) for key in header[:-1]), item["received_at"][:19])
        for item in items
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not items:
        click.echo("(no evaluations match)")
    _next_page(next_cursor, as_json)


@click.command()
@click.argument("evaluation_id")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def show(evaluation_id: str, as_json: bool) -> None:
    """Everything about one evaluation: verdict, issues, deliveries, forwards."""
    found = reading_store(load_settings(sinks=False)).get_evaluation(evaluation_id)
    if found is None:
        raise click.ClickException(f"no evaluation {evaluation_id!r}")
    if as_json:
        echo_json(found)
        return
    ev = found["evaluation"]
    verdict = {True: "passed", False: "not passed", None: "no verdict"}[ev["passed"]]
    lines = [
        f"evaluation   {ev['id']}",
        f"client_ref   {cell(ev['client_ref'])}",
        f"status       {cell(ev['status'])}"
        + (f" ({ev['failure_code']})" if ev["failure_code"] else ""),
        f"verdict      {verdict}, score {cell(ev['score'])}",
        f"task_type    {cell(ev['task_type'])}",
        f"attempt      {cell(ev['attempt_number'])}"
        + (f", parent {ev['parent_evaluation_id']}" if ev["parent_evaluation_id"] else "")
        + (", superseded" if ev["superseded"] else ""),
        f"completed_at {cell(ev['completed_at'])}",
        f"received_at  {ev['received_at']}",
    ]
    if refetch := ev["refetch"]:
        lines.append(
            f"refetch      {refetch['state']} attempts={refetch['attempts']}"
            + (f" error: {refetch['error']}" if refetch["error"] else "")
        )
    lines += [f"top issue    {label}" for label in ev["top_issues"]]
    lines += [
        f"issue        {i['category']}/{i['subcategory']}: {i['detail']} (judge {i['judge']})"
        for i in found["issues"]
    ]
    lines += [
        f"delivery     #{d['id']} {d['received_at']} {d['source']} {d['outcome']}"
        f" receipts={d['receipts']} request_id={cell(d['request_id'])}"
        for d in found["deliveries"]
    ]
    lines += [
        f"forward      #{f['id']} {f['sink']} {f['state']} attempts={f['attempts']}" + _error_of(f)
        for f in found["forwards"]
    ]
    for line in lines:
        say(line)


@click.command()
@evaluation_filters
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(as_json: bool, **filters: Any) -> None:
    """Counts, pass rate and top issues of the evaluations the filters select."""
    result = reading_store(load_settings(sinks=False)).stats(EvaluationFilter(**filters))
    if as_json:
        echo_json(result)
        return
    rate = "-" if result["pass_rate"] is None else f"{result['pass_rate']:.1%}"
    click.echo(f"evaluations  {result['total']}")
    for status, number in sorted(result["by_status"].items()):
        click.echo(f"  {status:<10} {number}")
    click.echo(f"pass rate    {rate} ({result['passed']} passed, {result['not_passed']} not)")
    click.echo(f"mean score   {cell(result['mean_score'])}")
    for row in result["failure_codes"]:
        say(f"failure      {row['failure_code']}: {row['count']}")
    for row in result["top_issues"][:10]:
        say(f"top issue    {row['label']}: {row['count']}")


@click.command()
@click.option("--dead", is_flag=True, help="Only dead letters.")
@click.option("--state", type=click.Choice(STATES), help="Only this state.")
@click.option("--sink", help="Only this sink.")
@click.option("--retry", "retry_id", type=ROW_ID, metavar="ID", help="Send forward ID again.")
@click.option("--retry-all-dead", is_flag=True, help="Send every dead forward again.")
@page_options
def forwards(
    dead: bool,
    state: str | None,
    sink: str | None,
    retry_id: int | None,
    retry_all_dead: bool,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List forwards (the outbox), or send dead ones again."""
    # Each of these pairs used to do one and drop the other without a word.
    if retry_id is not None and retry_all_dead:
        raise click.UsageError("give --retry ID or --retry-all-dead, not both")
    if retry_id is not None and (dead or state or sink):  # they were dropped without a word
        raise click.UsageError("--retry ID names its forward: not with --dead, --state or --sink")
    if retry_all_dead and state not in (None, "dead"):
        raise click.UsageError(f"--retry-all-dead sends the dead forwards: not --state {state}")
    if dead and state not in (None, "dead"):
        raise click.UsageError(f"--dead lists the dead forwards: not with --state {state}")
    if retry_id is not None or retry_all_dead:  # only to sinks the configuration still has
        with writing_store(load_settings()) as store:
            if retry_id is not None:
                asyncio.run(store.retry_forward(retry_id, now()))
                click.echo(f"forward {retry_id} is pending again")
            else:
                count = asyncio.run(store.retry_dead(now(), sink))
                click.echo(f"{count} dead forward(s) pending again")
                _left_dead(store)
        return
    store = reading_store(load_settings(sinks=False))
    items = store.list_forwards(  # one more: is there a next page?
        state="dead" if dead else state, sink=sink, limit=limit + 1, after=forwards_after(cursor)
    )
    next_cursor = str(items[limit - 1]["id"]) if len(items) > limit else None
    items = items[:limit]
    if as_json:
        echo_json(items)
        _next_page(next_cursor, as_json)
        return
    for item in items:
        say(
            f"#{item['id']} {item['sink']} {item['state']} attempts={item['attempts']}"
            f" {item['event_type']} {item['evaluation_id']}" + _error_of(item)
        )
    if not items:
        click.echo("(no forwards match)")
    _next_page(next_cursor, as_json)


def _left_dead(store: Store) -> None:
    """Say which dead forwards were left, as their sinks are not in this configuration: run
    from another folder, the CLI finds another receiver.toml, or none."""
    configured = {spec.name for spec in store.forwarding.sinks}
    left = {
        sink: states["dead"]
        for sink, states in store.outbox_depth().items()
        if sink not in configured and states.get("dead")
    }
    if left:
        named = ", ".join(f"{count} of {sink!r}" for sink, count in sorted(left.items()))
        click.echo(
            f"left dead: {named}, a sink not in this configuration"
            " (RECEIVER_CONFIG: is it the service's?)",
            err=True,
        )


def _error_of(forward: dict[str, Any]) -> str:
    """Why a forward is dead or being retried, as the dashboard shows it."""
    return f" error: {forward['last_error']}" if forward["last_error"] else ""


@click.command()
@click.argument("delivery_id", type=ROW_ID)
def replay(delivery_id: int) -> None:
    """Forward a stored delivery's verdict again to every sink that wants it."""
    with writing_store(load_settings()) as store:
        queued = asyncio.run(store.replay_delivery(delivery_id, now()))
    click.echo(f"delivery {delivery_id}: {queued} forward(s) queued (same event ids)")
