"""Real queue servers for tests (Redis, RabbitMQ, NATS) from their Debian packages.

Each runs as our own child process on free loopback ports with its data under a tmp dir, and can
be stopped and started again mid-test on the same port and data dir ("take the sink down and
bring it back"). A missing binary skips the tests, or fails them when RECEIVER_REQUIRE_SERVICES
is set (CI installs the packages, so a skip there would hide a broken setup).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import redis

from .servers import free_port


class Service:
    """One server process; subclasses say how to run it and how to tell it is ready."""

    package: ClassVar[str]  # the Debian package that provides `candidates`
    candidates: ClassVar[tuple[str, ...]]  # absolute paths or names looked up on PATH
    start_timeout: ClassVar[float] = 20.0
    stop_timeout: ClassVar[float] = 30.0

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def popen_options(self) -> dict[str, Any]:
        """Extra subprocess.Popen arguments (e.g. the user to run as)."""
        return {}

    def ready(self) -> bool:
        """One quick probe; False while the server is still starting."""
        raise NotImplementedError

    @classmethod
    def find(cls) -> str | None:
        for candidate in cls.candidates:
            found = shutil.which(candidate)
            if found:
                return found
        return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (again) on the same port and data dir; return once it serves clients."""
        if self.running:
            return
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a hung stop can be killed whole
                **self.popen_options(),
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.package} exited early:\n{self._log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.package} not ready after {self.start_timeout:.0f}s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Graceful stop (SIGTERM); the whole process group is killed if that hangs."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def _probe(port: int, send: bytes, size: int = 4096) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(size)
    except OSError:
        return b""


class RedisService(Service):
    package = "redis-server"
    candidates = ("redis-server", "/usr/bin/redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",  # durable like a production queue: survives stop/start
            "--appendfsync", "always",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    def ready(self) -> bool:
        return _probe(self.port, b"PING\r\n").startswith(b"+PONG")

    def stream_ids(self, stream: str) -> list[str]:
        """The `id` field (the event id) of every entry of `stream`, in order."""
        client = redis.Redis.from_url(self.url)
        try:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream)  # type: ignore[assignment]
            return [fields[b"id"].decode() for _, fields in entries]
        finally:
            client.close()

    def stop(self) -> None:
        """`SHUTDOWN SAVE` writes dump.rdb to the data dir (nothing is saved while running), so
        a stream survives a stop/start like it would on a real server with persistence."""
        process = self.process
        if process is not None and process.poll() is None:
            _probe(self.port, b"SHUTDOWN SAVE\r\n")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.stop_timeout)
        super().stop()  # SIGTERM, then SIGKILL, if it is still running


class NatsService(Service):
    package = "nats-server"
    candidates = ("nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        store = self.workdir / "jetstream"
        return [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]

    def ready(self) -> bool:
        # The server greets every client with `INFO {json}`; JetStream must be on in it.
        greeting = _probe(self.port, b"")
        if not greeting.startswith(b"INFO "):
            return False
        info = json.loads(greeting[5:].split(b"\r\n")[0])
        return bool(info.get("jetstream"))


class RabbitMQService(Service):
    """The broker run directly as the current user (the Debian wrapper would `su rabbitmq`),
    with its own node name, Erlang distribution port and epmd, so it touches nothing shared."""

    package = "rabbitmq-server"
    candidates = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")
    start_timeout = 60.0  # the Erlang VM and broker boot take several seconds

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__(binary, workdir)
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"rabbit-test-{self.port}@localhost"
        (workdir / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        return [self.binary]

    def environment(self) -> dict[str, str]:
        base = self.workdir
        return {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie lands here
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

    def ready(self) -> bool:
        # AMQP 0-9-1 protocol header → the broker answers with a Connection.Start method frame
        # (type 1, channel 0) only once its listener is up, i.e. the broker has booted.
        return _probe(self.port, b"AMQP\x00\x00\x09\x01", 7).startswith(b"\x01\x00\x00")

    def close(self) -> None:
        super().close()
        # The server started a private epmd on our port; end exactly that one.
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-kill"],
                env=self.environment(),
                capture_output=True,
                timeout=10,
                check=False,
            )


S = TypeVar("S", bound=Service)


def running(kind: type[S], workdir: Path) -> Iterator[S]:
    """Fixture body: the server up for the duration, skipped (or failed) if not installed."""
    binary = kind.find()
    if binary is None:
        message = f"{kind.package} is not installed (apt-get install {kind.package})"
        if os.environ.get("RECEIVER_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    service = kind(binary, workdir)
    try:
        service.start()
        yield service
    finally:
        service.close()
