"""Which blocks a cache medium holds, kept from the token prefixes its owners hold.

A cache here is not paged: it holds whole prefixes (a sequence's tokens in the KV cells, a
saved prefix in a tier), and several may share leading tokens (the cells of a copied prefix are
shared). A router thinks in blocks of ``block_size`` tokens, each named by a hash chained from
its parent's. :class:`BlockLedger` counts, for each block, how many held prefixes contain it:
a block is announced (:class:`BlockStored`) when its first holder takes it and withdrawn
(:class:`BlockRemoved`) when its last holder lets it go. Only whole blocks are announced.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from gateway.kv_events.events import BlockRemoved, BlockStored, KVEvent, KVEventSink, Medium


def chain_hash(parent: int | None, salt: str, tokens: Sequence[int]) -> int:
    """A block's hash: its parent's (or, for a first block, the salt's), then its tokens."""
    h = hashlib.blake2b(digest_size=8, person=b"kv-block")
    h.update(b"\1" + parent.to_bytes(8, "big") if parent is not None else b"\0" + salt.encode())
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return int.from_bytes(h.digest(), "big")


@dataclass
class _Held:
    salt: str
    #: Hashes of the owner's whole blocks, in order.
    hashes: list[int] = field(default_factory=list)


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    salt: str
    #: How many held prefixes contain it.
    refs: int = 1


class BlockLedger:
    """The blocks one medium holds, with the events that keep a router's view of them
    exact. Thread-safe: each call's events are published before it returns, in order."""

    def __init__(self, medium: Medium, block_size: int, sink: KVEventSink) -> None:
        self.medium: Medium = medium
        self.block_size = block_size
        self._sink = sink
        self._held: dict[Hashable, _Held] = {}
        self._blocks: dict[int, _Block] = {}
        #: Held while events are made and published (a resync takes it to snapshot).
        self.lock = threading.Lock()
        sink.register(self)

    def hold(self, owner: Hashable, tokens: Sequence[int], salt: str = "") -> None:
        """``owner`` now holds exactly ``tokens`` (under ``salt``), whatever it held before."""
        with self.lock:
            old = self._held.pop(owner, None)
            held = self._held[owner] = _Held(salt)
            events = self._grow(held, tokens)
            if old is not None:
                events += self._release(old.hashes)
            self._send(events)

    def extend(self, owner: Hashable, tokens: Sequence[int], salt: str = "") -> None:
        """``owner``'s prefix grew to ``tokens`` (what it held is unchanged, more follows;
        ``salt`` is the partition of an owner that held no whole block yet)."""
        with self.lock:
            held = self._held.get(owner)
            if held is None or not held.hashes:
                held = self._held[owner] = _Held(salt)
            self._send(self._grow(held, tokens))

    def truncate(self, owner: Hashable, n_tokens: int) -> None:
        """``owner`` keeps only its first ``n_tokens`` tokens."""
        with self.lock:
            held = self._held.get(owner)
            if held is None:
                return
            keep = n_tokens // self.block_size
            dropped, held.hashes = held.hashes[keep:], held.hashes[:keep]
            self._send(self._release(dropped))

    def drop(self, owner: Hashable) -> None:
        with self.lock:
            held = self._held.pop(owner, None)
            if held is not None:
                self._send(self._release(held.hashes))

    def clear(self) -> None:
        """Every owner lets go (the medium is gone: the model unloaded)."""
        with self.lock:
            held, self._held = list(self._held.values()), {}
            self._send([e for h in held for e in self._release(h.hashes)])

    def blocks(self) -> frozenset[int]:
        """Every block held now (what a subscriber's view should be)."""
        with self.lock:
            return frozenset(self._blocks)

    def snapshot(self) -> list[KVEvent]:
        """Every block held now, parents first (for a subscriber that starts from nothing);
        the caller holds :attr:`lock` until the events are published."""
        events: list[KVEvent] = []
        seen: set[int] = set()
        for held in self._held.values():
            for h in held.hashes:
                if h not in seen:
                    seen.add(h)
                    b = self._blocks[h]
                    events.append(self._event((h,), b.parent, b.tokens, b.salt))
        return events

    def _grow(self, held: _Held, tokens: Sequence[int]) -> list[KVEvent]:
        """Take the whole blocks of ``tokens`` past those ``held`` has; one event per run of
        blocks new to the medium (a block another owner holds already ends a run)."""
        bs = self.block_size
        events: list[KVEvent] = []
        run: list[int] = []
        start = len(held.hashes)
        for i in range(len(held.hashes), len(tokens) // bs):
            parent = held.hashes[-1] if held.hashes else None
            block_tokens = tuple(tokens[i * bs : (i + 1) * bs])
            h = chain_hash(parent, held.salt, block_tokens)
            held.hashes.append(h)
            if (block := self._blocks.get(h)) is not None:
                block.refs += 1
                events += self._run(held, run, start, tokens)
                run, start = [], i + 1
            else:
                self._blocks[h] = _Block(parent, block_tokens, held.salt)
                run.append(h)
        return events + self._run(held, run, start, tokens)

    def _run(self, held: _Held, run: list[int], start: int, tokens: Sequence[int]) -> list[KVEvent]:
        if not run:
            return []
        bs = self.block_size
        parent = held.hashes[start - 1] if start else None
        run_tokens = tuple(tokens[start * bs : (start + len(run)) * bs])
        return [self._event(tuple(run), parent, run_tokens, held.salt)]

    def _event(
        self, hashes: tuple[int, ...], parent: int | None, tokens: tuple[int, ...], salt: str
    ) -> BlockStored:
        return BlockStored(hashes, parent, tokens, self.block_size, self.medium, salt)

    def _release(self, hashes: list[int]) -> list[KVEvent]:
        gone = []
        for h in reversed(hashes):
            block = self._blocks[h]
            block.refs -= 1
            if not block.refs:
                del self._blocks[h]
                gone.append(h)
        return [BlockRemoved(tuple(gone), self.medium)] if gone else []

    def _send(self, events: list[KVEvent]) -> None:
        if events:
            self._sink.publish(events)
