"""Settings from the environment (and `.env`); each mistake names the variable and what it wants."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from .database_url import is_postgres_url, redact
from .errors import ConfigError
from .sinkspec import SinkSpec, parse_sinks

T = TypeVar("T")
N = TypeVar("N", int, float)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_BODY_TIMEOUT = 10.0
EMBEDS = (
    "action",
    "comfyui_workflow",
    "flow",
    "gate_failures",
    "judges",
    "model",
    "parent_evaluation",
    "run",
)
DEFAULT_EMBEDS = ("judges", "action", "gate_failures")
# A bearer token anyone who reaches the server may try: 16 random URL-safe characters carry
# 96 bits, beyond guessing over the network; `make run` and a generated token have 32
# (secrets.token_urlsafe(24), 192 bits).
MIN_TOKEN_CHARS = 16
PLACEHOLDER_SECRET = "whsec_replace_me"  # noqa: S105 (.env.example's, refused as a secret)


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines; `#` comments, `export ` prefixes and matching quotes allowed."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:  # a byte-order mark (some editors write one) would be taken for the first key's
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            # Not the line itself: it may be a secret written with `:` or a space for `=`.
            raise ConfigError(
                f"{path}:{number}: expected KEY=value (the line has no '=' or no key)"
            )
        values[key.strip()] = _unquoted(value.strip())
    return values


def _unquoted(value: str) -> str:
    """A .env value without its quotes, or its comment: `"v"`, `'v'  # c`, `v  # c`."""
    quote = value[:1]
    if quote not in ("'", '"'):
        return value.split(" #", 1)[0].rstrip()
    if len(value) >= 2 and value[-1] == quote:
        return value[1:-1]
    end = value.find(quote, 1)
    if end > 0 and value[end + 1 :].lstrip().startswith("#"):
        return value[1:end]  # `KEY="v"  # comment`: as dotenv and shells read it
    return value.split(" #", 1)[0].rstrip()


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def _parsed(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    value = _get(env, name)
    return default if value is None else parse(value)


def _ranged(
    name: str, minimum: N, maximum: N, kind: Callable[[str], N], what: str
) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            number = kind(text)
        except ValueError:
            number = minimum - 1
        if not minimum <= number <= maximum:
            raise ConfigError(
                f"{name} must be {what} from {_shown(minimum)} to {_shown(maximum)}, got {text!r}"
            )
        return number

    return parse


def _shown(number: float) -> str:
    """A bound as it can be written back: 1073741824, not 1.07374e+09; 0.1, not 0.100000."""
    return str(int(number)) if float(number).is_integer() else repr(number)


def _integer(name: str, minimum: int, maximum: int) -> Callable[[str], int]:
    return _ranged(name, minimum, maximum, int, "a whole number")


def _number(name: str, minimum: float, maximum: float) -> Callable[[str], float]:
    return _ranged(name, minimum, maximum, float, "a number")


def _boolean(name: str) -> Callable[[str], bool]:
    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {text!r}")

    return parse


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.lower()
        if lowered not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
        return lowered

    return parse


def _postgres(name: str, text: str) -> str:
    """A PostgreSQL URL, checked without connecting; errors never show its password."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name}: not a valid PostgreSQL URL: {redact(text)!r}") from None
    if not (parts.hostname or "host=" in parts.query) or port == 0:
        raise ConfigError(
            f"{name}: expected postgresql://user:password@host[:port]/database,"
            f" got {redact(text)!r}"
        )
    if importlib.util.find_spec("psycopg") is None:
        raise ConfigError(
            f"{name}: PostgreSQL needs psycopg: pip install '.[postgres]' in receiver's checkout"
        )
    url = "postgresql://" + text.partition("://")[2]
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:  # libpq's own reading: a parameter it does not know (`?sslmod=`) was a traceback
        conninfo_to_dict(url)
    except ProgrammingError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{name}: {reason} in {redact(text)!r}") from None
    return url


