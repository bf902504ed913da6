"""The request routers' own logic, without a cluster: a conversation's turns go to the replica
its first turn took (the least loaded), unless that one holds more than its share; a request
with no key goes to the least loaded; a refused request is not taken off the count; a
replica that is gone is replaced for its conversations; round-robin takes turns."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("ray")

with warnings.catch_warnings():  # Ray Serve's own models use pydantic's deprecated Field extras
    warnings.simplefilter("ignore", DeprecationWarning)
    from gateway.ray_serve.router import PrefixRouter, RoundRobinRouter

pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Id:
    unique_id: str


@dataclass(frozen=True)
class Replica:
    replica_id: Id


@dataclass
class Context:
    should_backoff: bool = False


@dataclass
class Metadata:
    internal_request_id: str


@dataclass
class Pending:
    args: list[Any]
    metadata: Metadata
    routing_context: Context = field(default_factory=Context)


class NoQueueLengths:
    def get(self, replica_id: object) -> None:
        return None


def router(cls: type[Any]) -> Any:
    r = object.__new__(cls)  # its state only: Ray's constructor wires it to a deployment
    r._replica_queue_len_cache = NoQueueLengths()
    r.initialize_state()
    return r


REPLICAS = [Replica(Id(name)) for name in ("a", "b", "c")]
counter = iter(range(10_000))


def pending(key: str | None) -> Pending:
    return Pending([key, object()], Metadata(f"req-{next(counter)}"))


async def route(r: Any, key: str | None, replicas: list[Replica] = REPLICAS) -> str:
    """Where ``r`` sends a request, as Ray would (the first replica of the first rank)."""
    request = pending(key)
    ranks = await r.choose_replicas(replicas, request)
    chosen = ranks[0][0]
    r.on_request_routed(request, chosen.replica_id, None)
    return str(chosen.replica_id.unique_id)


async def test_a_conversation_stays_where_it_began_and_new_ones_spread() -> None:
    r = router(PrefixRouter)
    homes = [await route(r, f"{i:02x}" * 8) for i in range(3)]
    assert sorted(homes) == ["a", "b", "c"]  # each new conversation to the least loaded
    for i in range(3):
        r.on_request_completed(Id(homes[i]), f"req-{i}")
    for _ in range(3):  # later turns: home again
        assert [await route(r, f"{i:02x}" * 8) for i in range(3)] == homes
        for request_id in list(r.in_flight):
            r.on_request_completed(Id(r.in_flight[request_id]), request_id)


async def test_a_full_replica_passes_the_turn_on_and_the_conversation_moves() -> None:
    r = router(PrefixRouter)
    key = "ab" * 8
    home = await route(r, key)
    for _ in range(4):  # its replica fills up with other work
        await route(r, key)
    moved = await route(r, key)
    assert moved != home  # more than 1.25x the mean: the least loaded takes it
    assert r.homes[key] == moved


async def test_no_key_goes_to_the_least_loaded_and_refusals_do_not_count() -> None:
    r = router(PrefixRouter)
    busy = await route(r, "cd" * 8)
    ranks = await r.choose_replicas(REPLICAS, pending(None))
    assert len(ranks) == 1 and ranks[0][-1].replica_id.unique_id == busy  # the busy one last
    r.on_request_completed(Id("a"), "never-routed")  # refused by its replica: not counted
    assert len(r.in_flight) == 1
    assert await r.choose_replicas([], pending("cd" * 8)) == []


async def test_a_conversation_whose_replica_is_gone_finds_another() -> None:
    r = router(PrefixRouter)
    key = "ef" * 8
    home = await route(r, key)
    rest = [x for x in REPLICAS if x.replica_id.unique_id != home]
    assert await route(r, key, rest) != home


async def test_round_robin_takes_turns() -> None:
    r = router(RoundRobinRouter)
    seen = [await route(r, "00" * 8) for _ in range(6)]
    assert sorted(set(seen)) == ["a", "b", "c"] and seen[:3] == seen[3:]
