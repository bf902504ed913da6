"""The pool's KV-event publishers: one ZMQ socket per configured endpoint, one topic per
model, opened on the first load of a model that publishes."""

from __future__ import annotations

import os
import socket

from gateway.config import KVEventsConfig, ServerConfig
from gateway.kv_events.events import KVEventSink
from gateway.kv_events.publisher import KVEventPublisher

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def pod_address(server: ServerConfig) -> str:
    """``HOST:PORT`` a router knows this server by: ``$POD_IP`` (Kubernetes' downward API),
    else the address it listens on, else (listening everywhere) this machine's address."""
    host = os.environ.get("POD_IP") or server.host
    if host in _WILDCARDS:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"{host}:{server.port}"


def topic_for(model: str, config: KVEventsConfig, server: ServerConfig) -> str:
    """llm-d's topic, ``kv@HOST:PORT@MODEL``, unless the config names one."""
    return config.topic or f"kv@{pod_address(server)}@{model}"


class KVEventHub:
    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self._publishers: dict[str, KVEventPublisher] = {}

    def sink(self, model: str, config: KVEventsConfig) -> KVEventSink:
        """A new topic for ``model`` (its first event clears what subscribers knew of it);
        ``OSError`` if the endpoint cannot be opened."""
        publisher = self._publishers.get(config.endpoint)
        if publisher is None:
            publisher = self._publishers[config.endpoint] = KVEventPublisher(config.endpoint)
        return publisher.sink(topic_for(model, config, self.server))

    def close(self) -> None:
        publishers, self._publishers = list(self._publishers.values()), {}
        for publisher in publishers:
            publisher.close()
