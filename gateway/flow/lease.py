"""A request's hold on its model: the model's lease and its admitted sequences."""

from __future__ import annotations

from gateway.backend import Backend
from gateway.pool import ModelEntry


class Lease:
    """Taken once the request is admitted; :meth:`release` gives both back, exactly once."""

    def __init__(self, entry: ModelEntry, backend: Backend, sequences: int) -> None:
        self.entry = entry
        self.backend = backend
        self.sequences = sequences
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.entry.admission.release(self.sequences)
        self.entry.release()
