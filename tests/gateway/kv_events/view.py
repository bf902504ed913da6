"""A router's side of KV events: the blocks of each medium rebuilt from the events alone, as
llm-d's indexer does (a parent must be known before its children; a removed block is gone)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, Medium


@dataclass
class Block:
    parent: int | None
    tokens: tuple[int, ...]
    salt: str


@dataclass
class RouterView:
    blocks: dict[Medium, dict[int, Block]] = field(default_factory=dict)
    #: AllBlocksCleared seen.
    cleared: int = 0
    #: A subscriber that may have joined late ignores what comes before the first
    #: AllBlocksCleared (the restatement the publisher sends when it joins).
    late: bool = False
    #: Check that the events are consistent (off where some are known to be dropped).
    strict: bool = True

    def apply(self, events: list[KVEvent]) -> None:
        for event in events:
            if self.late and not self.cleared and not isinstance(event, AllBlocksCleared):
                continue
            match event:
                case BlockStored():
                    self._stored(event)
                case BlockRemoved():
                    held = self.blocks.setdefault(event.medium, {})
                    for h in event.block_hashes:
                        assert h in held or not self.strict, f"{h} removed but never stored"
                        held.pop(h, None)
                case AllBlocksCleared():
                    self.blocks.clear()
                    self.cleared += 1

    def _stored(self, event: BlockStored) -> None:
        held = self.blocks.setdefault(event.medium, {})
        bs = event.block_size
        assert len(event.token_ids) == bs * len(event.block_hashes)
        parent = event.parent_block_hash
        known = parent is None or parent in held
        assert known or not self.strict, "a block's parent is announced first"
        salt = event.salt if parent is None or not known else held[parent].salt
        for i, h in enumerate(event.block_hashes):
            assert h not in held or not self.strict, f"{event.medium} block {h} stored twice"
            held[h] = Block(parent, tuple(event.token_ids[i * bs : (i + 1) * bs]), salt)
            parent = h

    def prefix(self, medium: Medium, h: int) -> tuple[int, ...]:
        """The tokens from the start of the prompt through block ``h``."""
        held = self.blocks[medium]
        chain: list[tuple[int, ...]] = []
        cur: int | None = h
        while cur is not None:
            chain.append(held[cur].tokens)
            cur = held[cur].parent
        return tuple(t for block in reversed(chain) for t in block)

    def prefixes(self, medium: Medium) -> set[tuple[str, tuple[int, ...]]]:
        """Every (salt, token prefix ending on a block boundary) the medium holds."""
        return {(b.salt, self.prefix(medium, h)) for h, b in self.blocks.get(medium, {}).items()}


def expected_prefixes(
    held: list[tuple[str, tuple[int, ...]]], block_size: int
) -> set[tuple[str, tuple[int, ...]]]:
    """What a router should see for caches holding these (salt, tokens) prefixes."""
    return {
        (salt, tokens[:end])
        for salt, tokens in held
        for end in range(block_size, len(tokens) + 1, block_size)
    }