def _database(name: str, text: str) -> str:
    if is_postgres_url(text):
        return _postgres(name, text)
    path = text.removeprefix("sqlite:///")
    # Not a file: an in-memory database (each connection its own, so the writer's tables are
    # nowhere else) or a URI the path would be taken for literally.
    if ("://" in text and path == text) or path in ("", ":memory:") or path.startswith("file:"):
        raise ConfigError(
            f"{name}: expected a SQLite file path, sqlite:///path or postgresql://…,"
            f" got {redact(text)!r}"
        )
    return path


def _url(name: str) -> Callable[[str], str]:
    """An http(s) base URL with a host and nothing else: no user or password (they went into
    every error naming the URL: logged, stored, shown on the dashboard), query or fragment."""

    def parse(text: str) -> str:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 (raises for a port that is not a number)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            shown = "a value that is not one" if parts is None else _public(text)
            raise ConfigError(f"{name} must be an http:// or https:// URL with a host, got {shown}")
        if parts.username is not None or parts.query or parts.fragment:
            raise ConfigError(
                f"{name} must have no user, password, query or fragment, got {_public(text)}"
            )
        return text.rstrip("/")

    return parse


def _public(url: str) -> str:
    """`url` as it may be shown: without its user, password, query and fragment."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return repr(urlunsplit((parts.scheme, host, parts.path, "", "")))


def _embeds(text: str) -> tuple[str, ...]:
    if text.lower() == "off":
        return ()
    embeds = tuple(e.strip() for e in text.split(",") if e.strip())
    if not embeds:  # `,` turned refetch off without a word: `off` says so
        raise ConfigError(
            f"RECEIVER_REFETCH_EMBEDS: expected off or a comma-separated list of"
            f" {', '.join(EMBEDS)}, got {text!r}"
        )
    for embed in embeds:
        if embed not in EMBEDS:
            raise ConfigError(
                f"RECEIVER_REFETCH_EMBEDS: unknown embed {embed!r}; expected off or a "
                f"comma-separated list of {', '.join(EMBEDS)}"
            )
    return embeds


def load_sinks(env: Mapping[str, str]) -> tuple[SinkSpec, ...]:
    """Sinks from RECEIVER_CONFIG (default receiver.toml when present), else the Slack shortcut."""
    configured = _get(env, "RECEIVER_CONFIG")
    path = Path(configured or "receiver.toml")
    if configured and not path.is_file():
        raise ConfigError(f"RECEIVER_CONFIG: no such file {configured!r}")
    if path.is_file():
        try:
            document = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            specs = parse_sinks(document, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        shortcut = _get(env, "RECEIVER_SLACK_WEBHOOK_URL")
        if shortcut and all(spec.url != shortcut for spec in specs):  # it would post nothing
            raise ConfigError(
                f"RECEIVER_SLACK_WEBHOOK_URL is set, but {path} names the sinks and none of "
                'them uses it: add a slack sink there with url = "env:RECEIVER_SLACK_WEBHOOK_URL"'
                ", or unset it"
            )
        return specs
    slack = _get(env, "RECEIVER_SLACK_WEBHOOK_URL")
    if slack:
        try:
            return parse_sinks({"sinks": [{"name": "slack", "type": "slack", "url": slack}]}, env)
        except ConfigError as exc:  # the sink is the variable's: name what the user set
            raise ConfigError(f"RECEIVER_SLACK_WEBHOOK_URL: {exc}") from None
    return ()


@dataclass(frozen=True)
class Settings:
    webhook_secrets: tuple[str, ...] = ()
    database: str = "receiver.db"
    database_pool_size: int = 10
    max_backlog: int = 100_000
    database_setting: str = "RECEIVER_DATABASE"  # the variable it came from (or DATABASE_URL)
    dashboard_token: str = ""
    dashboard_token_generated: bool = False
    public_url: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    allow_unsigned: bool = False
    port: int = 8000
    runflow_api_key: str | None = None
    runflow_api_base: str = "https://api.runflow.io"
    runflow_org_id: str | None = None
    refetch_embeds: tuple[str, ...] = DEFAULT_EMBEDS
    refetch_budget: float = 120.0
    sinks: tuple[SinkSpec, ...] = ()
    worker: bool = True
    max_attempts: int = 10
    retry_base: float = 2.0
    retry_max: float = 3600.0
    reconcile_after: float = 600.0
    reconcile_interval: float = 60.0
    lease: float = 300.0
    log_format: str = "auto"
    log_level: str = "info"
    metrics_token: str | None = None

    @property
    def postgres(self) -> bool:
        return is_postgres_url(self.database)

    def fingerprint(self) -> str:
        """A digest of every setting (secrets in it, so it is shown nowhere), to tell whether
        two processes read the same configuration."""
        fields = asdict(replace(self, dashboard_token_generated=False))
        text = json.dumps(fields, sort_keys=True, default=sorted)  # sets: in no set order
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def database_shown(self) -> str:
        """The database as it may be printed or logged (a URL's password masked)."""
        return redact(self.database)

    @property
    def refetch(self) -> bool:
        """Refetch needs an API key and at least one embed (`RECEIVER_REFETCH_EMBEDS=off`)."""
        return bool(self.runflow_api_key) and bool(self.refetch_embeds)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: Path | None = Path(".env"),
        *,
        sinks: bool = True,
    ) -> Settings:
        """Read settings; the process environment wins over `env_file`. Without `sinks`, the
        sinks file is not read (a command that forwards nothing needs none of its secrets)."""
        given = os.environ if environ is None else environ
        env = {**(read_env_file(env_file) if env_file else {}), **given}
        secrets_text = _get(env, "RUNFLOW_WEBHOOK_SECRET") or ""
        token = _get(env, "RECEIVER_DASHBOARD_TOKEN")
        database_variable = (  # DATABASE_URL when only that is set (a platform's)
            "DATABASE_URL"
            if _get(env, "DATABASE_URL") and not _get(env, "RECEIVER_DATABASE")
            else "RECEIVER_DATABASE"
        )
        database = _get(env, database_variable) or "receiver.db"
        settings = cls(
            webhook_secrets=tuple(s.strip() for s in secrets_text.split(",") if s.strip()),
            database=_database(database_variable, database),
            database_setting=database_variable,
            database_pool_size=_parsed(
                env,
                "RECEIVER_DATABASE_POOL_SIZE",
                _integer("RECEIVER_DATABASE_POOL_SIZE", 1, 1000),
                10,
            ),
            max_backlog=_parsed(
                env,
                "RECEIVER_MAX_BACKLOG",
                _integer("RECEIVER_MAX_BACKLOG", 1, 10_000_000),
                100_000,
            ),
            dashboard_token=token or secrets.token_urlsafe(24),
            dashboard_token_generated=token is None,
            public_url=_parsed(env, "RECEIVER_PUBLIC_URL", _url("RECEIVER_PUBLIC_URL"), None),
            max_body_bytes=_parsed(
                env,
                "RECEIVER_MAX_BODY_BYTES",
                _integer("RECEIVER_MAX_BODY_BYTES", 1024, 1 << 30),
                DEFAULT_MAX_BODY_BYTES,
            ),
            body_timeout=_parsed(
                env,
                "RECEIVER_BODY_TIMEOUT",
                _number("RECEIVER_BODY_TIMEOUT", 0.1, 3600),
                DEFAULT_BODY_TIMEOUT,
            ),
            allow_unsigned=_parsed(
                env, "RECEIVER_ALLOW_UNSIGNED", _boolean("RECEIVER_ALLOW_UNSIGNED"), False
            ),
            port=_parsed(env, "PORT", _integer("PORT", 1, 65535), 8000),
            runflow_api_key=_get(env, "RUNFLOW_API_KEY"),
            runflow_api_base=_parsed(
                env, "RUNFLOW_API_BASE", _url("RUNFLOW_API_BASE"), "https://api.runflow.io"
            ),
            runflow_org_id=_get(env, "RUNFLOW_ORG_ID"),
            refetch_embeds=_parsed(env, "RECEIVER_REFETCH_EMBEDS", _embeds, DEFAULT_EMBEDS),
            refetch_budget=_parsed(
                env, "RECEIVER_REFETCH_BUDGET", _number("RECEIVER_REFETCH_BUDGET", 0, 86400), 120.0
            ),
            sinks=load_sinks(env) if sinks else (),
            worker=_parsed(env, "RECEIVER_WORKER", _boolean("RECEIVER_WORKER"), True),
            max_attempts=_parsed(
                env, "RECEIVER_MAX_ATTEMPTS", _integer("RECEIVER_MAX_ATTEMPTS", 1, 1000), 10
            ),
            retry_base=_parsed(
                env, "RECEIVER_RETRY_BASE", _number("RECEIVER_RETRY_BASE", 0.01, 3600), 2.0
            ),
            reconcile_after=_parsed(
                env,
                "RECEIVER_RECONCILE_AFTER",
                _number("RECEIVER_RECONCILE_AFTER", 1, 30 * 86400),
                600.0,
            ),
            reconcile_interval=_parsed(
                env,
                "RECEIVER_RECONCILE_INTERVAL",
                _number("RECEIVER_RECONCILE_INTERVAL", 0, 86400),
                60.0,
            ),
            lease=_parsed(env, "RECEIVER_LEASE", _number("RECEIVER_LEASE", 1, 86400), 300.0),
            retry_max=_parsed(
                env, "RECEIVER_RETRY_MAX", _number("RECEIVER_RETRY_MAX", 0.01, 604800), 3600.0
            ),
            log_format=_parsed(
                env, "RECEIVER_LOG_FORMAT", _choice("RECEIVER_LOG_FORMAT", LOG_FORMATS), "auto"
            ),
            log_level=_parsed(
                env, "RECEIVER_LOG_LEVEL", _choice("RECEIVER_LOG_LEVEL", LOG_LEVELS), "info"
            ),
            metrics_token=_get(env, "RECEIVER_METRICS_TOKEN"),
        )
        if settings.retry_max < settings.retry_base:
            # Every delay is the max then, as it always was: a setup that lowered only the
            # max (RECEIVER_RETRY_MAX=1) keeps starting, and a 429's hold, at least the base
            # and at most the max, can be both.
            return replace(settings, retry_base=settings.retry_max)
        return settings

    def short_tokens(self) -> list[str]:
        """The token settings shorter than MIN_TOKEN_CHARS. Refusing them would stop existing
        deployments on upgrade; `receiver serve` warns at start instead."""
        return [
            name
            for name, token in (
                ("RECEIVER_DASHBOARD_TOKEN", self.dashboard_token),
                ("RECEIVER_METRICS_TOKEN", self.metrics_token),
            )
            if token is not None and len(token) < MIN_TOKEN_CHARS
        ]

    def check_ingest(self) -> None:
        """Refuse to accept callbacks without a way to verify them."""
        if not self.webhook_secrets and not self.allow_unsigned:
            raise ConfigError(
                "RUNFLOW_WEBHOOK_SECRET is not set: expected the signing secret Runflow gave "
                "you (whsec_...); separate two with a comma while rotating"
            )
        if PLACEHOLDER_SECRET in self.webhook_secrets:  # every real callback would get 401
            raise ConfigError(
                f"RUNFLOW_WEBHOOK_SECRET is still {PLACEHOLDER_SECRET!r} from .env.example: "
                "set the signing secret Runflow gave you (whsec_...)"
            )
