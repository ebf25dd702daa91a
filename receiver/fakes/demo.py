"""`make demo`: submit → callback → store → forward → dashboard on this machine, with the
emulator standing in for Runflow and a recording consumer as the sink. Loopback only."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import httpx

from .recorder import Recorder
from .runflow import FakeRunflow
from .server import serve_in_thread

API_KEY = "rf_demo_key"
IMAGES = [
    ("https://cdn.example.com/renders/good-headshot-1.png", "headshot"),
    ("https://cdn.example.com/renders/good-headshot-2.png", "headshot"),
    ("https://cdn.example.com/renders/headshot-3.png", "headshot"),
    ("https://cdn.example.com/renders/invalid-upload.png", "headshot"),
    ("https://cdn.example.com/renders/pass-product-1.png", "product"),
    ("https://cdn.example.com/renders/product-2.png", "product"),
]


def run(*args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(  # noqa: S603 (our own CLI, fixed arguments)
        [sys.executable, "-m", "receiver", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode:
        raise SystemExit(f"receiver {args[0]} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="receiver port")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--once", action="store_true", help="exit when every verdict is in")
    options = parser.parse_args(argv)
    with socket.socket() as probe:  # the demo's receiver must be the one answering there
        try:
            probe.bind(("127.0.0.1", options.port))
        except OSError:
            raise SystemExit(
                f"port {options.port} is taken (is `make run` going?): make demo DEMO_PORT=8100"
            ) from None
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("receiver.db*"):
        stale.unlink()
    secret = "whsec_demo_" + secrets.token_urlsafe(18)
    token = secrets.token_urlsafe(12)
    consumer = Recorder()
    emulator = FakeRunflow(API_KEY, callback_secrets=(secret,), callback_delay=1.5)
    with ExitStack() as stack:
        runflow_url = stack.enter_context(serve_in_thread(emulator.app))
        consumer_url = stack.enter_context(serve_in_thread(consumer.app))
        (workdir / "receiver.toml").write_text(
            f'[[sinks]]\nname = "demo-consumer"\ntype = "http"\nurl = "{consumer_url}/events"\n'
        )
        url = f"http://127.0.0.1:{options.port}"
        env = {  # none of the shell's settings, nor a .env (the processes run in workdir)
            **{k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "RUNFLOW_"))},
            "RUNFLOW_WEBHOOK_SECRET": secret,
            "RUNFLOW_API_KEY": API_KEY,
            "RUNFLOW_API_BASE": runflow_url,
            "RECEIVER_PUBLIC_URL": url,
            "RECEIVER_DATABASE": str(workdir / "receiver.db"),
            "RECEIVER_CONFIG": str(workdir / "receiver.toml"),
            "RECEIVER_DASHBOARD_TOKEN": token,
        }
        server = subprocess.Popen(  # noqa: S603 (our own CLI, fixed arguments)
            [sys.executable, "-m", "receiver", "serve", "--port", str(options.port)],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "server.log").open("w"),
        )
        stack.callback(server.wait, 20)
        stack.callback(server.terminate)
        for _ in range(200):
            if server.poll() is not None or _answers(url):
                break
            time.sleep(0.05)
        if server.poll() is not None or not _answers(url):
            raise SystemExit(f"receiver did not start; see {workdir / 'server.log'}")
        print(f"receiver on {url}, emulated Runflow on {runflow_url}")
        for number, (image, task_type) in enumerate(IMAGES, start=1):
            print(
                run(
                    "submit",
                    image,
                    "--task-type",
                    task_type,
                    "--client-ref",
                    f"demo-{number}",
                    env=env,
                    cwd=workdir,
                )
            )
        try:
            consumer.wait_for(len(IMAGES), timeout=60)
        except TimeoutError as exc:
            raise SystemExit(f"{exc}; see {workdir / 'server.log'}") from None
        print("\nforwarded to the consumer:")
        for item in consumer.received:
            data = json.loads(item.body)["data"]
            print(
                f"  {data['client_ref']}: {data['status']}, passed={data['passed']}, "
                f"score={data['score']}, refetched={data['refetched']}"
            )
        print("\n" + run("query", env=env, cwd=workdir))
        print(f"\nAPI:  curl -H 'Authorization: Bearer {token}' {url}/api/stats")
        print(f"Dashboard: {url}/ (token {token})")
        if not options.once:
            print("Ctrl-C stops the demo.")
            with suppress(KeyboardInterrupt):
                server.wait()


if __name__ == "__main__":
    main()
