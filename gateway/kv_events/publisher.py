"""Publishing KV events over ZMQ as vLLM does: a PUB socket, one three-frame message per batch
(topic, an 8-byte big-endian sequence number, the msgpack payload of
:func:`gateway.kv_events.wire.encode_batch`).

The socket belongs to one thread (ZMQ sockets are not thread-safe); engines hand it events
through a queue and never wait on the network. Several models may share an endpoint, each on
its own topic; a topic's first message clears what a subscriber knew of it
(:class:`AllBlocksCleared`: an earlier process may have published under the same topic).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.kv_events.events import AllBlocksCleared, KVEvent, Snapshots
from gateway.kv_events.wire import encode_batch

if TYPE_CHECKING:
    import zmq

log = logging.getLogger("gateway.kv_events")

#: Batches waiting for the socket before new events are dropped (with a warning).
MAX_QUEUE = 100_000
#: Messages ZMQ keeps per subscriber that reads too slowly.
HWM = 100_000
#: How often the publisher looks for new subscribers while no event comes.
POLL_S = 0.05


def binds(endpoint: str) -> bool:
    """vLLM's rule: a wildcard address or a local transport is bound, anything else is
    connected to (a central subscriber that binds)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class TopicSink:
    """Events for one topic (a :class:`~gateway.kv_events.events.KVEventSink`), and the
    caches publishing there, restated to a subscriber that joins late."""

    def __init__(self, topic: str, put: Callable[[str, list[KVEvent]], None]) -> None:
        self.topic = topic
        self._put = put
        self._sources: weakref.WeakSet[Snapshots] = weakref.WeakSet()

    def publish(self, events: list[KVEvent]) -> None:
        self._put(self.topic, events)

    def register(self, source: Snapshots) -> None:
        self._sources.add(source)

    def resync(self) -> None:
        """Clear the topic, then every block its caches hold: one batch, taken with every
        cache's lock held so that no event of theirs falls between."""
        sources = list(self._sources)
        with contextlib.ExitStack() as stack:
            for source in sources:
                stack.enter_context(source.lock)
            self._put(self.topic, [AllBlocksCleared(), *(e for s in sources for e in s.snapshot())])


class KVEventPublisher:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._queue: queue.Queue[tuple[str, list[KVEvent]] | None] = queue.Queue(MAX_QUEUE)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._seq = 0
        self._dropped = 0
        self._sinks: dict[str, TopicSink] = {}
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise OSError(f"KV events: cannot open {endpoint}: {self._error}") from self._error

    def sink(self, topic: str) -> TopicSink:
        """Where one model's cache publishes; starts by clearing the topic."""
        sink = self._sinks[topic] = TopicSink(topic, self._put)
        sink.publish([AllBlocksCleared()])
        return sink

    def _put(self, topic: str, events: list[KVEvent]) -> None:
        try:
            self._queue.put_nowait((topic, events))
        except queue.Full:
            self._dropped += len(events)
            if self._dropped == len(events):
                log.warning("KV events: the publisher is behind; events dropped")

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        import zmq

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.XPUB)  # a PUB that hears subscriptions (to restate the state)
        try:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's, not only the first
            sock.setsockopt(zmq.SNDHWM, HWM)
            sock.setsockopt(zmq.LINGER, 1000)
            (sock.bind if binds(self.endpoint) else sock.connect)(self.endpoint)
        except zmq.ZMQError as err:
            self._error = err
            sock.close(0)
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(sock)
        finally:
            sock.close()

    def _loop(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            self._subscriptions(sock)
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is None:
                return
            batches: dict[str, list[KVEvent]] = {item[0]: list(item[1])}
            while True:  # everything queued now goes out in one batch per topic
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._flush(sock, batches)
                    return
                batches.setdefault(more[0], []).extend(more[1])
            self._flush(sock, batches)

    def _subscriptions(self, sock: zmq.Socket[bytes]) -> None:
        """A subscriber joined: restate the topics it subscribed to (it missed the past)."""
        while sock.poll(0):
            message = sock.recv()
            if message[:1] != b"\x01":
                continue  # an unsubscription
            prefix = message[1:].decode(errors="replace")
            for topic, sink in list(self._sinks.items()):
                if topic.startswith(prefix):
                    sink.resync()

    def _flush(self, sock: zmq.Socket[bytes], batches: dict[str, list[KVEvent]]) -> None:
        for topic, events in batches.items():
            self._send(sock, topic, events)

    def _send(self, sock: zmq.Socket[bytes], topic: str, events: list[KVEvent]) -> None:
        payload = encode_batch(time.time(), events)
        sock.send_multipart([topic.encode(), self._seq.to_bytes(8, "big"), payload])
        self._seq += 1
