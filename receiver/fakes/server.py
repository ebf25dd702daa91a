"""Serve an ASGI app for real on a loopback port, in a background thread, for tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


@contextmanager
def serve_in_thread(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    http: type[asyncio.Protocol] | str = "h11",
    keep_alive: int = 5,
) -> Iterator[str]:
    """Yield the base URL (`http://127.0.0.1:PORT`) while uvicorn serves `app`.

    The socket is bound here, before the thread starts, so the port is known and nobody can
    take it in between; `port` reuses a known one (to bring a "crashed" destination back).
    `http` is uvicorn's HTTP protocol (a name, an import string or a class), `keep_alive` how
    long it keeps an idle connection open (seconds). On exit the server stops at once: idle
    keep-alive connections are closed, and a request still running gets one second before it
    is cancelled.
    """
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose protocol says
    # TCP, and without it each answer waited ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop="asyncio",
        http=http,
        ws="none",
        lifespan="auto",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=keep_alive,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"serve-{bound}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the app on {host}:{bound} did not start")
            time.sleep(0.005)
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT)
        sock.close()
