"""The wire APIs the gateway serves: one endpoint per API (OpenAI chat, completions,
embeddings, Responses; Anthropic Messages).

Adding a wire API: write a module here with a class satisfying
:class:`gateway.flow.contract.EndpointSpec` and add its factory to :data:`REGISTRY`. The
request flow (:mod:`gateway.flow`) gives it plugins, model lookup, capabilities, validation,
admission, streaming and cancellation; the app mounts its routes, uses its error dialect under
its path and closes it at shutdown. Neither the app nor the flow names an endpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.endpoints.chat import ChatEndpoint
from gateway.endpoints.completions import CompletionsEndpoint
from gateway.endpoints.embeddings import EmbeddingsEndpoint
from gateway.endpoints.messages import MessagesEndpoint
from gateway.endpoints.responses import ResponsesEndpoint
from gateway.flow.contract import EndpointSpec
from gateway.services import Services

#: Makes an endpoint from the services it needs (a store, the config).
Factory = Callable[[Services], EndpointSpec]

#: Every endpoint the app serves, one line each.
REGISTRY: list[Factory] = [
    ChatEndpoint.of,
    CompletionsEndpoint.of,
    EmbeddingsEndpoint.of,
    ResponsesEndpoint.of,
    MessagesEndpoint.of,
]


def endpoints(services: Services) -> tuple[EndpointSpec, ...]:
    return tuple(make(services) for make in REGISTRY)


__all__ = ["REGISTRY", "EndpointSpec", "Factory", "endpoints"]
