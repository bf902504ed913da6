"""Shared test setup: the ``gpu`` marker is skipped where no CUDA device is present."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.support import close_test_clients

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the default stores (stored responses) of every gateway a test starts, in-process or not
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="gateway-tests-state-")
# and their default KV disk tiers
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gateway-tests-cache-")


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _close_test_clients() -> Iterator[None]:
    """The SDK clients a test made with ``openai_client`` close when it ends."""
    yield
    close_test_clients()
