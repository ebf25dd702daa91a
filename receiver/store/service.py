"""What the service forwards, recorded where the CLI can read it. A command that stores a
verdict (refetch, reconcile, feedback, submit) or sends one again (replay, retries) queues its
forwards by its own settings: run where the service's receiver.toml is not (another folder), it
queued none, and the verdict was never sent. Such a command compares first (cliutil).

Only what decides the outbox is recorded: each sink's name, type and filters, and whether
refetches and polls are scheduled; never a URL or a secret."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..times import now
from .apply import Forwarding

KEY = "forwarding"


@dataclass(frozen=True)
class Dropped:
    """What a start found it could not do: forwards made dead per sink, refetches dropped."""

    forwards: dict[str, int]
    refetches: int = 0


def describe(forwarding: Forwarding) -> str:
    """The forwarding as canonical JSON: equal text, equal forwards."""
    sinks = [
        {
            "name": spec.name,
            "type": spec.type,
            "events": sorted(spec.events),
            "only_failures": spec.only_failures,
            "task_types": None if spec.task_types is None else sorted(spec.task_types),
            "client_ref_prefix": spec.client_ref_prefix,
        }
        for spec in forwarding.sinks
    ]
    described = {
        "sinks": sinks,
        "refetch": forwarding.refetch,
        "reconcile_after": forwarding.reconcile_after,
    }
    return json.dumps(described, sort_keys=True, separators=(",", ":"))


def record(conn: sqlite3.Connection, forwarding: Forwarding) -> Dropped:
    """At the start of a process that applies callbacks (serve, worker). The forwards still
    pending for a sink it does not have (removed or renamed in receiver.toml) become dead: no
    loop sends them, so they stayed pending for ever, and kept their evaluations from being
    pruned. Dead, they show as dead letters, and `forwards --retry-all-dead` sends them once
    the sink is configured again. Likewise, with refetch off, pending refetches are dropped
    (their forwards waited out the refetch budget)."""
    stamp = now()
    conn.execute(
        "INSERT INTO service (name, value, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at",
        (KEY, describe(forwarding), stamp),
    )
    names = [spec.name for spec in forwarding.sinks]
    others = f" AND sink NOT IN ({', '.join('?' * len(names))})" if names else ""
    abandoned: dict[str, int] = {}
    for (sink,) in conn.execute(
        "UPDATE outbox SET state = 'dead', last_error = 'the sink is not in receiver.toml',"
        f" updated_at = ? WHERE state = 'pending'{others} RETURNING sink",
        (stamp, *names),
    ).fetchall():
        abandoned[sink] = abandoned.get(sink, 0) + 1
    if forwarding.refetch:
        return Dropped(abandoned)
    dropped = conn.execute(  # switched off (no API key, embeds off): none would be done
        "UPDATE evaluations SET refetch_state = NULL, refetch_next_at = NULL"
        " WHERE refetch_state = 'pending'"
    ).rowcount
    return Dropped(abandoned, dropped)


def recorded(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM service WHERE name = ?", (KEY,)).fetchone()
    return None if row is None else str(row[0])


def differs(service: str, mine: Forwarding) -> str | None:
    """Why a command with the forwarding `mine` must not write for the service recorded as
    `service`, or None when they agree."""
    if service == describe(mine):
        return None
    theirs, ours = _summary(json.loads(service)), _summary(json.loads(describe(mine)))
    if theirs == ours:
        ours += ", other filters"
    return (
        f"the service forwards with other settings than this command's (service: {theirs};"
        f" here: {ours}), so the verdicts it stores would not go"
        " to the service's sinks: run it with the service's settings (its .env and"
        " receiver.toml: in its folder, or with RECEIVER_CONFIG)"
    )


def _summary(described: dict[str, Any]) -> str:
    sinks = ", ".join(f"{sink['name']} ({sink['type']})" for sink in described["sinks"])
    return (
        f"sinks {sinks or 'none'}, refetch {'on' if described['refetch'] else 'off'},"
        f" polls after {described['reconcile_after']:g}s"
    )
