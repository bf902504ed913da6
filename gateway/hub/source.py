"""What a model config with a Hub source offers the core (the pool, ``gateway plan``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gateway.hub.spec import HubSource

if TYPE_CHECKING:
    from gateway.config import ModelConfig


@runtime_checkable
class HubSourced(Protocol):
    """A model table that may name its files on the Hub instead of a local path."""

    def hub_source(self) -> HubSource | None:
        """The source, or None if the table gives a local path."""
        ...

    def with_local_files(self, path: Path) -> ModelConfig:
        """This table with the fetched files' local path (a GGUF, or a folder) in place."""
        ...


def hub_source_of(config: object) -> HubSource | None:
    return config.hub_source() if isinstance(config, HubSourced) else None
