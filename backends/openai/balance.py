"""Choosing a replica for one request among the healthy ones not tried yet.

- least outstanding: the fewest requests in flight per unit of weight;
- round-robin: smooth weighted round-robin (nginx's), blind to prefixes;
- affinity: rendezvous hashing of the conversation's leading messages, so every turn of a
  conversation lands on the replica whose KV cache holds its prefix, with bounded load: a
  replica past ``load_factor`` times its weighted share of the outstanding requests passes the
  request to the next replica in the key's order (Mirrokni et al., consistent hashing with
  bounded loads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from backends.openai.config import AffinityConfig, Balancing
from backends.openai.replicas import Replica
from gateway.affinity import affinity_key, rendezvous_rank
from gateway.types import GenerationRequest


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Replica], request: GenerationRequest) -> Replica:
        """One of ``candidates`` (never empty)."""
        ...


class LeastOutstanding:
    """Fewest outstanding requests per weight; ties go round in turn so idle replicas share."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Replica], request: GenerationRequest) -> Replica:
        self._turn += 1
        n = len(candidates)
        order = [candidates[(self._turn + i) % n] for i in range(n)]
        return min(order, key=lambda r: (r.outstanding + 1) / r.weight)


class RoundRobin:
    """Smooth weighted round-robin: weights 5:1:1 give a a b a c a a, not a a a a a b c."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(self, candidates: Sequence[Replica], request: GenerationRequest) -> Replica:
        total = sum(r.weight for r in candidates)
        for r in candidates:
            self._current[r.url] = self._current.get(r.url, 0.0) + r.weight
        best = max(candidates, key=lambda r: self._current[r.url])
        self._current[best.url] -= total
        return best


def rendezvous_order(key: bytes, replicas: Sequence[Replica]) -> list[Replica]:
    """Replicas by weighted rendezvous score for ``key``, best first."""
    return rendezvous_rank(key, replicas, [r.url for r in replicas], [r.weight for r in replicas])


class Affinity:
    def __init__(self, config: AffinityConfig) -> None:
        self.config = config
        self._fallback = LeastOutstanding()

    def pick(self, candidates: Sequence[Replica], request: GenerationRequest) -> Replica:
        key = affinity_key(request, self.config.prompt_prefix_chars)
        total_weight = sum(r.weight for r in candidates)
        load = sum(r.outstanding for r in candidates) + 1  # counting this request
        for r in rendezvous_order(key, candidates):
            bound = math.ceil(self.config.load_factor * load * r.weight / total_weight)
            if r.outstanding < bound:
                return r
        return self._fallback.pick(candidates, request)  # unreachable with load_factor >= 1


def make_balancer(kind: Balancing, affinity: AffinityConfig) -> Balancer:
    if kind == "round_robin":
        return RoundRobin()
    if kind == "affinity":
        return Affinity(affinity)
    return LeastOutstanding()
