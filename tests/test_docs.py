"""Every setting and every CLI command is documented in README."""

from __future__ import annotations

import re

import pytest

from receiver.cli import cli
from receiver.headers import HEADERS
from receiver.metrics import Metrics
from receiver.sinkspec import TYPES

from .helpers import ROOT

README = (ROOT / "README.md").read_text()
SETTINGS = sorted(
    set(
        re.findall(
            r'"((?:RUNFLOW|RECEIVER)_[A-Z_]+|PORT|DATABASE_URL)"',
            (ROOT / "receiver" / "config.py").read_text(),
        )
    )
)


def test_settings_were_found() -> None:
    assert "RUNFLOW_WEBHOOK_SECRET" in SETTINGS
    assert "PORT" in SETTINGS


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_is_in_the_readme_table(name: str) -> None:
    assert f"| `{name}` |" in README


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_is_documented(name: str) -> None:
    assert f"`receiver {name}" in README


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_of_every_command_is_documented(name: str) -> None:
    command = cli.commands[name]
    for param in command.params:
        for option in param.opts:
            if option.startswith("--") and option != "--help":
                assert option.split("/")[0] in README, f"{name} {option}"


def test_readme_starts_with_make_run_and_make_test() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make run" in first_block
    assert "make test" in first_block


def test_env_example_lists_every_setting_but_database_url() -> None:
    example = (ROOT / ".env.example").read_text()
    for name in SETTINGS:
        if name != "DATABASE_URL":
            assert f"{name}=" in example


def test_the_csp_in_security_md_is_the_one_sent() -> None:
    security = (ROOT / "docs" / "security.md").read_text()
    quoted = re.search(r"CSP `(default-src[^`]*)`", security)
    assert quoted is not None
    sent = dict(HEADERS)[b"content-security-policy"].decode()
    assert quoted.group(1) == sent


def test_the_alerts_take_rates_of_counters_only() -> None:
    """`rate()` and `increase()` read a fall as a counter reset: on a gauge (dead letters
    retried, 3 → 2) they report a rise, and the alert fires for a dead letter that is gone."""
    metrics = Metrics()
    metrics.expose(lambda: {"ops": {"dead": 1}}, ["ops"], apply_backlog=lambda: 0)
    exposition, _ = metrics.render(None)
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition.decode(), re.MULTILINE))
    alerts = README.split("Useful alerts:", 1)[1].split("\n\n", 1)[0]
    ranged = re.findall(r"\b(?:rate|increase|irate)\((\w+)", alerts)
    assert ranged
    for series in ranged:
        kind = kinds.get(series) or kinds.get(re.sub(r"_(bucket|count|sum)$", "", series))
        assert kind in ("counter", "histogram"), (series, kind)


def test_every_key_of_every_sink_type_is_in_the_readme_with_its_default() -> None:
    table = README.split("| type | its own keys |", 1)[1].split("\n\n", 1)[0]
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[2]
        for line in table.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == set(TYPES)
    for kind, (_, keys) in TYPES.items():
        for key, default in keys.items():
            shown = f"`{key}`" if default is None else f"`{key}` (default `{default}`"
            assert shown in rows[kind], (kind, key)


def test_the_readme_says_a_rabbitmq_forward_needs_a_bound_queue() -> None:
    """The sink publishes `mandatory`: with no queue bound for the routing key each forward
    fails with "no queue bound" and is dead after max_attempts. An operator who sets up the
    sink before its consumers meets that error; README's row for the type must explain it."""
    source = (ROOT / "receiver" / "sinks" / "rabbitmq.py").read_text()
    assert "mandatory=True" in source
    row = next(line for line in README.splitlines() if line.startswith("| `rabbitmq` | persistent"))
    assert "no queue bound" in row
