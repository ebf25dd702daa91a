from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.config import Settings

from .helpers import make_settings
from .services import NatsService, RabbitMQService, RedisService, running


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
