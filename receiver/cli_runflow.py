"""Commands that talk to Runflow (or act like it): sign, send-test, refetch, reconcile,
submit, feedback."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import click
import httpx

from .cliutil import command_line, echo_json, first_secret, load_settings, writing_store
from .feedback import RATINGS, send_feedback
from .normalize import normalize
from .signing import sign
from .store import Store
from .times import now


@click.command(name="sign")
@click.argument("file", type=click.File("rb"))
@click.option("--secret", help="Signing secret (default: first of RUNFLOW_WEBHOOK_SECRET).")
def sign_command(file: Any, secret: str | None) -> None:
    """Print the Runflow-Signature of FILE's exact bytes (`-` reads stdin)."""
    click.echo(sign(file.read(), first_secret(secret)))


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


@click.command(name="send-test")
@click.argument("url", required=False)
@click.option("--event", type=click.Choice(["completed", "failed"]), default="completed")
@click.option("--client-ref", default="send-test", show_default=True)
@click.option("--secret", help="Signing secret (default: first of RUNFLOW_WEBHOOK_SECRET).")
def send_test(url: str | None, event: str, client_ref: str, secret: str | None) -> None:
    """POST a signed sample callback to URL (default: this machine's receiver)."""
    settings = load_settings(sinks=False)
    url = url or f"http://127.0.0.1:{settings.port}/webhooks/runflow"
    body = json.dumps(sample_callback(event, client_ref)).encode()
    headers = {
        "content-type": "application/json",
        "runflow-signature": sign(body, first_secret(secret)),
        "runflow-request-id": f"send-test-{uuid.uuid4()}",
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=10)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code != 200:
        raise click.ClickException(f"{url} refused the callback")
    try:
        evaluation_id = response.json()["evaluation_id"]
    except (ValueError, TypeError, KeyError):
        raise click.ClickException(f"{url} answered 200, but not as a receiver does") from None
    click.echo(f"see it: {command_line('show', evaluation_id)}")


@click.command()
@click.argument("evaluation_id")
def refetch(evaluation_id: str) -> None:
    """Fetch an evaluation from the Runflow API now and store it as the current state."""
    from .app import http_client
    from .runflow import client_for

    settings = load_settings()

    async def run(store: Store) -> str | None:
        async with http_client() as http:
            client = client_for(settings, http)
            found = await client.get_evaluation(evaluation_id, settings.refetch_embeds)
        return await store.refetched(normalize(found).fields, now())

    with writing_store(settings) as store:
        lagging = asyncio.run(run(store))
    if lagging:
        raise click.ClickException(f"{evaluation_id} not stored: {lagging}; try again later")
    click.echo(f"refetched {evaluation_id}; see: {command_line('show', evaluation_id)}")


@click.command()
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


@click.command()
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

    with writing_store(settings, create=True) as store:
        evaluation = asyncio.run(run(store))
    if as_json:
        echo_json(evaluation)
        return
    click.echo(
        f"submitted {evaluation['id']} ({evaluation.get('status_code')}); "
        f"Runflow calls back {request['callback_url']}"
    )


@click.command()
@click.argument("evaluation_id")
@click.option("--up", is_flag=True, help="Thumbs up.")
@click.option("--down", is_flag=True, help="Thumbs down.")
@click.option("--clear", is_flag=True, help="Remove the rating.")
@click.option("--reason", help="Why (1-2000 characters; dropped with --clear).")
def feedback(evaluation_id: str, up: bool, down: bool, clear: bool, reason: str | None) -> None:
    """Rate an evaluation in Runflow and store what Runflow answers."""
    # Separate flags, not one option: with a shared one, `--up --down` sent the last.
    said = [name for name, given in (("up", up), ("down", down), ("clear", clear)) if given]
    if len(said) != 1:
        flags = " and ".join(f"--{name}" for name in said)
        raise click.ClickException(
            "say one of --up, --down or --clear" + (f", not {flags}" if said else "")
        )
    rating = said[0]
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
