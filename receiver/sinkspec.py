"""Sink specs from `receiver.toml` (design.md §6): validated, `env:NAME` resolved, filters (pure).

A mistake names the sink and the key, e.g. `sink 'ops-slack': url: ...`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

EVENTS = ("evaluation.completed", "evaluation.failed")
MAX_TIMEOUT = 600  # seconds: an http sink's longest `timeout`
COMMON_KEYS = frozenset(
    {
        "name",
        "type",
        "url",
        "events",
        "only_failures",
        "task_types",
        "client_ref_prefix",
        "max_attempts",
    }
)
# type → (URL schemes, its own keys with their defaults)
TYPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "slack": (("https://", "http://"), {}),
    "discord": (("https://", "http://"), {}),
    "http": (("https://", "http://"), {"secret": None, "private_key": None, "timeout": 10}),
    "redis": (
        ("redis://", "rediss://", "unix://"),
        {"stream": "runflow:evaluations", "maxlen": 100000},
    ),
    "rabbitmq": (("amqp://", "amqps://"), {"exchange": "runflow.evaluations"}),
    "nats": (("nats://", "tls://"), {"subject": "runflow.evaluations", "stream": None}),
}


@dataclass(frozen=True)
class SinkSpec:
    name: str
    type: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)
    events: frozenset[str] = frozenset(EVENTS)
    only_failures: bool = False
    task_types: frozenset[str] | None = None
    client_ref_prefix: str | None = None
    max_attempts: int | None = None

    def matches(
        self,
        event: str,
        status: str | None,
        passed: bool | None,
        task_type: str | None,
        client_ref: str | None,
    ) -> bool:
        """Whether this sink wants the verdict. An unknown task_type (callback without it,
        not refetched yet) does not exclude: the worker checks again after refetch."""
        if event not in self.events:
            return False
        if self.only_failures and not (status == "failed" or passed is False):
            return False
        if (
            self.task_types is not None
            and task_type is not None
            and task_type not in self.task_types
        ):
            return False
        return self.client_ref_prefix is None or (client_ref or "").startswith(
            self.client_ref_prefix
        )


def _resolve(value: Any, where: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("env:"):
        name = value.removeprefix("env:")
        if not env.get(name):
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return env[name]
    return value


def _strings(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    if not value:  # a filter that lets nothing through: the sink would get nothing, silently
        raise ConfigError(f"{where} is empty, so the sink would get nothing; leave it out for all")
    return frozenset(value)


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    try:
        port = parts.port  # None when not given
    except ValueError:  # not a number, or past 65535
        port = 0
    if port == 0:
        raise ConfigError(f"{where}: url's port must be a number from 1 to 65535")
    if not parts.hostname and parts.scheme != "unix":
        raise ConfigError(f"{where}: url has no host")


def _any(value: Any) -> str | None:
    return None


def _count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be a whole number, 0 or more"


def _name(value: Any) -> str | None:
    ok = isinstance(value, str) and value != "" and not any(c.isspace() for c in value)
    return None if ok else "must be a non-empty string without spaces"


def _subject(value: Any) -> str | None:
    if problem := _name(value):
        return problem
    return "must name subjects, without the wildcards * and >" if set("*>") & set(value) else None


def _stream(value: Any) -> str | None:  # a JetStream name: none, or no dots and no wildcards
    if value is None or (not (problem := _name(value)) and not set(".*>") & set(value)):
        return None
    return problem or "must not contain . * or >"


def parse_seconds(value: object) -> float:
    """An http sink's `timeout`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of seconds")
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise ValueError(f"must be more than 0 and at most {MAX_TIMEOUT} seconds")
    return float(value)


def _problem(parse: Callable[[Any], object], value: Any) -> str | None:
    """What `parse`, which the sink runs when built, finds wrong with a set value: the same
    reason, given here with the file's name, before anything starts."""
    if value is None:
        return None
    try:
        parse(value)
    except ValueError as exc:
        return str(exc)
    return None


