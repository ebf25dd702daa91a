"""A real PostgreSQL server for tests, from the Debian package (`apt-get install postgresql`).

initdb and the server run as our child processes in a temp dir on a free loopback port (as the
`postgres` user when we are root: initdb refuses root). One migrated template database is made
per session; each test gets a fresh copy of it (CREATE DATABASE … TEMPLATE: milliseconds) and
drops it afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import psycopg

from receiver.store import Store

from .services import Service

TEMPLATE = "receiver_template"


def _bindir() -> str | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    return str(Path(found[-1]).parent) if found else None


class PostgresService(Service):
    package = "postgresql"
    candidates: ClassVar[tuple[str, ...]] = ()
    start_timeout = 30.0
    # The data is thrown away: no fsync (commits still wait for the WAL write). The benchmark
    # (bench/ingest.py) runs with () instead, durable as in production.
    tuning: ClassVar[tuple[str, ...]] = ("fsync=off", "full_page_writes=off")

    def __init__(self, binary: str, workdir: Path) -> None:
        # tmp_path's parents are private to root; the server user needs a dir of its own.
        own = Path(tempfile.mkdtemp(prefix="receiver-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(own, self.user)
        super().__init__(binary, own)
        self.data = own / "data"
        self.names = itertools.count(1)
        self._initdb()

    @classmethod
    def find(cls) -> str | None:
        bindir = _bindir()
        return f"{bindir}/postgres" if bindir else None

    def _as_user(self) -> dict[str, Any]:
        return {"user": self.user, "group": self.user} if self.user else {}

    def _initdb(self) -> None:
        initdb = str(Path(self.binary).parent / "initdb")
        subprocess.run(
            [initdb, "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8"],
            cwd=self.workdir,
            capture_output=True,
            check=True,
            **self._as_user(),
        )

    def command(self) -> list[str]:
        settings = ("max_connections=300", "deadlock_timeout=100ms", *self.tuning)
        return [
            self.binary,
            "-D", str(self.data),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.workdir),
            *(part for setting in settings for part in ("-c", setting)),
        ]  # fmt: skip

    def popen_options(self) -> dict[str, Any]:
        return self._as_user()  # Popen switches user itself: our signals reach the server

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def admin(self, *statements: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def make_template(self) -> None:
        self.admin(f"CREATE DATABASE {TEMPLATE}")
        Store(self.url_for(TEMPLATE)).migrate()

    def create(self) -> str:
        """A fresh, migrated database; returns its URL."""
        name = f"test_{next(self.names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url_for(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """Fast shutdown: SIGTERM alone (smart) waits for every client, open pools included,
        to leave first."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGINT)
        super().stop()

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)
