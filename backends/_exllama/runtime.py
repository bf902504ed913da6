"""Importing the libraries: lazily, with one clear line when the package or the GPU is missing.

Neither exllamav2 nor exllamav3 imports on a machine without CUDA: their CUDA extension is
compiled (or loaded) on first import. So torch and a CUDA device are checked first, and the
library is imported only then, inside the backend's ``start()``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import time
from types import ModuleType

from gateway.errors import EngineError, MissingExtra

log = logging.getLogger("backends.exllama")


class NoCudaDevice(EngineError):
    """The backend needs a CUDA GPU and torch sees none."""

    default_code = "no_cuda_device"


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_library(backend: str, module: str) -> ModuleType:
    """torch, a CUDA device, then ``module``; the extra to install is named after the backend.

    Raises :class:`MissingExtra` (package missing) or :class:`NoCudaDevice`.
    """
    for name in ("torch", module):
        if not _find(name):
            raise MissingExtra(backend, name, backend)
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        raise NoCudaDevice(
            f"backend {backend!r} needs a CUDA GPU: torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}) sees no CUDA device"
        )
    started = time.perf_counter()
    log.info(
        "importing %s (its CUDA extension is compiled on first use; that can take minutes)", module
    )
    lib = importlib.import_module(module)
    log.info("%s %s ready in %.1f s", module, version(module), time.perf_counter() - started)
    return lib


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class LoadProgress:
    """A ``callback(done, total)`` for the libraries' loaders that logs every 10 %."""

    def __init__(self, model: str, step_percent: int = 10) -> None:
        self.model = model
        self.step = step_percent
        self._next = 0
        self._started = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        percent = 100 * done // total
        if percent >= self._next:
            log.info(
                "loading %s: %d/%d modules (%d%%, %.1f s)",
                self.model,
                done,
                total,
                percent,
                time.perf_counter() - self._started,
            )
            self._next = (percent // self.step + 1) * self.step