def _seconds(value: Any) -> str | None:
    return _problem(parse_seconds, value)


# An http sink's signing keys. webhook_signing brings in cryptography (~7 MB of resident
# memory), so it is imported only for a sink that signs, as build_sink imports only the
# sinks configured.
def _secret(value: Any) -> str | None:
    if value is None:
        return None
    from .webhook_signing import parse_secret

    return _problem(parse_secret, value)


def _private_key(value: Any) -> str | None:
    if value is None:
        return None
    from .webhook_signing import parse_private_key

    return _problem(parse_private_key, value)


# (type, option) → what is wrong with a value, if anything; checked when the file is read, so
# a mistake stops the start instead of failing every delivery.
OPTION_CHECKS: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("http", "secret"): _secret,
    ("http", "private_key"): _private_key,
    ("http", "timeout"): _seconds,
    ("redis", "stream"): _name,
    ("redis", "maxlen"): _count,
    ("rabbitmq", "exchange"): _name,
    ("nats", "subject"): _subject,
    ("nats", "stream"): _stream,
}


def parse_sink(raw: Mapping[str, Any], env: Mapping[str, str], index: int) -> SinkSpec:
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"sink #{index + 1}: name is required (a unique string)")
    where = f"sink {name!r}"
    kind = raw.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    schemes, own = TYPES[kind]
    unknown = set(raw) - COMMON_KEYS - set(own)
    if unknown:
        allowed = ", ".join(sorted(COMMON_KEYS | set(own)))
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected: {allowed})")
    url = _resolve(raw.get("url"), f"{where}: url", env)
    if not isinstance(url, str) or not url.startswith(schemes):
        raise ConfigError(f"{where}: url must start with {' or '.join(schemes)}")
    _check_url(url, where)  # never quoted: it may hold a password or a webhook's secret path
    options = {
        key: _resolve(raw.get(key, default), f"{where}: {key}", env) for key, default in own.items()
    }
    for key, value in options.items():
        problem = OPTION_CHECKS.get((kind, key), _any)(value)
        if problem:
            raise ConfigError(f"{where}: {key} {problem}")
    events = _strings(raw.get("events", list(EVENTS)), f"{where}: events")
    if not events <= set(EVENTS):
        raise ConfigError(f"{where}: events may contain only {', '.join(EVENTS)}")
    only_failures = raw.get("only_failures", False)
    if not isinstance(only_failures, bool):
        raise ConfigError(f"{where}: only_failures must be true or false")
    task_types = raw.get("task_types")
    prefix = raw.get("client_ref_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"{where}: client_ref_prefix must be a string")
    max_attempts = raw.get("max_attempts")
    if max_attempts is not None and (
        not isinstance(max_attempts, int)
        or isinstance(max_attempts, bool)
        or not 1 <= max_attempts <= 1000
    ):
        raise ConfigError(f"{where}: max_attempts must be a whole number from 1 to 1000")
    return SinkSpec(
        name=name,
        type=kind,
        url=url,
        options=options,
        events=events,
        only_failures=only_failures,
        task_types=None if task_types is None else _strings(task_types, f"{where}: task_types"),
        client_ref_prefix=prefix,
        max_attempts=max_attempts,
    )


def parse_sinks(document: Mapping[str, Any], env: Mapping[str, str]) -> tuple[SinkSpec, ...]:
    """`[[sinks]]` tables of a parsed receiver.toml."""
    unknown = set(document) - {"sinks"}
    if unknown:
        raise ConfigError(f"unknown top-level key {sorted(unknown)[0]!r} (expected [[sinks]])")
    raw_sinks = document.get("sinks", [])
    if not isinstance(raw_sinks, list) or not all(isinstance(s, dict) for s in raw_sinks):
        raise ConfigError("sinks must be an array of tables ([[sinks]])")
    specs = tuple(parse_sink(raw, env, i) for i, raw in enumerate(raw_sinks))
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"sink {name!r}: name is used twice; names must be unique")
    return specs
