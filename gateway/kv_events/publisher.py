"""Publishing KV events over ZMQ as vLLM does: a PUB socket, one three-frame message per batch
(topic, an 8-byte big-endian sequence number, the msgpack payload of
:func:`gateway.kv_events.wire.encode_batch`).

The socket belongs to one thread (ZMQ sockets are not thread-safe); engines hand it events
through a queue and never wait on the network. Several models may share an endpoint, each on
its own topic; a topic's first message clears what a subscriber knew of it
(:class:`AllBlocksCleared`: an earlier process may have published under the same topic).

A topic is restated (cleared, then every block its caches hold) when a subscriber joins (the
socket is an XPUB: it hears subscriptions) and when its events had to be dropped (the queue was
full): what was queued for it is discarded then, since the restatement, taken with every cache's
lock held, already says it. So a subscriber's view is exact whenever it joined.
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

#: Batches waiting for the socket before new events are dropped (and their topic restated).
MAX_QUEUE = 100_000
#: Messages ZMQ keeps per subscriber that reads too slowly.
HWM = 100_000
#: How often the publisher looks for new subscribers while no event comes.
POLL_S = 0.05
#: Events per message at most (a restatement of a large cache is sent in pieces).
MAX_BATCH = 10_000
#: How long opening the socket may take.
OPEN_TIMEOUT_S = 10.0

Item = tuple[str, list[KVEvent]]


def binds(endpoint: str) -> bool:
    """vLLM's rule: a wildcard address or a local transport is bound, anything else is
    connected to (a central subscriber that binds)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class TopicSink:
    """Events for one topic (a :class:`~gateway.kv_events.events.KVEventSink`), and the
    caches publishing there."""

    def __init__(self, topic: str, put: Callable[[str, list[KVEvent]], None]) -> None:
        self.topic = topic
        self._put = put
        self._sources: weakref.WeakSet[Snapshots] = weakref.WeakSet()
        self._lock = threading.Lock()

    def publish(self, events: list[KVEvent]) -> None:
        self._put(self.topic, events)

    def register(self, source: Snapshots) -> None:
        with self._lock:
            self._sources.add(source)

    def sources(self) -> list[Snapshots]:
        with self._lock:
            return list(self._sources)


class KVEventPublisher:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._queue: queue.Queue[Item | None] = queue.Queue(MAX_QUEUE)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._seq = 0
        self._sinks: dict[str, TopicSink] = {}
        self._lock = threading.Lock()
        #: Topics to restate (events dropped, or a subscriber joined).
        self._stale: set[str] = set()
        self._dropped = 0
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        if not self._ready.wait(OPEN_TIMEOUT_S) or self._error is not None:
            raise OSError(f"KV events: cannot open {endpoint}: {self._error or 'timed out'}")

    def sink(self, topic: str) -> TopicSink:
        """Where one model's caches publish; a topic new to this process starts cleared."""
        with self._lock:
            sink = self._sinks.get(topic)
            if sink is None:
                sink = self._sinks[topic] = TopicSink(topic, self._put)
                sink.publish([AllBlocksCleared()])
            return sink

    def _put(self, topic: str, events: list[KVEvent]) -> None:
        try:
            self._queue.put_nowait((topic, events))
        except queue.Full:
            with self._lock:
                self._stale.add(topic)  # restated once the publisher catches up
                self._dropped += len(events)
                now = time.monotonic()
                if now - self._warned_at > 10:
                    self._warned_at = now
                    log.warning(
                        "KV events: the publisher is behind, %d events dropped so far "
                        "(their topics are restated)", self._dropped,
                    )  # fmt: skip

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=5)
            self._thread.join(timeout=10)

    # --- the publisher thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            sock = self._open()
        except Exception as err:  # the endpoint is reported by the constructor
            self._error = err
            return
        finally:
            self._ready.set()
        try:
            while True:
                try:
                    if not self._pass(sock):
                        return
                except Exception:  # never die quietly: log, restate everything, go on
                    log.exception("KV events: publishing failed; restating every topic")
                    with self._lock:
                        self._stale.update(self._sinks)
                    time.sleep(POLL_S)
        finally:
            sock.close(linger=1000)

    def _open(self) -> zmq.Socket[bytes]:
        import zmq

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.XPUB)  # a PUB that hears subscriptions (to restate the state)
        try:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's, not only the first
            sock.setsockopt(zmq.SNDHWM, HWM)
            (sock.bind if binds(self.endpoint) else sock.connect)(self.endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        return sock

    def _pass(self, sock: zmq.Socket[bytes]) -> bool:
        """Restate what needs it, then send what is queued; False once closed."""
        self._hear_subscriptions(sock)
        for topic in self._take_stale():
            if not self._restate(sock, topic):
                return False
        try:
            item = self._queue.get(timeout=POLL_S)
        except queue.Empty:
            return True
        pending = [item, *self._drain()]
        stop = None in pending
        self._flush(sock, [i for i in pending if i is not None])
        return not stop

    def _drain(self) -> list[Item | None]:
        items: list[Item | None] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _take_stale(self) -> list[str]:
        with self._lock:
            stale, self._stale = self._stale, set()
        return sorted(stale)

    def _hear_subscriptions(self, sock: zmq.Socket[bytes]) -> None:
        """A subscriber joined: the topics it subscribed to are restated (it missed them)."""
        while sock.poll(0):
            message = sock.recv()
            if message[:1] != b"\x01":
                continue  # an unsubscription
            prefix = message[1:].decode(errors="replace")
            with self._lock:
                self._stale.update(t for t in self._sinks if t.startswith(prefix))

    def _restate(self, sock: zmq.Socket[bytes], topic: str) -> bool:
        """Clear ``topic``, then every block its caches hold, with their locks held (no event
        of theirs can be queued meanwhile); what was queued for it is in the snapshot.
        False if the publisher was closed meanwhile (what else was queued is sent)."""
        sink = self._sinks[topic]
        with contextlib.ExitStack() as stack:
            sources = sink.sources()
            for source in sources:
                stack.enter_context(source.lock)
            pending = self._drain()
            self._flush(sock, [i for i in pending if i is not None and i[0] != topic])
            self._flush(
                sock, [(topic, [AllBlocksCleared(), *(e for s in sources for e in s.snapshot())])]
            )
        return None not in pending

    def _flush(self, sock: zmq.Socket[bytes], items: list[Item]) -> None:
        """One message per topic, in the order the events came (split past MAX_BATCH)."""
        batches: dict[str, list[KVEvent]] = {}
        for topic, events in items:
            batches.setdefault(topic, []).extend(events)
        for topic, events in batches.items():
            for start in range(0, len(events), MAX_BATCH):
                self._send(sock, topic, events[start : start + MAX_BATCH])

    def _send(self, sock: zmq.Socket[bytes], topic: str, events: list[KVEvent]) -> None:
        payload = encode_batch(time.time(), events)
        sock.send_multipart([topic.encode(), self._seq.to_bytes(8, "big"), payload])
        self._seq += 1
