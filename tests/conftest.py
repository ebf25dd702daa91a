from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.config import Settings

from . import database
from .helpers import make_settings
from .postgres import PostgresService
from .services import NatsService, RabbitMQService, RedisService, running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if database.POSTGRES:
        skip = pytest.mark.skip(reason="about the SQLite file itself")
        for item in items:
            if item.get_closest_marker("sqlite_only"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresService]:
    """A PostgreSQL server with a migrated template database (tests/postgres.py)."""
    for server in running(PostgresService, tmp_path_factory.mktemp("postgres")):
        server.make_template()
        yield server


@pytest.fixture(autouse=True)
def _backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """On RECEIVER_TEST_BACKEND=postgresql: every test's databases on the session's server."""
    if not database.POSTGRES:
        yield
        return
    database.use(request.getfixturevalue("postgres_server"))
    try:
        yield
    finally:
        database.drop_all()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


# Real queue servers (tests/services.py): one each per session, started on first use.
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisService]:
    yield from running(RedisService, tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQService]:
    yield from running(RabbitMQService, tmp_path_factory.mktemp("rabbitmq"))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsService]:
    yield from running(NatsService, tmp_path_factory.mktemp("nats"))


@pytest.fixture
def stream(redis_server: RedisService) -> Iterator[str]:
    """A Redis stream name of its own, removed afterwards with the sink's dedupe keys."""
    name = f"test:{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.delete(name, *client.keys(f"{name}:dedupe:*"))
    finally:
        client.close()
