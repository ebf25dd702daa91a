"""A psycopg connection with the surface of sqlite3 that the store functions use.

The store's SQL is written once, for SQLite. `translate` turns a statement into PostgreSQL
(placeholders, and the few SQLite idioms listed in RULES) once per distinct text; rows index
by position and by name like sqlite3.Row; numeric results load as int or float, as SQLite
gives them. Functions the rules call (`receiver_*`) are created by the migrations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.types.string import StrDumperUnknown

from ..database_url import redact

CONNECT_TIMEOUT = 10
# libpq's TCP settings unless the URL names its own: by default a server whose host vanished
# (no reset) is noticed after about two hours of kernel keepalives, and until then every
# write waits; with these, in about half a minute, and the writer answers 503.
TCP_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,  # ms: unacknowledged data
}


def connect_options(url: str) -> dict[str, Any]:
    """psycopg.connect's keyword arguments for `url`: the timeouts above, the URL's own
    values kept."""
    named = conninfo_to_dict(url)
    options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    options.update((key, value) for key, value in TCP_DEFAULTS.items() if key not in named)
    return options


# What libpq's messages name in quotes: a server, a user, a database.
_NAMED = re.compile(r'((?:server (?:at|on socket)|user|database) )"[^"]*"')


def describe(exc: BaseException) -> str:
    """A psycopg error as one line for a reason or a log, with no password, host, user or
    database name in it: a reason also reaches callers who proved nothing (/readyz, the
    webhook's 503), and RECEIVER_DATABASE, shown at start, already says which server."""
    return _NAMED.sub(r'\1"…"', " ".join(redact(str(exc)).split())) or type(exc).__name__


# (pattern, replacement) in order; each turns an SQLite idiom of the store's SQL into its
# PostgreSQL equivalent. Only statement text goes through them: values are parameters.
RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # `+col = …` is SQLite's hint to leave col's index alone; PostgreSQL has no unary + on text
    (re.compile(r"(?<=[\s(])\+(?=[a-z_])"), ""),
    # `x IS NOT 'v'` is SQLite's null-safe inequality
    (re.compile(r"\bIS NOT (?!NULL\b)"), "IS DISTINCT FROM "),
    # SQLite's LIKE ignores ASCII case (the columns are COLLATE "C": ILIKE folds ASCII only)
    (re.compile(r"\bLIKE\b"), "ILIKE"),
    # the score bucket: SQLite's CAST truncates and saturates, PostgreSQL's rounds and fails
    (re.compile(r"min\(CAST\(([\w.]+) \* 10 AS INTEGER\), 9\)"), r"receiver_score_bucket(\1)"),
    # SQLite's total(): a float sum that is 0.0 over no rows
    (re.compile(r"\btotal\("), "receiver_total("),
    # round(double precision, int) does not exist in PostgreSQL
    (re.compile(r"\bround\("), "receiver_round("),
    # the labels of a top_issues JSON array, ordered bytewise as the columns are (COLLATE "C")
    (
        re.compile(r"json_each\(([\w.]+)\) (\w+)"),
        r'LATERAL (SELECT label COLLATE "C" AS value'
        r" FROM json_array_elements_text(CAST(\1 AS json)) AS labels(label)) AS \2",
    ),
)

# `?`, `:name` and `%` become psycopg's forms; inside quotes only `%` is doubled (psycopg reads
# every `%` of a statement with parameters).
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|(?<!:):(\w+)|\?|%")


def _placeholder(match: re.Match[str]) -> str:
    text = match.group(0)
    if text == "?":
        return "%s"
    if match.group(1) is not None:
        return f"%({match.group(1)})s"
    return text.replace("%", "%%")  # a lone `%`, or a quoted literal


@lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    for pattern, replacement in RULES:
        sql = pattern.sub(replacement, sql)
    return _TOKENS.sub(_placeholder, sql)


class Row(tuple[Any, ...]):
    """A result row: `row[0]`, `row["name"]`, `dict(row)`, unpacking (like sqlite3.Row)."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: n for n, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> Row:
        return Row(values, index)

    return make


class _Number(Loader):
    """numeric (sum() of integers, 1.0 * …) as SQLite would give it: int when whole."""

    def load(self, data: Buffer) -> int | float:
        text = bytes(data).decode()
        return int(text) if text.lstrip("-").isdigit() else float(text)


class _Text(StrDumperUnknown):
    """PostgreSQL's text cannot hold NUL, which JSON can carry ("\\u0000") in a signed
    callback's fields: it is stored as U+FFFD (the delivery keeps the exact bytes), never
    refused (a refusal would be a 503 that Runflow retries forever)."""

    def dump(self, obj: str) -> Buffer | None:
        return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)


Params = Sequence[Any] | Mapping[str, Any]


class PgConnection:
    """The subset of sqlite3.Connection the store uses, over one psycopg connection."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Params = ()) -> psycopg.Cursor[Any]:
        return self.raw.execute(translate(sql), params)

    def executemany(self, sql: str, params: Sequence[Params]) -> None:
        if params:
            with self.raw.cursor() as cursor:
                cursor.executemany(translate(sql), params)

    def pipeline(self) -> AbstractContextManager[psycopg.Pipeline]:
        return self.raw.pipeline()

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def commit(self) -> None:
        self.raw.commit()

    def close(self) -> None:
        self.raw.close()


def configure(raw: psycopg.Connection[Any]) -> None:
    """Per connection: rows like sqlite3.Row, numbers like SQLite's, text without NUL."""
    raw.row_factory = _rows
    raw.adapters.register_dumper(str, _Text)
    raw.adapters.register_loader("numeric", _Number)


def connect(url: str, *, autocommit: bool = True) -> PgConnection:
    raw = psycopg.connect(url, autocommit=autocommit, **connect_options(url))
    configure(raw)
    return PgConnection(raw)
