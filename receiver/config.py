"""Settings from the environment (and `.env`); each mistake names the variable and what it wants."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines; `#` comments, `export ` prefixes and matching quotes allowed."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=value, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def _parsed(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    value = _get(env, name)
    return default if value is None else parse(value)


def _integer(name: str, minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = minimum - 1
        if not minimum <= number <= maximum:
            raise ConfigError(
                f"{name} must be a whole number from {minimum} to {maximum}, got {text!r}"
            )
        return number

    return parse


def _boolean(name: str) -> Callable[[str], bool]:
    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {text!r}")

    return parse


def _database(text: str) -> str:
    if text.startswith(("postgres://", "postgresql://")):
        raise ConfigError(
            "RECEIVER_DATABASE: PostgreSQL is not supported yet; expected a SQLite file path"
        )
    return text.removeprefix("sqlite:///")


def _public_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ConfigError(f"RECEIVER_PUBLIC_URL must start with http:// or https://, got {text!r}")
    return text.rstrip("/")


@dataclass(frozen=True)
class Settings:
    webhook_secrets: tuple[str, ...] = ()
    database: str = "receiver.db"
    dashboard_token: str = ""
    dashboard_token_generated: bool = False
    public_url: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allow_unsigned: bool = False
    port: int = 8000

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
    ) -> Settings:
        """Read settings; the process environment wins over `env_file`."""
        env = {**(read_env_file(env_file) if env_file else {}), **(environ or os.environ)}
        secrets_text = _get(env, "RUNFLOW_WEBHOOK_SECRET") or ""
        token = _get(env, "RECEIVER_DASHBOARD_TOKEN")
        database = _get(env, "RECEIVER_DATABASE") or _get(env, "DATABASE_URL") or "receiver.db"
        return cls(
            webhook_secrets=tuple(s.strip() for s in secrets_text.split(",") if s.strip()),
            database=_database(database),
            dashboard_token=token or secrets.token_urlsafe(24),
            dashboard_token_generated=token is None,
            public_url=_parsed(env, "RECEIVER_PUBLIC_URL", _public_url, None),
            max_body_bytes=_parsed(
                env,
                "RECEIVER_MAX_BODY_BYTES",
                _integer("RECEIVER_MAX_BODY_BYTES", 1024, 1 << 30),
                DEFAULT_MAX_BODY_BYTES,
            ),
            allow_unsigned=_parsed(
                env, "RECEIVER_ALLOW_UNSIGNED", _boolean("RECEIVER_ALLOW_UNSIGNED"), False
            ),
            port=_parsed(env, "PORT", _integer("PORT", 1, 65535), 8000),
        )

    def check_ingest(self) -> None:
        """Refuse to accept callbacks without a way to verify them."""
        if not self.webhook_secrets and not self.allow_unsigned:
            raise ConfigError(
                "RUNFLOW_WEBHOOK_SECRET is not set: expected the signing secret Runflow gave "
                "you (whsec_...); separate two with a comma while rotating"
            )
