"""The OpenAI endpoints the gateway serves, each a parser and its encoders.

Adding an endpoint: write a module here with a class satisfying
:class:`gateway.endpoints.base.EndpointSpec` and list it in :func:`endpoints`; the request
flow (:mod:`gateway.flow`) gives it plugins, model lookup, capabilities, validation,
admission, streaming and cancellation.
"""

from __future__ import annotations

from gateway.endpoints.base import EndpointSpec
from gateway.endpoints.chat import ChatEndpoint
from gateway.endpoints.completions import CompletionsEndpoint
from gateway.endpoints.embeddings import EmbeddingsEndpoint
from gateway.endpoints.responses import ResponsesEndpoint


def endpoints(responses: ResponsesEndpoint) -> tuple[EndpointSpec, ...]:
    return (ChatEndpoint(), CompletionsEndpoint(), EmbeddingsEndpoint(), responses)


__all__ = ["EndpointSpec", "endpoints"]
