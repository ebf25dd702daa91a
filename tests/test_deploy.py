"""What of deploy/ can be checked on this machine: the Procfile's commands start and answer,
the systemd units pass `systemd-analyze verify`, the compose file parses into what it claims."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from receiver.worker import Worker

from .helpers import ROOT, SECRET_A
from .servers import free_port

DEPLOY = ROOT / "deploy"
RECEIVER = Path(sys.executable).with_name("receiver")


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_the_procfile_commands_start_and_answer(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{RECEIVER.parent}:{os.environ['PATH']}",
        "PORT": str(port),
        "RUNFLOW_WEBHOOK_SECRET": SECRET_A,
        "RECEIVER_DATABASE": str(tmp_path / "r.db"),
        "RECEIVER_DASHBOARD_TOKEN": "deploy-test",
    }
    commands = procfile()
    assert set(commands) == {"web", "worker"}
    processes = {
        name: subprocess.Popen(  # noqa: S602 (the Procfile is a shell line, as platforms run it)
            f"exec {command}",
            shell=True,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for name, command in commands.items()
    }
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "web did not answer /healthz"
            time.sleep(0.1)
        time.sleep(1.0)  # let the worker print its banner before it is stopped
    finally:
        for process in processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        outputs = {name: process.communicate(timeout=30)[0] for name, process in processes.items()}
    assert processes["web"].returncode == 0, outputs["web"]
    assert processes["worker"].returncode == 0, outputs["worker"]
    assert "worker running" in outputs["worker"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", ["receiver.service", "receiver-worker.service"])
def test_the_systemd_units_verify(tmp_path: Path, unit: str) -> None:
    text = (DEPLOY / unit).read_text().replace("/opt/receiver/bin/receiver", str(RECEIVER))
    (tmp_path / unit).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""  # unknown keys are only warned about


def test_the_compose_file_runs_receiver_and_worker_on_postgresql() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"receiver", "worker", "postgres", "redis"}
    assert services["receiver"]["environment"]["RECEIVER_WORKER"] == "false"
    assert services["worker"]["command"] == ["receiver", "worker"]
    for name in ("receiver", "worker"):
        service = services[name]
        assert (ROOT / "deploy" / service["build"]["dockerfile"].split("/")[-1]).exists()
        url = service["environment"]["RECEIVER_DATABASE"]
        assert url.startswith("postgresql://receiver:${POSTGRES_PASSWORD")
        assert url.endswith("@postgres:5432/receiver")
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "receiver"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert "postgres:/var/lib/postgresql/data" in postgres["volumes"]
    assert (DEPLOY / "receiver.toml.example").exists()


def test_the_image_can_reach_postgresql() -> None:
    assert "postgres]" in (DEPLOY / "Dockerfile").read_text()


def test_the_dockerfile_runs_unprivileged_with_a_healthcheck_and_migrates_first() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "\nUSER receiver\n" in dockerfile
    assert "HEALTHCHECK" in dockerfile
    assert "receiver migrate && exec receiver serve" in dockerfile
    assert "FROM python:3.11-slim" in dockerfile


def test_the_compose_files_usage_line_reads_the_repositorys_env_file() -> None:
    """${POSTGRES_PASSWORD} is interpolated from the shell or the project directory's .env,
    which is deploy/: without --env-file .env the command in the file stops at once
    ("set POSTGRES_PASSWORD in .env"). deploy/README.md gives the flag; so must the file."""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    usage = [line for line in compose.splitlines() if "docker compose" in line]
    assert usage
    for line in usage:
        assert "--env-file .env" in line, line
    assert "docker compose --env-file .env -f deploy/docker-compose.yml" in (
        DEPLOY / "README.md"
    ).read_text().replace("\n", " ")


def test_the_stop_timeouts_leave_the_worker_its_time_to_finish() -> None:
    """deploy/README.md: on SIGTERM the worker finishes the deliveries in flight (up to
    Worker.stop's timeout) and the process exits 0. A supervisor that kills sooner (systemd's
    TimeoutStopSec, Docker's 10 s default grace) cuts that short."""
    worker_stop = inspect.signature(Worker.stop).parameters["timeout"].default
    for unit in ("receiver.service", "receiver-worker.service"):
        text = (DEPLOY / unit).read_text()
        seconds = int(text.split("TimeoutStopSec=", 1)[1].split()[0])
        assert seconds > worker_stop, unit
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    for name in ("receiver", "worker"):
        grace = services[name].get("stop_grace_period", "10s")
        assert int(grace.removesuffix("s")) > worker_stop, name
