"""`receiver serve --workers N` supervises its workers from here, in a fresh interpreter that
imports only uvicorn and the log setup: the supervisor stays at ~24 MB instead of the ~52 MB
of a process that loaded the app, while each worker loads the app itself
(docs/performance.md)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

import click

# The HTTP protocol of every `receiver serve` process (receiver/protocol.py), named so that
# uvicorn imports it in each worker process and this one stays lean.
HTTP_PROTOCOL = "receiver.protocol:WebhookProtocol"


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


def main(argv: list[str]) -> None:
    import uvicorn

    from . import logs

    host, port, workers, log_format, log_level = argv
    log_config = logs.configure(log_format, log_level, sys.stderr)
    with shared_metrics_dir():
        uvicorn.run(
            "receiver.app:from_env",
            factory=True,
            host=host,
            port=int(port),
            workers=int(workers),
            http=HTTP_PROTOCOL,
            log_config=log_config,
            access_log=False,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
