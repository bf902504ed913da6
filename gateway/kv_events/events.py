"""KV-cache events: what a model's cache stored and dropped, block by block, for routers that
send a prompt where its prefix is cached (llm-d's precise prefix-cache scorer, NVIDIA
Dynamo's KV router). The shapes are vLLM's (``vllm/distributed/kv_events.py``), which those
routers decode; :mod:`gateway.kv_events.wire` writes them as vLLM does."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Protocol

#: Where a block is held: the engine's KV cells ("GPU", whatever the device, as vLLM names its
#: cache), the host-memory tier ("CPU") or the disk tier ("DISK").
Medium = Literal["GPU", "CPU", "DISK"]


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive blocks now held on ``medium``: block ``i`` holds
    ``token_ids[i * block_size : (i + 1) * block_size]``, and follows ``parent_block_hash``
    (None: the first block of a prompt)."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: Medium
    #: The cache partition the blocks belong to (a digest of the request's ``cache_salt``;
    #: "" for none): a router must not match another partition's prompts against them.
    salt: str = ""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: Medium


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Forget every block this engine announced (sent when publishing starts)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class Snapshots(Protocol):
    """A source of events that can restate what it holds (a :class:`BlockLedger`)."""

    lock: threading.Lock

    def snapshot(self) -> list[KVEvent]: ...


class KVEventSink(Protocol):
    """Where a cache's events go; called from any thread, never blocks."""

    def publish(self, events: list[KVEvent]) -> None: ...

    def register(self, source: Snapshots) -> None:
        """``source`` publishes here: a subscriber that joins late gets its snapshot."""
        ...
