"""A download's progress: bytes, rate and the file under way, shared by the thread that
downloads and whoever shows it (``/admin/models``, the log, ``gateway pull``'s bar)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from gateway.hub.errors import DownloadCancelled

log = logging.getLogger("gateway.hub")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class DownloadProgress:
    """Counters one download updates (from its thread); :meth:`cancel` stops it at the next
    chunk."""

    def __init__(self, label: str, *, log_every_s: float = 5.0) -> None:
        self.label = label
        self.total_bytes = 0
        #: Bytes in the cache for this model: already there, resumed, or downloaded now.
        self.done_bytes = 0
        #: Bytes fetched over the network by this download (what the rate counts).
        self.fetched_bytes = 0
        self.file: str | None = None
        #: A vision projector (``mmproj-*.gguf``) found beside the model (not fetched).
        self.mmproj: str | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._log_every_s = log_every_s
        self._logged = self.started

    def plan(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes

    def begin_file(self, name: str, already: int = 0) -> None:
        with self._lock:
            self.file = name
            self.done_bytes += already

    def add(self, n: int) -> None:
        """``n`` bytes of the file written into the cache (a negative ``n``: a restart)."""
        self.check_cancelled()
        with self._lock:
            self.done_bytes += n
        self._maybe_log()

    def add_transfer(self, n: int) -> None:
        """``n`` bytes received over the network (Xet: fewer than written, by dedup)."""
        self.check_cancelled()
        with self._lock:
            self.fetched_bytes += n

    def check_cancelled(self) -> None:
        """Raise :class:`DownloadCancelled` if :meth:`cancel` was called."""
        if self._cancelled.is_set():
            raise DownloadCancelled(f"download of {self.label} stopped")

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._logged >= self._log_every_s:
            self._logged = now
            log.info("downloading %s: %s", self.label, self.describe())

    def finish(self) -> None:
        self.finished = time.monotonic()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def rate_bytes_per_s(self) -> float:
        elapsed = (self.finished or time.monotonic()) - self.started
        return self.fetched_bytes / elapsed if elapsed > 0 else 0.0

    def describe(self) -> str:
        pct = f"{100 * self.done_bytes / self.total_bytes:.0f}% " if self.total_bytes else ""
        return (
            f"{pct}({_size(self.done_bytes)} of {_size(self.total_bytes)}, "
            f"{_size(self.rate_bytes_per_s)}/s){f' {self.file}' if self.file else ''}"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "source": self.label,
            "file": self.file,
            "bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "bytes_per_s": round(self.rate_bytes_per_s, 1),
            "done": self.finished is not None,
        }

    def tqdm_class(self) -> type[hf_tqdm]:
        """A tqdm class for huggingface_hub's downloads that counts into this object.

        ``update`` counts bytes written to the file, ``update_transfer`` bytes received. With
        ``update_transfer`` on the class, huggingface_hub 2.x (``http_get``, and the Xet
        path's ``XetDownloadProgressReporter``) makes one bar of it and calls both: without it
        the Xet path makes a second bar whose ``update`` counts the network bytes again.
        """
        progress = self

        class Counted(hf_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                kwargs.pop("name", None)
                super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

            def update(self, n: float | None = 1) -> bool | None:
                progress.add(int(n or 0))
                return None

            def update_transfer(self, n: float | None = 1) -> None:
                progress.add_transfer(int(n or 0))

            def set_transfer_postfix_str(self, s: str = "", refresh: bool = True) -> None:
                pass

        return Counted
