from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from receiver.config import Settings
from receiver.errors import ConfigError
from receiver.sinkspec import SinkSpec, parse_sinks

ENV = {"SLACK_URL": "https://hooks.slack.com/services/T/B/X"}


def one(**raw: Any) -> SinkSpec:
    (spec,) = parse_sinks({"sinks": [raw]}, ENV)
    return spec


def test_defaults_and_env_references() -> None:
    spec = one(name="ops", type="slack", url="env:SLACK_URL")
    assert spec.url == ENV["SLACK_URL"]
    assert spec.events == {"evaluation.completed", "evaluation.failed"}
    assert (spec.only_failures, spec.task_types, spec.client_ref_prefix) == (False, None, None)
    redis = one(name="q", type="redis", url="redis://127.0.0.1:6379/0")
    assert dict(redis.options) == {"stream": "runflow:evaluations", "maxlen": 100000}


MISTAKES = {
    "no-name": ({"type": "slack", "url": "https://x"}, "sink #1: name is required"),
    "bad-type": ({"name": "a", "type": "sms", "url": "https://x"}, "sink 'a': type must be"),
    "unknown-key": (
        {"name": "a", "type": "slack", "url": "https://x", "chanel": "#x"},
        "sink 'a': unknown key 'chanel'",
    ),
    "missing-env": (
        {"name": "a", "type": "slack", "url": "env:NOPE"},
        "sink 'a': url: environment variable NOPE is not set",
    ),
    "wrong-scheme": (
        {"name": "a", "type": "redis", "url": "http://x"},
        "sink 'a': url must start with redis://",
    ),
    "bad-events": (
        {"name": "a", "type": "slack", "url": "https://x", "events": ["run.completed"]},
        "sink 'a': events may contain only",
    ),
    "bad-only-failures": (
        {"name": "a", "type": "slack", "url": "https://x", "only_failures": "y"},
        "sink 'a': only_failures must be true or false",
    ),
    "bad-task-types": (
        {"name": "a", "type": "slack", "url": "https://x", "task_types": "x"},
        "sink 'a': task_types must be a list of strings",
    ),
    "empty-events": (  # accepted: a sink that silently got nothing
        {"name": "a", "type": "slack", "url": "https://x", "events": []},
        "sink 'a': events is empty, so the sink would get nothing; leave it out for all",
    ),
    "empty-task-types": (
        {"name": "a", "type": "slack", "url": "https://x", "task_types": []},
        "sink 'a': task_types is empty, so the sink would get nothing; leave it out for all",
    ),
    "bad-max-attempts": (
        {"name": "a", "type": "slack", "url": "https://x", "max_attempts": 0},
        "sink 'a': max_attempts must be a whole number",
    ),
    "bad-port": (
        {"name": "a", "type": "redis", "url": "redis://127.0.0.1:notaport/0"},
        "sink 'a': url's port must be a number from 1 to 65535",
    ),
    "port-out-of-range": (
        {"name": "a", "type": "nats", "url": "nats://127.0.0.1:99999"},
        "sink 'a': url's port must be a number from 1 to 65535",
    ),
    "no-host": ({"name": "a", "type": "http", "url": "https://"}, "sink 'a': url has no host"),
    "maxlen-text": (
        {"name": "a", "type": "redis", "url": "redis://r", "maxlen": "100k"},
        "sink 'a': maxlen must be a whole number, 0 or more",
    ),
    "maxlen-negative": (
        {"name": "a", "type": "redis", "url": "redis://r", "maxlen": -5},
        "sink 'a': maxlen must be a whole number, 0 or more",
    ),
    "empty-subject": (
        {"name": "a", "type": "nats", "url": "nats://n", "subject": ""},
        "sink 'a': subject must be a non-empty string",
    ),
    "wildcard-subject": (
        {"name": "a", "type": "nats", "url": "nats://n", "subject": "runflow.>"},
        "sink 'a': subject must name subjects, without the wildcards",
    ),
    "dotted-stream": (
        {"name": "a", "type": "nats", "url": "nats://n", "stream": "a.b"},
        "sink 'a': stream must not contain",
    ),
    "http-timeout-zero": (
        {"name": "a", "type": "http", "url": "https://x", "timeout": 0},
        "sink 'a': timeout must be more than 0 and at most 600 seconds",
    ),
    "http-secret": (
        {"name": "a", "type": "http", "url": "https://x", "secret": "hunter2"},
        "sink 'a': secret must start with whsec_",
    ),
    "http-private-key": (
        {"name": "a", "type": "http", "url": "https://x", "private_key": "hunter2"},
        "sink 'a': private_key must be a PEM private key or start",
    ),
    "exchange-list": (
        {"name": "a", "type": "rabbitmq", "url": "amqp://q", "exchange": ["x"]},
        "sink 'a': exchange must be a non-empty string",
    ),
}


