"""`receiver serve --workers N` supervises its workers from here, in a fresh interpreter that
imports only uvicorn and the log setup: the supervisor stays at ~24 MB instead of the ~52 MB
of a process that loaded the app, while each worker loads the app itself
(docs/performance.md)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import click

# The HTTP protocol of every `receiver serve` process (receiver/protocol.py), named so that
# uvicorn imports it in each worker process and this one stays lean.
HTTP_PROTOCOL = "receiver.protocol:WebhookProtocol"

# The fingerprint of the settings `serve` started with (Settings.fingerprint), for each worker
# process to compare with its own: one started later (a replacement) reads .env and
# receiver.toml again, and after an edit for the next restart would forward to other sinks.
STARTED_WITH = "RECEIVER_SERVE_SETTINGS"


def given_metrics_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR, when set: every process writing there (`serve --workers N`,
    and a `receiver worker` on the same machine given the same one) adds to /metrics."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given and not os.path.isdir(given):
        raise click.ClickException(f"PROMETHEUS_MULTIPROC_DIR: no such directory {given!r}")
    return given or None


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[str]:
    """The PROMETHEUS_MULTIPROC_DIR the server processes share so that /metrics sums them: the
    one set in the environment (kept as it is), else a fresh temporary one (removed after)."""
    given = given_metrics_dir()
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="receiver-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield directory
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def supervise(host: str, port: int, workers: int, log_format: str, log_level: str) -> None:
    """Replace this process (same pid: signals still reach it) with a lean supervisor."""
    arguments = [host, str(port), str(workers), log_format, log_level]
    sys.stdout.flush()  # exec drops what is still buffered (the banner)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "receiver.supervisor", *arguments])  # noqa: S606


def stop_with_parent(interval: float = 1.0) -> None:
    """In a worker process: stop it, gracefully as SIGTERM does, once its supervisor is gone.
    After a `kill -9` of the supervisor its workers went on serving, holding the port, so the
    service could not start again. The supervisor's pid is the one multiprocessing recorded
    when it started this process: it may be gone already."""
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None and started_by.pid else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="receiver-parent-watch", daemon=True).start()


QUICK_DEATH = 10.0  # seconds: a worker that dies younger than this is in a crash loop
LONGEST_WAIT = 30.0


def restart_delay(lived: float, last: float) -> float:
    """Seconds before a dead worker is replaced: at once after a life of QUICK_DEATH or more,
    else twice the last wait (from 1 s, at most LONGEST_WAIT). A worker that keeps dying (a
    resource gone, a bad deploy) was started again twice a second, for ever, taking the CPU
    of those still serving."""
    if lived >= QUICK_DEATH:
        return 0.0
    return min(max(2 * last, 1.0), LONGEST_WAIT)


def how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


def main(argv: list[str]) -> None:
    from uvicorn.config import STARTUP_FAILURE, Config
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    from . import logs

    log = logging.getLogger("receiver.supervisor")

    class Supervisor(Multiprocess):
        """uvicorn's, but a worker that fails to start (the database down while one is
        replaced) ends the supervisor with exit status 3, for the service manager to start it
        again: uvicorn's exits 0, and stays down once the database is back. A worker that died
        is named with how it ended, and one that keeps dying is replaced after a growing wait
        (restart_delay)."""

        def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
            super().__init__(config, sockets)
            self.failed = False
            self.born: dict[int, float] = {}  # when the worker in each place started
            self.waits: dict[int, float] = {}  # the last wait before replacing the one there
            self.due: dict[int, float] = {}  # when a replacement is to start there

        def keep_subprocess_alive(self) -> None:
            now = time.monotonic()
            for index, process in enumerate(self.processes):
                if self.should_exit.is_set():
                    return
                if index in self.due:
                    if now >= self.due[index]:
                        self._replace(index, now)
                    continue
                if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                    continue
                hung = process.process.is_alive()
                process.kill()
                process.join()
                if process.exitcode == STARTUP_FAILURE:
                    log.error("worker [%s] failed to start: stopping (exit 3)", process.pid)
                    self.failed = True
                    self.should_exit.set()
                    return
                wait = restart_delay(now - self.born.get(index, began), self.waits.get(index, 0))
                self.waits[index] = wait
                log.error(
                    "worker [%s] %s: starting another%s",
                    process.pid,
                    "did not answer its health check, killed"
                    if hung
                    else how_it_ended(process.exitcode),
                    f" in {wait:g}s" if wait else "",
                )
                self.due[index] = now + wait
                if not wait:
                    self._replace(index, now)

        def _replace(self, index: int, now: float) -> None:
            del self.due[index]
            self.born[index] = now
            self.processes[index] = replacement = Process(self.config, self.sockets)
            replacement.start()

    began = time.monotonic()  # the first workers start with the supervisor
    host, port, workers, log_format, log_level = argv
    log_config = logs.configure(log_format, log_level, sys.stderr)
    with shared_metrics_dir():
        config = Config(
            "receiver.app:from_env",
            factory=True,
            host=host,
            port=int(port),
            workers=int(workers),
            http=HTTP_PROTOCOL,
            log_config=log_config,
            access_log=False,
        )
        supervisor = Supervisor(config, sockets=[config.bind_socket()])
        with contextlib.suppress(KeyboardInterrupt):
            supervisor.run()
    if supervisor.failed:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main(sys.argv[1:])
