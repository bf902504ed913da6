"""One replica's state: outstanding requests, health, ejection and re-admission.

Failures (a request the replica could not serve, a failed probe) count up; a request it served
resets the count. ``eject_after`` consecutive failures eject it: no request is sent to it until
``readmit_after`` consecutive probes succeed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("backends.openai")


@dataclass(eq=False)
class Replica:
    url: str
    weight: float
    eject_after: int
    readmit_after: int
    #: Requests sent to it and not yet ended.
    outstanding: int = 0
    ejected: bool = True
    failures: int = 0
    probe_successes: int = 0
    #: Why it was ejected (for logs and tests).
    reason: str = "not probed yet"
    #: Lifetime counters.
    served: int = 0
    failed: int = 0
    ejections: int = 0
    readmissions: int = 0
    _probed: bool = field(default=False, repr=False)

    @property
    def up(self) -> bool:
        return not self.ejected

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count one request as outstanding while the block runs."""
        self.outstanding += 1
        try:
            yield
        finally:
            self.outstanding -= 1

    def request_succeeded(self) -> None:
        self.served += 1
        self.failures = 0

    def request_failed(self, reason: str) -> None:
        self.failed += 1
        self._failure(reason)

    def probed(self, ok: bool, detail: str = "") -> None:
        if not self._probed:  # the first probe decides the initial state
            self._probed = True
            self.ejected, self.reason = not ok, ("" if ok else f"probe failed: {detail}")
            if ok:
                log.info("replica %s is up", self.url)
            else:
                log.warning("replica %s is down: %s", self.url, detail)
            return
        if ok:
            self._probe_ok()
        else:
            self.probe_successes = 0
            self._failure(f"probe failed: {detail}")

    def _probe_ok(self) -> None:
        if not self.ejected:
            return
        self.probe_successes += 1
        if self.probe_successes >= self.readmit_after:
            self.ejected, self.failures, self.reason = False, 0, ""
            self.readmissions += 1
            log.info("replica %s re-admitted after %d good probe(s)", self.url, self.readmit_after)

    def _failure(self, reason: str) -> None:
        self.failures += 1
        if not self.ejected and self.failures >= self.eject_after:
            self.ejected, self.reason, self.probe_successes = True, reason, 0
            self.ejections += 1
            log.warning(
                "replica %s ejected after %d consecutive failures: %s",
                self.url,
                self.failures,
                reason,
            )
