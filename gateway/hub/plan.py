"""What ``gateway plan`` and the memory estimates say of a Hub model before it is fetched."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway.hub.errors import HubError
from gateway.hub.fetch import cached_path, offline, resolve
from gateway.hub.source import HubSourced
from gateway.hub.spec import HubSource

if TYPE_CHECKING:
    from gateway.config import ModelConfig


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def local_or_explain(source: HubSource) -> Path:
    """The model's cached path; else a ``ValueError``: "not downloaded" with the Hub's sizes
    when online (its files and bytes), or "not downloaded" alone when offline."""
    path = cached_path(source)
    if path is not None:
        return path
    if offline():
        raise ValueError(f"{source.label}: not downloaded (offline: HF_HUB_OFFLINE is set)")
    try:
        resolved = resolve(source)
    except HubError as err:
        raise ValueError(f"not downloaded: {err}") from None
    files = ", ".join(f.name for f in resolved.files)
    raise ValueError(
        f"{source.label}: not downloaded ({_size(resolved.total_bytes)} of weights on the Hub: "
        f"{files}); `gateway pull {source.label}` fetches it"
    )


def planned_config(config: ModelConfig) -> ModelConfig:
    """``config`` as ``gateway plan`` estimates it: a Hub model with its cached files' path in
    place (any backend: a GGUF, an ExLlama folder); not cached: the ``ValueError`` of
    :func:`local_or_explain` (which may ask the Hub for sizes: never under the load lock)."""
    if isinstance(config, HubSourced):
        source = config.hub_source()
        if source is not None:
            return config.with_local_files(local_or_explain(source))
    return config
