"""The OpenAI endpoints the gateway serves, each a parser and its encoders.

Adding an endpoint: write a module here with a class satisfying
:class:`gateway.endpoints.base.EndpointSpec` and list it in :data:`ENDPOINTS`; the request
flow (:mod:`gateway.flow`) gives it plugins, model lookup, capabilities, validation,
admission, streaming and cancellation.
"""

from __future__ import annotations

from gateway.endpoints.base import EndpointSpec
from gateway.endpoints.chat import ChatEndpoint
from gateway.endpoints.completions import CompletionsEndpoint
from gateway.endpoints.embeddings import EmbeddingsEndpoint

ENDPOINTS: tuple[EndpointSpec, ...] = (ChatEndpoint(), CompletionsEndpoint(), EmbeddingsEndpoint())

__all__ = ["ENDPOINTS", "EndpointSpec"]
