from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from receiver.config import DEFAULT_MAX_BODY_BYTES, Settings, read_env_file
from receiver.errors import ConfigError

SECRET = "whsec_a"


def from_env(environ: dict[str, str], env_file: Path | None = None) -> Settings:
    return Settings.from_env(environ, env_file=env_file)


def test_defaults() -> None:
    settings = from_env({"RECEIVER_DASHBOARD_TOKEN": "t"})
    assert settings == Settings(dashboard_token="t")
    assert (settings.database, settings.port, settings.max_body_bytes) == (
        "receiver.db",
        8000,
        DEFAULT_MAX_BODY_BYTES,
    )
    assert (settings.webhook_secrets, settings.public_url, settings.allow_unsigned) == (
        (),
        None,
        False,
    )


def test_an_empty_mapping_is_an_empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("RUNFLOW_WEBHOOK_SECRET", "whsec_from_process")
    settings = from_env({})
    assert (settings.port, settings.webhook_secrets) == (8000, ())


def test_no_mapping_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("RUNFLOW_WEBHOOK_SECRET", "whsec_from_process")
    settings = Settings.from_env(env_file=None)
    assert (settings.port, settings.webhook_secrets) == (1234, ("whsec_from_process",))


@pytest.mark.parametrize(
    ("environ", "attribute", "expected"),
    [
        ({"RUNFLOW_WEBHOOK_SECRET": "whsec_a"}, "webhook_secrets", ("whsec_a",)),
        (
            {"RUNFLOW_WEBHOOK_SECRET": " whsec_a , whsec_b "},
            "webhook_secrets",
            ("whsec_a", "whsec_b"),
        ),
        (
            {"RUNFLOW_WEBHOOK_SECRET": "whsec_a,,whsec_b,"},
            "webhook_secrets",
            ("whsec_a", "whsec_b"),
        ),
        ({"RUNFLOW_WEBHOOK_SECRET": " , "}, "webhook_secrets", ()),
        ({"RUNFLOW_WEBHOOK_SECRET": ""}, "webhook_secrets", ()),
        ({"RECEIVER_DATABASE": "/data/r.db"}, "database", "/data/r.db"),
        ({"RECEIVER_DATABASE": "sqlite:///data/r.db"}, "database", "data/r.db"),
        ({"RECEIVER_DATABASE": "sqlite:////data/r.db"}, "database", "/data/r.db"),
        ({"RECEIVER_DATABASE": "  r.db  "}, "database", "r.db"),
        ({"DATABASE_URL": "sqlite:////data/r.db"}, "database", "/data/r.db"),
        ({"DATABASE_URL": "other.db"}, "database", "other.db"),
        ({"DATABASE_URL": "other.db", "RECEIVER_DATABASE": "mine.db"}, "database", "mine.db"),
        ({"DATABASE_URL": "", "RECEIVER_DATABASE": ""}, "database", "receiver.db"),
        (
            {"RECEIVER_DATABASE": "postgresql://u:pw@db:5433/receiver"},
            "database",
            "postgresql://u:pw@db:5433/receiver",
        ),
        ({"DATABASE_URL": "postgres://db/r"}, "database", "postgresql://db/r"),
        (
            {"DATABASE_URL": "postgres://db/r", "RECEIVER_DATABASE": "mine.db"},
            "database",
            "mine.db",
        ),
        ({"RECEIVER_DATABASE_POOL_SIZE": "3"}, "database_pool_size", 3),
        ({"RECEIVER_PUBLIC_URL": "https://r.example.com/"}, "public_url", "https://r.example.com"),
        ({"RECEIVER_PUBLIC_URL": "http://localhost:8000"}, "public_url", "http://localhost:8000"),
        ({"RECEIVER_MAX_BODY_BYTES": "1024"}, "max_body_bytes", 1024),
        ({"RECEIVER_MAX_BODY_BYTES": " 65536 "}, "max_body_bytes", 65536),
        ({"RECEIVER_MAX_BODY_BYTES": str(1 << 30)}, "max_body_bytes", 1 << 30),
        ({"RECEIVER_MAX_BODY_BYTES": ""}, "max_body_bytes", DEFAULT_MAX_BODY_BYTES),
        ({"RECEIVER_BODY_TIMEOUT": "2.5"}, "body_timeout", 2.5),
        ({"RECEIVER_BODY_TIMEOUT": "0.1"}, "body_timeout", 0.1),
        ({"RECEIVER_BODY_TIMEOUT": ""}, "body_timeout", 10.0),
        ({}, "body_timeout", 10.0),
        ({"RECEIVER_ALLOW_UNSIGNED": "true"}, "allow_unsigned", True),
        ({"RECEIVER_ALLOW_UNSIGNED": "YES"}, "allow_unsigned", True),
        ({"RECEIVER_ALLOW_UNSIGNED": "1"}, "allow_unsigned", True),
        ({"RECEIVER_ALLOW_UNSIGNED": "on"}, "allow_unsigned", True),
        ({"RECEIVER_ALLOW_UNSIGNED": "False"}, "allow_unsigned", False),
        ({"RECEIVER_ALLOW_UNSIGNED": "0"}, "allow_unsigned", False),
        ({"RECEIVER_ALLOW_UNSIGNED": "off"}, "allow_unsigned", False),
        ({"RECEIVER_ALLOW_UNSIGNED": "no"}, "allow_unsigned", False),
        ({"PORT": "1"}, "port", 1),
        ({"PORT": "65535"}, "port", 65535),
        ({"PORT": "8080"}, "port", 8080),
        ({"RECEIVER_DASHBOARD_TOKEN": " secret-token "}, "dashboard_token", "secret-token"),
        ({"RECEIVER_DASHBOARD_TOKEN": "secret-token"}, "dashboard_token_generated", False),
    ],
)
def test_values(environ: dict[str, str], attribute: str, expected: Any) -> None:
    assert getattr(from_env(environ), attribute) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECEIVER_MAX_BODY_BYTES", "abc"),
        ("RECEIVER_MAX_BODY_BYTES", "0"),
        ("RECEIVER_MAX_BODY_BYTES", "-5"),
        ("RECEIVER_MAX_BODY_BYTES", "1023"),
        ("RECEIVER_MAX_BODY_BYTES", str((1 << 30) + 1)),
        ("RECEIVER_MAX_BODY_BYTES", "8MB"),
        ("RECEIVER_MAX_BODY_BYTES", "1.5"),
        ("RECEIVER_BODY_TIMEOUT", "0"),
        ("RECEIVER_BODY_TIMEOUT", "-1"),
        ("RECEIVER_BODY_TIMEOUT", "soon"),
        ("RECEIVER_BODY_TIMEOUT", "nan"),
        ("RECEIVER_BODY_TIMEOUT", "inf"),
        ("PORT", "70000"),
        ("PORT", "0"),
        ("PORT", "http"),
        ("PORT", "80.0"),
        ("RECEIVER_ALLOW_UNSIGNED", "maybe"),
        ("RECEIVER_ALLOW_UNSIGNED", "2"),
        ("RECEIVER_PUBLIC_URL", "ftp://x"),
        ("RECEIVER_PUBLIC_URL", "receiver.example.com"),
        ("RECEIVER_PUBLIC_URL", "https://"),  # no host: the banner said https:/webhooks/runflow
        ("RECEIVER_PUBLIC_URL", "https://r.example.com:port"),
        ("RECEIVER_PUBLIC_URL", "https://r.example.com/?x=1"),
        ("RUNFLOW_API_BASE", "http:///v1"),
        ("RUNFLOW_API_BASE", "https://svc:s3cretPW@api.runflow.io"),  # in every refetch error
        ("RECEIVER_PUBLIC_URL", "https://user@r.example.com"),
        ("RECEIVER_DATABASE", ":memory:"),  # each connection its own: no tables for the writer
        ("RECEIVER_DATABASE", "sqlite:///"),
        ("RECEIVER_DATABASE", "sqlite:///:memory:"),
        ("RECEIVER_DATABASE", "file:r.db?mode=memory"),
        ("RECEIVER_DATABASE", "postgresql://user:pw@db:port/receiver"),
        ("RECEIVER_DATABASE", "postgres:///receiver"),
        ("DATABASE_URL", "postgres://user:pw@db:0/receiver"),
        ("DATABASE_URL", "mysql://user:pw@db/receiver"),
        ("RECEIVER_DATABASE", "postgresql://u:s3cretPW@db/receiver?sslmod=require"),  # a typo
        ("DATABASE_URL", "postgres://u:s3cretPW@db/receiver?sslmode=require&x=1"),
        ("RECEIVER_DATABASE_POOL_SIZE", "0"),
        ("RECEIVER_REFETCH_EMBEDS", ","),
        ("RECEIVER_REFETCH_EMBEDS", "judges,judgse"),  # a typo: found at start, not at refetch
        ("RECEIVER_LEASE", "0"),  # two workers would send one forward
        ("RECEIVER_LEASE", "0.5"),
        ("RECEIVER_SLACK_WEBHOOK_URL", "hooks.slack.com/services/T0/B0/x"),
        ("RECEIVER_SLACK_WEBHOOK_URL", "https://hooks.slack.com:99999/services/T0/B0/x"),
    ],
)
def test_malformed_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_env({name: value})
    message = str(caught.value)
    assert message.startswith(name)
    assert "\n" not in message
    assert "s3cretPW" not in message


