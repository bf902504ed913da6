"""Prometheus metrics at ``/metrics``, on a registry of this app's own.

The metric names are the same whatever the backend; engine counters appear for models whose
backend implements :class:`gateway.backend.HasStats`.
"""

from plugins.metrics.plugin import MetricsConfig, MetricsFactory, MetricsPlugin

factory = MetricsFactory()

__all__ = ["MetricsConfig", "MetricsFactory", "MetricsPlugin", "factory"]
