"""llguidance is Rust: a bug in it raises pyo3's ``PanicException``, a ``BaseException``
that ``except Exception`` does not catch. Every call with a client's schema or grammar runs
under :func:`no_panics`, which turns such a panic into an ordinary :class:`EnginePanic`
(the request gets a 400, the server goes on)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class EnginePanic(Exception):
    """The grammar engine panicked on this input."""


@contextmanager
def no_panics() -> Iterator[None]:
    try:
        yield
    except BaseException as err:
        if type(err).__name__ != "PanicException":
            raise
        first = str(err).splitlines()[0] if str(err) else "a panic"
        raise EnginePanic(f"the grammar engine failed on it ({first[:200]})") from None
