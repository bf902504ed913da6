"""Plugin test fixtures: a real redis-server on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.plugins.helpers import need_program
from tests.support import RedisServer, free_port


@pytest.fixture(scope="session")
def redis_program() -> str:
    return need_program("redis-server", "redis-server")


@pytest.fixture
def redis_server(redis_program: str) -> Iterator[RedisServer]:
    server = RedisServer(redis_program, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dead_redis_url() -> str:
    """A loopback port where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"
