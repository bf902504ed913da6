"""The gateway on Ray Serve (``gateway serve --ray ADDRESS``; ``llm-gateway[ray]``).

Two deployments: the **ingress** takes every HTTP request from Ray Serve's proxy, reads its
body once and works out which conversation it continues (the same affinity key the fleet
balancer uses); the **model server** is the gateway itself, models and engines included, one
replica per GPU (or CPU slice), autoscaled from ``[ray]``. The ingress calls the model server
through a handle with the key as the first argument, and a request router
(:mod:`.router`) sends it to the replica holding the conversation's prefix. Responses stream
back through both unchanged. Only :mod:`.deployments`, :mod:`.router` and :mod:`.launch`
import Ray.
"""
