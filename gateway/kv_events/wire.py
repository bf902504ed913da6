"""vLLM's KV-event wire format: one msgpack payload per batch of events.

A batch is the array ``[ts, events, data_parallel_rank]``; each event a tagged array, as vLLM
wrote them up to mid-2026 and every router decodes them (llm-d's decoders check the number of
fields of an array exactly, so the widest-read shapes are sent):

- ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``,
  and for the first blocks of a salted prefix two more fields, ``lora_name`` and
  ``extra_keys`` (one entry per block, the salt in the first block's, as vLLM sends a
  request's ``cache_salt``): a router that cannot tell the salt then never matches another
  partition's prompts against those blocks;
- ``["BlockRemoved", block_hashes, medium]``;
- ``["AllBlocksCleared"]``.

Block hashes are unsigned 64-bit integers (vLLM's default).
"""

from __future__ import annotations

from typing import assert_never

from gateway.kv_events.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    Medium,
)


def event_fields(event: KVEvent) -> list[object]:
    match event:
        case BlockStored():
            fields: list[object] = [
                "BlockStored",
                list(event.block_hashes),
                event.parent_block_hash,
                list(event.token_ids),
                event.block_size,
                None,  # lora_id
                event.medium,
            ]
            if event.salt and event.parent_block_hash is None:
                extra: list[object] = [None] * len(event.block_hashes)
                extra[0] = [event.salt]
                fields += [None, extra]  # lora_name, extra_keys
            return fields
        case BlockRemoved():
            return ["BlockRemoved", list(event.block_hashes), event.medium]
        case AllBlocksCleared():
            return ["AllBlocksCleared"]
        case _:
            assert_never(event)


def encode_batch(ts: float, events: list[KVEvent], data_parallel_rank: int = 0) -> bytes:
    import msgpack  # the kv-events extra (checked when the config asks for events)

    packed = msgpack.packb([ts, [event_fields(e) for e in events], data_parallel_rank])
    assert isinstance(packed, bytes)
    return packed


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent]]:
    """A batch as a subscriber reads it (the tests' and tools' side of the format)."""
    import msgpack

    ts, raw, _rank = msgpack.unpackb(payload, use_list=True)
    return float(ts), [_event(fields) for fields in raw]


def _event(fields: list[object]) -> KVEvent:
    tag = fields[0]
    if tag == "BlockStored":
        hashes, parent, tokens, size, _lora_id, medium = fields[1:7]
        extra = fields[8] if len(fields) > 8 else None
        salt = ""
        if isinstance(extra, list) and extra and isinstance(extra[0], list) and extra[0]:
            salt = str(extra[0][0])
        assert isinstance(hashes, list) and isinstance(tokens, list) and isinstance(size, int)
        return BlockStored(
            tuple(hashes), parent if isinstance(parent, int) else None, tuple(tokens),
            size, _medium(medium), salt,
        )  # fmt: skip
    if tag == "BlockRemoved":
        hashes, medium = fields[1:3]
        assert isinstance(hashes, list)
        return BlockRemoved(tuple(hashes), _medium(medium))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event {tag!r}")


def _medium(value: object) -> Medium:
    if value == "GPU" or value == "CPU" or value == "DISK":
        return value
    raise ValueError(f"unknown medium {value!r}")
