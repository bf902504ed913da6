"""One JSON line per completion request on the logger ``gateway.access``."""

from plugins.access_log.plugin import AccessLogConfig, AccessLogFactory, AccessLogPlugin

factory = AccessLogFactory()

__all__ = ["AccessLogConfig", "AccessLogFactory", "AccessLogPlugin", "factory"]
