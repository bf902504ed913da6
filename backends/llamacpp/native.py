"""The only place ``llama_cpp`` is imported: the module, its log routed to ``logging``.

Importing this module costs nothing; :func:`load_llama_cpp` does the heavy import (at the
backend's ``start()``) and raises :class:`gateway.errors.MissingExtra` without the extra.

Before that import, :func:`openmp_wait_defaults` chooses how llama.cpp's CPU threads wait for
each other, unless the environment already says.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import deque
from functools import cache
from types import ModuleType
from typing import Any

from gateway.errors import MissingExtra

log = logging.getLogger("backends.llamacpp.llama_cpp")

#: llama.cpp's latest warnings/errors, quoted in load failures.
recent_errors: deque[str] = deque(maxlen=8)

# ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continue the previous line.
# llama.cpp's info lines (the model card, buffer sizes) are chatty: they go to DEBUG.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: 40}


class _Library:
    """The imported module and the log callback it holds (kept alive while llama.cpp runs)."""

    def __init__(self, module: ModuleType, callback: Any) -> None:
        self.module = module
        self.callback = callback


#: How llama.cpp's CPU threads (OpenMP, GNU libgomp) wait at each of the hundreds of barriers
#: in one decode. libgomp's own default spins ~300,000 times, but only ~100 once the process
#: holds more OpenMP threads than cores, which a second model's engine makes so on a small
#: machine; a thread that stops spinning sleeps, and every barrier then waits for a wake-up.
#: Measured on 2 cores, SmolLM2, 2 threads, one chat stream, a two-model config: with one
#: model used then both, 101-115 then 66-74 tok/s with libgomp's default, 101-113 then 89-94
#: with these settings; ``OMP_WAIT_POLICY=PASSIVE`` (never spin) gave 40. ACTIVE with a spin
#: count of 10,000 spins about 0.1 ms (1,000 when threads outnumber cores), then sleeps: a
#: thread between steps does not hold a core for long.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}


def openmp_wait_defaults() -> None:
    """Set :data:`OPENMP_WAIT` in the environment unless either variable is set there (the
    operator's choice wins); libgomp reads them once, when it loads."""
    if any(name in os.environ for name in OPENMP_WAIT):
        return
    if _libgomp_loaded():
        log.warning("libgomp was loaded before llama.cpp: its wait policy stays as it was")
        return
    os.environ.update(OPENMP_WAIT)


def _libgomp_loaded() -> bool:
    """Whether the system's libgomp, the one llama.cpp links, is mapped already (a copy bundled
    under another name, as torch's ``libgomp-<hash>.so.1``, has settings of its own)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any(os.path.basename(line.rstrip()).startswith("libgomp.so") for line in maps)
    except OSError:  # not Linux: nothing to tell
        return False


def load_llama_cpp() -> ModuleType:
    """Import llama_cpp once, init its backend and route its log; MissingExtra if absent."""
    return _library().module


@cache
def _library() -> _Library:
    openmp_wait_defaults()
    try:
        import llama_cpp
    except ImportError as err:
        raise MissingExtra("llamacpp", "llama_cpp", "llamacpp") from err
    last = [logging.DEBUG]

    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        lvl = last[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
        last[0] = lvl
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            if lvl >= logging.WARNING:
                recent_errors.append(line)
            log.log(lvl, "%s", line)

    callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return _Library(llama_cpp, callback)
