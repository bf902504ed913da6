"""The block ledger: whatever prefixes a cache's owners take, extend, cut and drop, a router
rebuilding the medium from the events alone sees exactly the whole blocks held now."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.kv_events import BlockLedger, BlockRemoved, BlockStored, KVEvent
from gateway.kv_events.events import Snapshots
from tests.gateway.kv_events.view import RouterView, expected_prefixes

BS = 4


class Collect:
    def __init__(self) -> None:
        self.events: list[KVEvent] = []

    def publish(self, events: list[KVEvent]) -> None:
        self.events.extend(events)

    def register(self, source: Snapshots) -> None:
        self.source = source


def setup() -> tuple[BlockLedger, Collect]:
    sink = Collect()
    return BlockLedger("GPU", BS, sink), sink


def test_whole_blocks_are_announced_once_with_their_tokens() -> None:
    ledger, sink = setup()
    ledger.hold("a", list(range(10)))  # two whole blocks, two tokens left over
    [stored] = sink.events
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == tuple(range(8)) and stored.parent_block_hash is None
    assert len(stored.block_hashes) == 2 and stored.block_size == BS and stored.medium == "GPU"
    ledger.extend("a", list(range(12)))
    third = sink.events[-1]
    assert isinstance(third, BlockStored)
    assert third.parent_block_hash == stored.block_hashes[-1]
    assert third.token_ids == (8, 9, 10, 11)


def test_a_shared_prefix_is_one_set_of_blocks_until_its_last_holder_goes() -> None:
    ledger, sink = setup()
    ledger.hold("a", list(range(8)))
    ledger.hold("b", [*range(8), 50, 51, 52, 53])  # shares both blocks, adds one
    added = sink.events[-1]
    assert isinstance(added, BlockStored) and added.token_ids == (50, 51, 52, 53)
    ledger.drop("a")
    assert sink.events[-1] is added  # b still holds the shared blocks: nothing removed
    ledger.drop("b")
    removed = sink.events[-1]
    assert isinstance(removed, BlockRemoved) and len(removed.block_hashes) == 3
    assert removed.block_hashes[0] == added.block_hashes[0]  # children before parents
    assert ledger.blocks() == frozenset()


def test_salts_partition_the_blocks() -> None:
    ledger, sink = setup()
    ledger.hold("a", list(range(8)), salt="s1")
    ledger.hold("b", list(range(8)), salt="s2")
    first, second = sink.events
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert set(first.block_hashes).isdisjoint(second.block_hashes)
    assert (first.salt, second.salt) == ("s1", "s2")


def test_truncate_and_clear() -> None:
    ledger, sink = setup()
    ledger.hold("a", list(range(12)))
    ledger.truncate("a", 5)  # keeps one whole block
    removed = sink.events[-1]
    assert isinstance(removed, BlockRemoved) and len(removed.block_hashes) == 2
    ledger.hold("b", list(range(20, 24)))
    ledger.clear()
    view = RouterView()
    view.apply(sink.events)
    assert view.prefixes("GPU") == set() and ledger.blocks() == frozenset()


Op = tuple[str, int, int, int]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["hold", "extend", "truncate", "drop"]),
        st.integers(0, 3),  # owner
        st.integers(0, 30),  # length
        st.integers(0, 2),  # which base sequence (shared prefixes) / salt
    ),
    max_size=40,
)


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None)
@given(OPS)
def test_the_router_view_equals_what_is_held(ops: list[Op]) -> None:
    ledger, sink = setup()
    held: dict[int, tuple[str, list[int]]] = {}
    bases = [list(range(100)), [*range(6), *range(200, 300)], list(range(100))]
    for op, owner, n, which in ops:
        salt = "tenant" if which == 2 else ""
        if op == "hold":
            held[owner] = (salt, bases[which][:n])
            ledger.hold(owner, held[owner][1], salt)
        elif op == "extend" and owner in held:
            salt0, tokens = held[owner]
            tokens = tokens + [7000 + owner] * n
            held[owner] = (salt0, tokens)
            ledger.extend(owner, tokens, salt0)
        elif op == "truncate" and owner in held:
            salt0, tokens = held[owner]
            held[owner] = (salt0, tokens[:n])
            ledger.truncate(owner, n)
        elif op == "drop":
            held.pop(owner, None)
            ledger.drop(owner)
    view = RouterView()
    view.apply(sink.events)
    want = expected_prefixes([(s, tuple(t)) for s, t in held.values()], BS)
    assert view.prefixes("GPU") == want
    assert set(view.blocks.get("GPU", {})) == set(ledger.blocks())
    late = RouterView()  # a subscriber that joins now, from the snapshot alone
    late.apply(ledger.snapshot())
    assert late.prefixes("GPU") == want
