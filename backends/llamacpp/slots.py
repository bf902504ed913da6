"""The KV cache as a managed resource: slots (llama.cpp sequence ids), prefix reuse, LRU.

Pure bookkeeping over a :class:`KVOps` (the llama.cpp memory calls), so it is tested without
an engine. There are ``n_live + n_cached`` sequence ids, with a KV stream each or sharing one
pool of cells (``kv_cache.layout``): at most ``n_live`` run at once; a finished sequence keeps
its cells (a cached prefix) until it is evicted, least recently used first, when cells or ids
run short.

Placement: a new prompt goes where the longest prefix of it is already cached. Only a sequence
cached under the prompt's salt (its request's ``cache_salt``, one per API key by default)
counts: the cells of another salt share no prefix with it. A finished sequence whose whole cache
is a prefix of the prompt (the same conversation, one turn later) is continued in place; a
partial match is copied into a free id (in one pool ``seq_cp`` shares the cells; across streams
they are copied) so the cached conversation it came from stays intact; a live sequence's prompt
can be shared the same way.

With :class:`backends.llamacpp.kv_tiers.KVTiers`, a cached prefix leaving the cells (evicted,
or all of them at unload) is saved there first, and a prompt that shares more with a saved
prefix than with anything in the cells has that prefix restored into its sequence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backends.llamacpp.kv_tiers import BLOCK, KVTiers, Saved, common_prefix
from gateway.kv_events.ledger import BlockLedger


class KVOps(Protocol):
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool: ...

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """``src``'s first ``n`` tokens into the empty ``dst``; False if it could not be done
        (``dst`` is left empty)."""
        ...

    def seq_pos_min(self, seq_id: int) -> int: ...

    def save(self, seq_id: int) -> bytes:
        """The sequence's state (its cells' K/V), as llama.cpp writes it."""
        ...

    def load(self, seq_id: int, data: bytes) -> bool:
        """Restore a saved state into an empty sequence; False if it does not fit or is bad."""
        ...


@dataclass(eq=False)
class Entry:
    seq_id: int
    #: The tokens whose K/V this sequence holds, at positions 0..len-1.
    tokens: list[int] = field(default_factory=list)
    live: bool = False
    last_used: int = 0
    #: The salt digest its tokens were cached under (:func:`kv_tiers.salt_digest`).
    salt: str = ""


@dataclass(frozen=True, slots=True)
class Placement:
    seq_id: int
    #: Prompt tokens already in the cache at this sequence id (not prefilled again).
    reused: int


class SlotManager:
    def __init__(
        self,
        kv: KVOps,
        *,
        n_live: int,
        n_cached: int,
        n_cells: int,
        prefix_reuse: bool = True,
        min_prefix: int = 1,
        tiers: KVTiers | None = None,
        blocks: BlockLedger | None = None,
    ) -> None:
        self.kv = kv
        #: The cells' blocks, announced to routers as they come and go (KV events), if on.
        self.blocks = blocks
        self.tiers = tiers if prefix_reuse else None
        self.n_live = n_live
        self.n_cells = n_cells
        self.prefix_reuse = prefix_reuse
        self.min_prefix = min_prefix
        self.entries = [Entry(i) for i in range(n_live + n_cached)]
        self._clock = 0

    @property
    def live(self) -> int:
        return sum(e.live for e in self.entries)

    @property
    def cells_used(self) -> int:
        """KV cells in use (an upper bound: cells shared through ``seq_cp`` count per id)."""
        return sum(len(e.tokens) for e in self.entries)

    def can_admit(self) -> bool:
        return self.live < self.n_live

    def acquire(self, prompt: Sequence[int], *, reuse: bool = True, salt: str = "") -> Placement:
        """A sequence id for ``prompt`` with as much of it cached there as possible under
        ``salt`` (nothing with ``reuse`` False: a fresh sequence, e.g. for an input to embed)."""
        assert self.can_admit(), "no free slot"
        self._clock += 1
        best, reused = self._best_prefix(prompt, salt) if reuse else (None, 0)
        restored = self._restore(prompt, reused, salt) if reuse else None
        if restored is not None:
            return restored
        if best is not None and not best.live and reused == len(best.tokens):
            target = best  # continue the cached sequence in place: nothing is lost
        else:
            target = self._free_entry(avoid=best)
        if target is best:
            assert best is not None
            self._truncate(best, reused)
            reused = len(best.tokens)
        else:
            self._evict(target)
            target.salt = salt
            if best is not None and reused:
                if self.kv.copy_prefix(best.seq_id, target.seq_id, reused):
                    self._set(target, best.tokens[:reused])
                else:
                    reused = 0
        target.live = True
        target.last_used = self._clock
        return Placement(target.seq_id, reused)

    def _best_prefix(self, prompt: Sequence[int], salt: str) -> tuple[Entry | None, int]:
        if not self.prefix_reuse:
            return None, 0
        limit = len(prompt) - 1  # the last prompt token is always decoded (for its logits)
        best: Entry | None = None
        best_len = 0
        for e in self.entries:
            if e.salt != salt:
                continue
            n = min(common_prefix(e.tokens, prompt), limit)
            tie_prefers_idle = n == best_len and best is not None and best.live and not e.live
            if n > best_len or (n and tie_prefers_idle):
                best, best_len = e, n
        if best_len < self.min_prefix:
            return None, 0
        return best, best_len

    def _restore(self, prompt: Sequence[int], in_cells: int, salt: str) -> Placement | None:
        """The saved prefix of ``salt`` sharing more of ``prompt`` than the cells do, loaded
        into a free sequence; None if there is none, or it could not be loaded (the caller goes
        on)."""
        if self.tiers is None:
            return None
        found = self.tiers.find(prompt, len(prompt) - 1, salt)
        if found is None or found.n <= max(in_cells, self.min_prefix - 1):
            return None
        target = self._free_entry(avoid=None)
        self._evict(target)
        started = time.perf_counter()
        saved = self.tiers.load(found)
        if saved is None or not self.make_room(len(saved.tokens)):
            return None
        loaded = self.kv.load(target.seq_id, saved.data)
        self.tiers.stats.restore_s += time.perf_counter() - started
        if not loaded:
            self.kv.seq_rm(target.seq_id, -1, -1)
            self.tiers.stats.misses += 1
            return None
        target.salt = salt
        self._set(target, list(saved.tokens))  # the entry's, or the prefix read of it
        self._truncate(target, found.n)
        target.live = True
        target.last_used = self._clock
        return Placement(target.seq_id, len(target.tokens))

    def _free_entry(self, avoid: Entry | None) -> Entry:
        idle = [e for e in self.entries if not e.live]
        empty = [e for e in idle if not e.tokens]
        if empty:
            return empty[0]
        others = [e for e in idle if e is not avoid] or idle
        return min(others, key=lambda e: e.last_used)

    def _evict(self, e: Entry) -> None:
        """A cached prefix leaves the cells: saved to the tiers first (if long enough to be
        found there again)."""
        if self.tiers is not None and not e.live and len(e.tokens) >= BLOCK:
            self.tiers.save(Saved(tuple(e.tokens), self.kv.save(e.seq_id), e.salt))
        self._clear(e)

    def spill_all(self) -> int:
        """Every cached prefix saved to the tiers (the model is unloading); how many."""
        cached = [e for e in self.entries if not e.live and e.tokens]
        for e in cached:
            self._evict(e)
        return len(cached)

    def _truncate(self, e: Entry, keep: int) -> None:
        if keep < len(e.tokens) and not self.kv.seq_rm(e.seq_id, keep, -1):
            keep = 0  # this model's memory cannot drop a tail (recurrent / SWA): start over
        if keep and self.kv.seq_pos_min(e.seq_id) > 0:
            keep = 0  # positions at the start were dropped (sliding window): not reusable
        if keep == 0:
            self.kv.seq_rm(e.seq_id, -1, -1)
        del e.tokens[keep:]
        if self.blocks is not None:
            self.blocks.truncate(e.seq_id, keep)

    def _clear(self, e: Entry) -> None:
        if e.tokens:
            self.kv.seq_rm(e.seq_id, -1, -1)
            e.tokens.clear()
        if self.blocks is not None:
            self.blocks.drop(e.seq_id)

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Record tokens just decoded into ``seq_id``."""
        e = self.entries[seq_id]
        e.tokens.extend(tokens)
        if self.blocks is not None:
            self.blocks.extend(seq_id, e.tokens, e.salt)

    def _set(self, e: Entry, tokens: list[int]) -> None:
        e.tokens = tokens
        if self.blocks is not None:
            self.blocks.hold(e.seq_id, tokens, e.salt)

    def release(self, seq_id: int, *, keep: bool) -> None:
        """A sequence ended: keep its cells as a cached prefix, or free them at once."""
        e = self.entries[seq_id]
        e.live = False
        self._clock += 1
        e.last_used = self._clock
        if not keep or not self.prefix_reuse:
            self._clear(e)

    def make_room(self, n_new: int) -> bool:
        """Evict cached prefixes (LRU) until ``n_new`` more cells fit; False if they cannot."""
        while self.cells_used + n_new > self.n_cells:
            cached = [e for e in self.entries if not e.live and e.tokens]
            if not cached:
                return False
            self._evict(min(cached, key=lambda e: e.last_used))
        return True

    def evict_all_cached(self) -> int:
        """Drop every cached prefix; return how many ids were freed."""
        cached = [e for e in self.entries if not e.live and e.tokens]
        for e in cached:
            self._evict(e)
        return len(cached)
