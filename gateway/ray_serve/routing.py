"""Which conversation a request continues, worked out where Ray Serve's router can use it.

Ray Serve's proxy routes an HTTP request before its body is read, so the ingress reads the
body, parses it with the endpoint's own parser (the one the gateway runs) and names the
conversation: the affinity key of :mod:`gateway.affinity` (its opening messages, or the name
a client gave it). A request that continues a stored response (a Responses chain), or a route
naming one (``GET /v1/responses/{id}``), goes where that response ran: the ingress remembers
the key each response id was routed by.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gateway.affinity import affinity_key
from gateway.errors import GatewayError
from gateway.flow.contract import EndpointSpec
from gateway.ray_serve.forward import Forwarded, Message
from gateway.types import ClientRequest

#: Response ids remembered (oldest forgotten first).
MAX_IDS = 100_000


@dataclass(frozen=True, slots=True)
class Route:
    key: str | None
    endpoint: EndpointSpec | None = None
    parsed: ClientRequest | None = None

    def stream_error(self, error: GatewayError) -> bytes | None:
        """The event a stream of this request ends with when it fails after its headers, in
        its endpoint's shape (None: not a stream the ingress can speak for)."""
        if self.endpoint is None or self.parsed is None or not self.parsed.stream:
            return None
        return self.endpoint.stream_encoder(self.parsed, "", 0).error(error)


class Affinities:
    def __init__(self, endpoints: tuple[EndpointSpec, ...], max_ids: int = MAX_IDS) -> None:
        self._endpoints = {e.path: e for e in endpoints}
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._max_ids = max_ids
        self._counter = 0

    def key(self, request: Forwarded) -> str | None:
        """The request's affinity key (hex), or None: any replica will do."""
        return self.route(request).key

    def route(self, request: Forwarded) -> Route:
        """The request's affinity key, and its endpoint and parsed body where it has them."""
        named = self._named_in_path(request.path)
        if named is not None:
            return Route(named)
        endpoint = self._endpoints.get(request.path)
        if endpoint is None or request.method != "POST":
            return Route(None)
        self._counter += 1
        try:
            parsed = endpoint.parse(request.body, f"ingress-{self._counter}")
        except (GatewayError, ValueError):
            return Route(None)  # the replica answers it with the endpoint's error
        if parsed.continues is not None:
            key = self._ids.get(parsed.continues) or _hex(b"named\0" + parsed.continues.encode())
        elif parsed.generations:
            key = _hex(affinity_key(parsed.generations[0]))
        else:
            key = None
        return Route(key, endpoint, parsed)

    def _named_in_path(self, path: str) -> str | None:
        for part in reversed(path.strip("/").split("/")):
            if (key := self._ids.get(part)) is not None:
                self._ids.move_to_end(part)
                return key
        return None

    def learn(self, key: str | None, start: Message) -> None:
        """The response's id (its ``x-request-id``) continues under ``key``."""
        if key is None:
            return
        for name, value in start.get("headers", ()):
            if bytes(name).lower() == b"x-request-id":
                self._ids[bytes(value).decode(errors="replace")] = key
                while len(self._ids) > self._max_ids:
                    self._ids.popitem(last=False)
                return


def _hex(key: bytes) -> str:
    return key.hex()
