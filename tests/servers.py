"""Real processes for tests: `receiver serve` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx

from .database import database_for
from .helpers import SECRET_A, SECRET_B, TOKEN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Process:
    """A `receiver` command in a subprocess under `workdir`, logging to `log`; `start` returns
    once `ready()` says so."""

    name = "receiver"

    def __init__(self, workdir: Path, env: dict[str, str], log: str) -> None:
        self.workdir = workdir
        self.env = env
        self.log = workdir / log
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "receiver", *self.command()],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log.read_text()}")
            if self.ready():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


class ReceiverProcess(_Process):
    """`receiver serve` in a subprocess with its own database under `workdir`."""

    def __init__(self, workdir: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        environment = {
            **os.environ,
            "RUNFLOW_WEBHOOK_SECRET": f"{SECRET_A},{SECRET_B}",
            "RECEIVER_DATABASE": database_for(workdir / "receiver.db"),
            "RECEIVER_DASHBOARD_TOKEN": TOKEN,
            **env,
        }
        super().__init__(workdir, environment, "server.log")

    def command(self) -> list[str]:
        return ["serve", "--port", str(self.port), *self.args]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m receiver ARGS` as a user runs it: its own process, its exit status."""
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        cwd=cwd,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


class WorkerProcess(_Process):
    """`receiver worker` in a subprocess: the outbox worker apart from the servers."""

    name = "worker"

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(workdir, env, "worker.log")

    def command(self) -> list[str]:
        return ["worker"]

    def ready(self) -> bool:
        return b"worker running" in self.log.read_bytes()
