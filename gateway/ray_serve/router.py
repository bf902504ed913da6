"""Ray Serve request routers for the model server.

:class:`PrefixRouter` sends a request to the replica its conversation's affinity key hashes
to (rendezvous hashing over the replicas' ids: a replica joining or leaving moves only its own
conversations), with bounded load: a replica holding more than ``load_factor`` times the mean
of the replicas' queues passes its requests on to the next in the key's order. A request with
no key goes to the least loaded. Ray Serve then takes, rank by rank, the first replica that has
room (``max_ongoing_requests``).

:class:`RoundRobinRouter` takes turns, blind to prefixes (the baseline it is measured against).
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from gateway.affinity import rendezvous_rank


def affinity_of(pending: PendingRequest | None) -> str | None:
    """The key the ingress passed as the call's first argument (None: any replica)."""
    if pending is None or not pending.args:
        return None
    key = pending.args[0]
    return key if isinstance(key, str) else None


class PrefixRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, load_factor: float = 1.25, **kwargs: Any) -> None:
        self.load_factor = load_factor

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        key = affinity_of(pending_request)
        if key is None:
            return [candidate_replicas]  # the one with the shortest queue
        names = [r.replica_id.unique_id for r in candidate_replicas]
        ranked = rendezvous_rank(bytes.fromhex(key), candidate_replicas, names)
        queues = [self._queue(r) for r in ranked]
        bound = math.ceil(self.load_factor * (sum(queues) + 1) / len(queues))
        order = [r for r, q in zip(ranked, queues, strict=True) if q < bound]
        order += [r for r, q in zip(ranked, queues, strict=True) if q >= bound]
        return [[r] for r in order]

    def _queue(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return int(cached) if cached is not None else 0


class RoundRobinRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self.turn = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self.turn += 1
        start = self.turn % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]
