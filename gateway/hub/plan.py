"""What ``gateway plan`` and the memory estimates say of a Hub model before it is fetched."""

from __future__ import annotations

from pathlib import Path

from gateway.hub.errors import HubError
from gateway.hub.fetch import cached_path, offline, resolve
from gateway.hub.spec import HubSource


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
