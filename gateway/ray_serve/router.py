"""Ray Serve request routers for the model server.

:class:`PrefixRouter` sends a conversation's first request to the least loaded replica and
every later turn (the same affinity key) to that replica, where its prefix is cached, unless it
holds more than ``load_factor`` times the mean load (requests in flight), when the turn goes to
the least loaded and the conversation moves there. A request with no key goes to the least
loaded. Ray Serve then takes, rank by rank, the first replica that has room
(``max_ongoing_requests``).

:class:`RoundRobinRouter` takes turns, blind to prefixes (the baseline it is measured against).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from gateway.affinity import rendezvous_rank

#: Conversations whose replica the router remembers (least recent forgotten first).
MAX_HOMES = 100_000


def affinity_of(pending: PendingRequest | None) -> str | None:
    """The key the ingress passed as the call's first argument (None: any replica)."""
    if pending is None or not pending.args:
        return None
    key = pending.args[0]
    return key if isinstance(key, str) else None


def _back_off(pending: PendingRequest | None) -> None:
    """Ray retries a request none of the ranks took: with a backoff, not in a tight loop."""
    if pending is not None:
        pending.routing_context.should_backoff = True


class PrefixRouter(RequestRouter):
    """Not FIFO: with :class:`FIFOMixin`, the replica chosen for one request may go to
    another that waited longer, and with it to another conversation."""

    def initialize_state(self, load_factor: float = 1.25, **kwargs: Any) -> None:
        self.load_factor = load_factor
        #: Each conversation's replica (where its prefix is cached), least recent first.
        self.homes: OrderedDict[str, str] = OrderedDict()
        #: Requests this router sent and not yet completed, and their replicas.
        self.in_flight: dict[str, str] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        _back_off(pending_request)
        key = affinity_of(pending_request)
        counted = Counter(self.in_flight.values())
        loads = {r.replica_id.unique_id: self._load(r, counted) for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: loads[r.replica_id.unique_id])
        if key is None:
            return [by_load]  # the least loaded (Ray takes the shortest queue of a rank)
        bound = math.ceil(self.load_factor * (sum(loads.values()) + 1) / len(loads))
        home = self.homes.get(key)
        if home is not None and loads.get(home, bound) < bound:
            self.homes.move_to_end(key)
            chosen = next(r for r in candidate_replicas if r.replica_id.unique_id == home)
        else:  # a new conversation, or its replica is gone or full: the least loaded
            least = loads[by_load[0].replica_id.unique_id]
            ties = [r for r in by_load if loads[r.replica_id.unique_id] == least]
            names = [r.replica_id.unique_id for r in ties]
            chosen = rendezvous_rank(bytes.fromhex(key), ties, names)[0]
            self._remember(key, chosen.replica_id.unique_id)
        return [[chosen], [r for r in by_load if r is not chosen]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        name = replica_id.unique_id
        self.in_flight[pending_request.metadata.internal_request_id] = name
        key = affinity_of(pending_request)
        if key is not None:
            self._remember(key, name)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Also called for a request the replica refused (never routed): only a request
        counted in flight is taken off."""
        self.in_flight.pop(internal_request_id, None)

    def _remember(self, key: str, replica: str) -> None:
        self.homes[key] = replica
        self.homes.move_to_end(key)
        while len(self.homes) > MAX_HOMES:
            self.homes.popitem(last=False)

    def _load(self, replica: RunningReplica, counted: Counter[str]) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return max(counted[replica.replica_id.unique_id], int(cached or 0))


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
        _back_off(pending_request)
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self.turn += 1
        start = self.turn % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]
