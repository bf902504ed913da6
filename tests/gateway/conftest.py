from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.services import Services, build_services
from tests.gateway.helpers import scripted_config


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    config = scripted_config({"m": {"aliases": ["alias"], "reply": "one two three four five"}})
    services = build_services(config)
    await services.pool.start()
    yield services
    await services.pool.aclose()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client (no lifespan: the fixture loads the models itself)."""
    app = create_app(services.config, services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c