@pytest.mark.parametrize(("raw", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_mistakes_name_the_sink_and_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        parse_sinks({"sinks": [raw]}, ENV)


def test_names_are_unique() -> None:
    sink = {"name": "a", "type": "slack", "url": "https://x"}
    with pytest.raises(ConfigError, match="sink 'a': name is used twice"):
        parse_sinks({"sinks": [sink, sink]}, ENV)


MATCHES = [
    ({}, ("evaluation.completed", "completed", True, "headshot", "c-1"), True),
    ({"only_failures": True}, ("evaluation.completed", "completed", True, "headshot", "c"), False),
    ({"only_failures": True}, ("evaluation.completed", "completed", False, "headshot", "c"), True),
    ({"only_failures": True}, ("evaluation.failed", "failed", None, "headshot", "c"), True),
    (
        {"events": frozenset({"evaluation.failed"})},
        ("evaluation.completed", "completed", False, "x", "c"),
        False,
    ),
    (
        {"task_types": frozenset({"product"})},
        ("evaluation.completed", "completed", True, "headshot", "c"),
        False,
    ),
    (
        {"task_types": frozenset({"product"})},
        ("evaluation.completed", "completed", True, None, "c"),
        True,
    ),
    (
        {"client_ref_prefix": "cust-"},
        ("evaluation.completed", "completed", True, "x", "cust-9"),
        True,
    ),
    ({"client_ref_prefix": "cust-"}, ("evaluation.completed", "completed", True, "x", None), False),
]


@pytest.mark.parametrize(("filters", "verdict", "expected"), MATCHES)
def test_filters(filters: dict[str, Any], verdict: tuple[Any, ...], expected: bool) -> None:
    spec = SinkSpec(name="s", type="slack", url="https://x", **filters)
    assert spec.matches(*verdict) is expected


def test_receiver_toml_and_the_slack_shortcut(tmp_path: Path) -> None:
    config = tmp_path / "receiver.toml"
    config.write_text('[[sinks]]\nname = "q"\ntype = "nats"\nurl = "nats://127.0.0.1:4222"\n')
    env = {"RECEIVER_CONFIG": str(config), "RECEIVER_DATABASE": str(tmp_path / "r.db")}
    assert [s.name for s in Settings.from_env(env, env_file=None).sinks] == ["q"]
    shortcut = {"RECEIVER_SLACK_WEBHOOK_URL": ENV["SLACK_URL"]}
    (slack,) = Settings.from_env(shortcut, env_file=None).sinks
    assert (slack.name, slack.type, slack.url) == ("slack", "slack", ENV["SLACK_URL"])
    # Both: a shortcut the file does not use would post nothing, without a word (it did).
    with pytest.raises(ConfigError, match=r"^RECEIVER_SLACK_WEBHOOK_URL is set, but .*none of"):
        Settings.from_env({**env, **shortcut}, env_file=None)
    config.write_text(
        "[[sinks]]\nname = 'ops'\ntype = 'slack'\nurl = 'env:RECEIVER_SLACK_WEBHOOK_URL'\n"
    )
    assert [s.name for s in Settings.from_env({**env, **shortcut}, env_file=None).sinks] == ["ops"]
    config.write_text("[[sinks]]\nname = 'q'\ntype = 'nats'\nurl = 'ftp://x'\n")
    with pytest.raises(ConfigError, match=r"receiver.toml: sink 'q': url must start with nats://"):
        Settings.from_env(env, env_file=None)
    config.write_text("[[sinks]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.from_env(env, env_file=None)
    with pytest.raises(ConfigError, match="RECEIVER_CONFIG: no such file"):
        Settings.from_env({"RECEIVER_CONFIG": str(tmp_path / "nope.toml")}, env_file=None)


def test_reading_sinks_that_do_not_sign_leaves_cryptography_unloaded() -> None:
    """cryptography costs ~7 MB of resident memory (the harness's peak RSS went 53.5 → 61.2 MB
    when checking an http sink's keys imported it): only a sink that signs brings it in."""
    script = (
        "import sys\n"
        "from receiver.app import create_app\n"
        "from receiver.sinkspec import parse_sinks\n"
        "parse_sinks({'sinks': [{'name': 'a', 'type': 'http', 'url': 'https://x', 'timeout': 5},"
        " {'name': 'b', 'type': 'slack', 'url': 'https://y'}]}, {})\n"
        "print('cryptography' in sys.modules)\n"
    )
    answer = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "False"
