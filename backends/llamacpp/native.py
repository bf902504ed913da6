"""The only place ``llama_cpp`` is imported: the module, its log routed to ``logging``.

Importing this module costs nothing; :func:`load_llama_cpp` does the heavy import (at the
backend's ``start()``) and raises :class:`gateway.errors.MissingExtra` without the extra.
"""

from __future__ import annotations

import ctypes
import logging
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


def load_llama_cpp() -> ModuleType:
    """Import llama_cpp once, init its backend and route its log; MissingExtra if absent."""
    return _library().module


@cache
def _library() -> _Library:
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
