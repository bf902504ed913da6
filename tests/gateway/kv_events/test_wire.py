"""vLLM's KV-event format as llm-d's decoders read it (they check the number of fields of
every array), and the ZMQ transport: three frames, a big-endian sequence number from 0."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from gateway.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from gateway.kv_events import publisher as publisher_module
from gateway.kv_events.ledger import BlockLedger
from gateway.kv_events.publisher import KVEventPublisher, binds
from gateway.kv_events.wire import decode_batch, encode_batch
from tests.gateway.kv_events.view import RouterView

pytestmark = pytest.mark.timeout(30)

STORED = BlockStored((2**63 + 5, 7), None, (1, 2, 3, 4, 5, 6, 7, 8), 4, "GPU")


def test_a_batch_is_the_array_llm_d_decodes() -> None:
    raw = msgpack.unpackb(
        encode_batch(1.5, [STORED, BlockRemoved((7,), "CPU"), AllBlocksCleared()])
    )
    assert raw == [
        1.5,
        [
            ["BlockStored", [2**63 + 5, 7], None, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, "GPU"],
            ["BlockRemoved", [7], "CPU"],
            ["AllBlocksCleared"],
        ],
        0,
    ]


def test_a_salted_prefix_carries_its_salt_as_vllm_sends_cache_salt() -> None:
    salted = BlockStored((1, 2), None, tuple(range(8)), 4, "GPU", salt="abc")
    [fields] = msgpack.unpackb(encode_batch(0.0, [salted]))[1]
    assert len(fields) == 9 and fields[7] is None  # lora_name
    assert fields[8] == [["abc"], None]  # extra_keys: one per block, the salt on the first
    child = BlockStored((3,), 2, tuple(range(4)), 4, "GPU", salt="abc")
    assert len(msgpack.unpackb(encode_batch(0.0, [child]))[1][0]) == 7  # its parent says it


def test_round_trip() -> None:
    events: list[KVEvent] = [
        STORED, BlockStored((9,), 7, (0,) * 4, 4, "DISK", "s"), BlockRemoved((9,), "DISK")
    ]  # fmt: skip
    ts, decoded = decode_batch(encode_batch(2.0, events))
    # a salted child's salt is known from its parent only
    unsalted = BlockStored((9,), 7, (0,) * 4, 4, "DISK")
    assert ts == 2.0 and decoded == [events[0], unsalted, events[2]]


def test_endpoints_bind_or_connect_as_vllm_decides() -> None:
    assert binds("tcp://*:5557") and binds("ipc:///tmp/x") and binds("tcp://[::]:1")
    assert not binds("tcp://epp.default.svc:5557")


def subscriber(endpoint: str, timeout_ms: int) -> zmq.Socket[bytes]:
    """A SUB socket on llm-d's topic prefix, as its indexer subscribes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sub.connect(endpoint)
    return sub


def test_the_publisher_sends_three_frames_in_sequence(tmp_path: object) -> None:
    endpoint = f"ipc://{tmp_path}/kv.sock"
    publisher = KVEventPublisher(endpoint)
    sub = subscriber(endpoint, timeout_ms=5000)
    try:
        time.sleep(0.3)  # the subscription reaches the publisher (ZMQ's slow joiner)
        sink = publisher.sink("kv@10.0.0.1:8000@smol")
        sink.publish([STORED])
        publisher.sink("other-topic").publish([STORED])  # filtered out by the subscription
        frames = [sub.recv_multipart() for _ in range(1)]
        sink.publish([BlockRemoved((7,), "GPU")])
        frames += [sub.recv_multipart()]
    finally:
        publisher.close()
        sub.close(0)
    topics = {f[0] for f in frames}
    assert topics == {b"kv@10.0.0.1:8000@smol"} and all(len(f) == 3 for f in frames)
    seqs = [int.from_bytes(f[1], "big") for f in frames]
    assert seqs[0] == 0 and seqs[1] > seqs[0]
    events = [e for f in frames for e in decode_batch(f[2])[1]]
    assert events == [AllBlocksCleared(), STORED, BlockRemoved((7,), "GPU")]


def test_an_endpoint_that_cannot_be_opened_fails_at_once() -> None:
    with pytest.raises(OSError, match="cannot open"):
        KVEventPublisher("tcp://*:notaport")


def test_dropped_events_are_made_good_by_restating_the_topic(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "MAX_QUEUE", 1)  # the engine outruns the socket
    endpoint = f"ipc://{tmp_path}/kv.sock"
    publisher = KVEventPublisher(endpoint)
    sub = subscriber(endpoint, timeout_ms=200)
    view = RouterView(late=True, strict=False)
    try:
        time.sleep(0.3)
        ledger = BlockLedger("GPU", 4, publisher.sink("kv@pod@m"))
        for i in range(400):
            ledger.hold(i % 7, list(range(i, i + 13)))
        deadline = time.monotonic() + 10
        while set(view.blocks.get("GPU", {})) != ledger.blocks() or not view.cleared:
            assert time.monotonic() < deadline, "the subscriber never caught up"
            try:
                view.apply(decode_batch(sub.recv_multipart()[2])[1])
            except zmq.Again:
                continue
    finally:
        publisher.close()
        sub.close(0)
    assert publisher._dropped > 0  # some were dropped, and the view is exact anyway
