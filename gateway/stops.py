"""Stop strings over a stream of text pieces: never emit a stop string, even split across pieces."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed generated text; get back what is safe to send.

    Text that could be the start of a stop string is held back until it is known not to be.
    When a stop string appears, everything before it is released and :attr:`stopped` is set.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.stopped = False
        #: The stop string that ended the text (the first in the text, if several).
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        for n in range(min(self._hold - 1, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation, release what was held back."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