@pytest.mark.parametrize(
    ("name", "bounds"),
    [
        ("RECEIVER_MAX_BODY_BYTES", "from 1024 to 1073741824"),
        ("RECEIVER_MAX_BACKLOG", "from 1 to 10000000"),
        ("RECEIVER_BODY_TIMEOUT", "from 0.1 to 3600"),
        ("RECEIVER_RETRY_BASE", "from 0.01 to 3600"),
        ("RECEIVER_RECONCILE_AFTER", "from 1 to 2592000"),
    ],
)
def test_a_range_is_shown_as_it_can_be_written(name: str, bounds: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_env({name: "-1"})
    assert f"{name} must be a " in str(caught.value)
    assert f" {bounds}, got '-1'" in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "delays"),
    [
        ({"RECEIVER_RETRY_MAX": "1"}, (1.0, 1.0)),
        ({"RECEIVER_RETRY_BASE": "60", "RECEIVER_RETRY_MAX": "30"}, (30.0, 30.0)),
        ({"RECEIVER_RETRY_BASE": "3", "RECEIVER_RETRY_MAX": "30"}, (3.0, 30.0)),
    ],
)
def test_a_retry_max_below_the_base_is_the_base_too(
    environ: dict[str, str], delays: tuple[float, float]
) -> None:
    """Every delay was the max, and a setup that lowered only the max (to retry at least each
    second) worked: it must still start after an upgrade, with the delays it had."""
    settings = from_env(environ)
    assert (settings.retry_base, settings.retry_max) == delays


