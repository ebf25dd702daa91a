"""Destinations: one module each, all behind the `Sink` protocol. Queue clients are optional
dependencies, imported only when a sink of their type is configured."""

from __future__ import annotations

import importlib

import httpx

from ..errors import ConfigError
from ..sinkspec import SinkSpec
from .base import Deferred, Event, NotSent, OneByOne, Sink, SinkError

__all__ = ["Deferred", "Event", "NotSent", "OneByOne", "Sink", "SinkError", "build_sink"]

# type → (module, class, pip extra when the client library is missing)
_REGISTRY = {
    "slack": ("slack", "SlackSink", None),
    "discord": ("discord", "DiscordSink", None),
    "http": ("http", "HttpSink", None),
    "redis": ("redis", "RedisSink", "redis"),
    "rabbitmq": ("rabbitmq", "RabbitMQSink", "rabbitmq"),
    "nats": ("nats", "NatsSink", "nats"),
}


def build_sink(spec: SinkSpec, http: httpx.AsyncClient) -> Sink:
    """The sink for `spec`; web sinks share the app's `http` client."""
    module_name, class_name, extra = _REGISTRY[spec.type]
    try:
        module = importlib.import_module(f".{module_name}", __name__)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"sink {spec.name!r}: type {spec.type} needs {exc.name}: "
            f"pip install '.[{extra}]' in receiver's checkout"
        ) from None
    cls = getattr(module, class_name)
    sink: Sink = cls(spec, http) if extra is None else cls(spec)
    return sink
