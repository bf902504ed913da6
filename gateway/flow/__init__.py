"""The one request flow every endpoint shares.

:mod:`~gateway.flow.route` turns an endpoint (:mod:`gateway.endpoints`) into a Starlette route:
plugins' hooks, the body, the model lookup and on-demand load, the capability check, the
backend's validation and admission (:mod:`~gateway.flow.prepare`); then an
:class:`~gateway.flow.exchange.Exchange` owns the admitted request until it ends, streamed
(:mod:`gateway.sse`) or collected, however it ends.
"""