def test_receiver_database_is_named_even_when_database_url_is_fine() -> None:
    with pytest.raises(ConfigError, match=r"^RECEIVER_DATABASE"):
        from_env({"RECEIVER_DATABASE": "mysql://db/x", "DATABASE_URL": "sqlite:///x.db"})


@pytest.mark.parametrize(
    "value",
    ["postgresql://user:s3cret-pw@db:port/receiver", "mysql://user:s3cret-pw@db/receiver"],
)
def test_a_database_password_is_never_shown(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_env({"DATABASE_URL": value})
    assert "s3cret-pw" not in str(caught.value)
    assert "user:***@" in str(caught.value)


@pytest.mark.parametrize(
    ("database", "shown"),
    [
        ("postgresql://app:s3cret@db/receiver", "postgresql://app:***@db/receiver"),
        (
            "postgresql://app@db/receiver?password=s3cret",
            "postgresql://app@db/receiver?password=***",
        ),
        (
            "postgresql://app:s3cret@db/r?sslmode=require&sslpassword=s3cret",
            "postgresql://app:***@db/r?sslmode=require&sslpassword=***",
        ),
        ("postgresql://db/receiver?sslmode=require", "postgresql://db/receiver?sslmode=require"),
        ("r.db", "r.db"),
    ],
)
def test_the_database_is_shown_without_its_password(database: str, shown: str) -> None:
    assert from_env({"RECEIVER_DATABASE": database}).database_shown == shown


@pytest.mark.parametrize(
    ("dashboard", "metrics", "short"),
    [
        ("a" * 16, None, []),
        ("a" * 15, None, ["RECEIVER_DASHBOARD_TOKEN"]),
        ("a" * 16, "b" * 15, ["RECEIVER_METRICS_TOKEN"]),
        ("a" * 8, "b" * 8, ["RECEIVER_DASHBOARD_TOKEN", "RECEIVER_METRICS_TOKEN"]),
    ],
)
def test_short_tokens_are_named(dashboard: str, metrics: str | None, short: list[str]) -> None:
    """`serve` warns of them at start: 16 random URL-safe characters is the least it takes."""
    given = {"RECEIVER_DASHBOARD_TOKEN": dashboard}
    if metrics is not None:
        given["RECEIVER_METRICS_TOKEN"] = metrics
    assert from_env(given).short_tokens() == short


def test_a_token_is_generated_when_unset() -> None:
    first = from_env({})
    second = from_env({"RECEIVER_DASHBOARD_TOKEN": "  "})
    assert first.dashboard_token_generated
    assert second.dashboard_token_generated
    assert len(first.dashboard_token) >= 32
    assert first.dashboard_token != second.dashboard_token


FINGERPRINT = (
    "from receiver.config import Settings;"
    "print(Settings.from_env({'RECEIVER_DASHBOARD_TOKEN': 't' * 20}, None).fingerprint())"
)


def test_a_fingerprint_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Sets (a sink's events) iterate in another order in each process (string hashes are
    salted): the fingerprint must not see it, or `serve --workers N` would refuse its workers."""
    sinks = tmp_path / "receiver.toml"
    sinks.write_text('[[sinks]]\nname = "hook"\ntype = "http"\nurl = "http://127.0.0.1:9/"\n')
    prints = {
        subprocess.run(
            [sys.executable, "-c", FINGERPRINT],
            cwd=tmp_path,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(6)
    }
    assert len(prints) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"RUNFLOW_WEBHOOK_SECRET": "whsec_other"},
        {"RECEIVER_MAX_ATTEMPTS": "3"},
        {"RECEIVER_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x"},
    ],
)
def test_a_fingerprint_changes_with_any_setting(change: dict[str, str]) -> None:
    given = {"RUNFLOW_WEBHOOK_SECRET": "whsec_a", "RECEIVER_DASHBOARD_TOKEN": "t" * 20}
    assert from_env(given).fingerprint() != from_env({**given, **change}).fingerprint()


def test_a_generated_token_given_on_is_the_same_fingerprint() -> None:
    """`serve --workers N` hands its generated token to its workers in the environment."""
    generated = from_env({})
    given = from_env({"RECEIVER_DASHBOARD_TOKEN": generated.dashboard_token})
    assert generated.fingerprint() == given.fingerprint()


# .env files


ENV_FILE = """\
# a comment
   # an indented comment

RUNFLOW_WEBHOOK_SECRET=whsec_a,whsec_b
export RECEIVER_DATABASE = "data/receiver.db"
RECEIVER_PUBLIC_URL='https://r.example.com'
RECEIVER_DASHBOARD_TOKEN="a=b#c"
PORT=9000
QUOTED_EMPTY=""
MISMATCHED="x'
SINGLE_QUOTE='
QUOTED_COMMENT="whsec_q"  # from Runflow's settings page
SINGLE_QUOTED_COMMENT='v w' #c
"""


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_FILE)
    assert read_env_file(path) == {
        "RUNFLOW_WEBHOOK_SECRET": "whsec_a,whsec_b",
        "RECEIVER_DATABASE": "data/receiver.db",
        "RECEIVER_PUBLIC_URL": "https://r.example.com",
        "RECEIVER_DASHBOARD_TOKEN": "a=b#c",
        "PORT": "9000",
        "QUOTED_EMPTY": "",
        "MISMATCHED": "\"x'",
        "SINGLE_QUOTE": "'",
        "QUOTED_COMMENT": "whsec_q",
        "SINGLE_QUOTED_COMMENT": "v w",
    }


def test_settings_from_an_env_file(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_FILE)
    settings = from_env({}, env_file=path)
    assert settings.webhook_secrets == ("whsec_a", "whsec_b")
    assert settings.database == "data/receiver.db"
    assert settings.public_url == "https://r.example.com"
    assert (settings.dashboard_token, settings.dashboard_token_generated) == ("a=b#c", False)
    assert settings.port == 9000


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("PORT=9000\nRECEIVER_DATABASE=file.db\n")
    settings = from_env({"PORT": "7000"}, env_file=path)
    assert (settings.port, settings.database) == (7000, "file.db")


def test_a_missing_env_file_is_no_error(tmp_path: Path) -> None:
    assert read_env_file(tmp_path / "absent.env") == {}
    assert from_env({}, env_file=tmp_path / "absent.env").port == 8000


def test_the_default_env_file_is_dot_env_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("PORT=9100\n")
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({}).port == 9100


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("NOT A PAIR\n", 1),
        ("# ok\nPORT=1\njust-a-word\n", 3),
        ("=value\n", 1),
        ("PORT=1\n\n  =x\n", 3),
        ("export\n", 1),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path: Path, content: str, line: int) -> None:
    path = tmp_path / "settings.env"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        from_env({}, env_file=path)
    assert str(caught.value).startswith(f"{path}:{line}: expected KEY=value")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"# caf\xe9\nRUNFLOW_WEBHOOK_SECRET=whsec_x\n",
            "not UTF-8 text (byte 5): save it as UTF-8",
        ),
        (b"\xef\xbb\xbfRUNFLOW_WEBHOOK_SECRET=whsec_x\n", None),  # a BOM: the key is the key
    ],
)
def test_an_env_file_is_utf_8_text(tmp_path: Path, content: bytes, expected: str | None) -> None:
    path = tmp_path / ".env"
    path.write_bytes(content)
    if expected is None:
        assert read_env_file(path) == {"RUNFLOW_WEBHOOK_SECRET": "whsec_x"}
        return
    with pytest.raises(ConfigError) as caught:
        read_env_file(path)
    assert str(caught.value) == f"{path}: {expected}"


def test_a_malformed_line_is_not_echoed(tmp_path: Path) -> None:
    """It may be a secret written with the wrong separator."""
    path = tmp_path / ".env"
    path.write_text("RUNFLOW_WEBHOOK_SECRET: whsec_S3cr3tValue\n")
    with pytest.raises(ConfigError) as caught:
        from_env({}, env_file=path)
    assert "S3cr3t" not in str(caught.value)


def test_a_malformed_value_in_the_file_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("PORT=70000\n")
    with pytest.raises(ConfigError, match=r"^PORT must be a whole number"):
        from_env({}, env_file=path)


# check_ingest


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(allow_unsigned=False, dashboard_token="t"),
        from_env({"RUNFLOW_WEBHOOK_SECRET": " , "}),
    ],
)
def test_check_ingest_wants_a_secret(settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"^RUNFLOW_WEBHOOK_SECRET is not set") as caught:
        settings.check_ingest()
    assert caught.value.status == 500


def test_the_placeholder_of_env_example_is_no_secret() -> None:
    """Copied unchanged, it would start a receiver that refuses every real callback (401)."""
    settings = from_env({"RUNFLOW_WEBHOOK_SECRET": "whsec_replace_me"})
    with pytest.raises(ConfigError, match=r"^RUNFLOW_WEBHOOK_SECRET is still 'whsec_replace_me'"):
        settings.check_ingest()


@pytest.mark.parametrize(
    "settings",
    [
        Settings(webhook_secrets=(SECRET,)),
        Settings(allow_unsigned=True),
        from_env({"RECEIVER_ALLOW_UNSIGNED": "true"}),
    ],
)
def test_check_ingest_passes(settings: Settings) -> None:
    settings.check_ingest()
