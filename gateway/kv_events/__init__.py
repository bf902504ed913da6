"""KV-cache events for prefix-aware routers (llm-d, NVIDIA Dynamo): the blocks a model's cache
stores and drops (:mod:`.ledger`), in vLLM's msgpack format (:mod:`.wire`), over ZMQ
(:mod:`.publisher`), one topic per model (:mod:`.hub`)."""

from gateway.kv_events.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventSink,
    Medium,
)
from gateway.kv_events.ledger import BlockLedger

__all__ = [
    "AllBlocksCleared",
    "BlockLedger",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventSink",
    "Medium",
]
