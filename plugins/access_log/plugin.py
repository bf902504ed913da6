"""The access-log line: who asked which model for what, and how it went.

Lines go to the logger ``gateway.access`` (the message is the JSON object), so they follow
the server's logging setup. With ``path`` set they are also appended, as bare JSON lines, to
that file. Prompts, completions and API keys are never logged.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import PluginConfig
from gateway.plugins import Plugin, RequestContext, ResponseEnd
from gateway.pool import ModelPool

LOGGER = "gateway.access"
log = logging.getLogger(LOGGER)


class AccessLogConfig(PluginConfig):
    #: Also append bare JSON lines to this file.
    path: Path | None = None


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def access_record(ctx: RequestContext, end: ResponseEnd) -> dict[str, object]:
    request = ctx.request
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": ctx.request_id,
        "key": ctx.principal,
        "client": ctx.client_host,
        "path": ctx.path,
        "model": ctx.model,
        "requested_model": request.model if request else None,
        "stream": request.stream if request else None,
        "n": request.n if request else None,
        "status": end.status,
        "outcome": end.outcome,
        "error": end.error.code if end.error else None,
        "prompt_tokens": end.usage.prompt_tokens,
        "completion_tokens": end.usage.completion_tokens,
        "cached_tokens": end.usage.cached_tokens,
        "ttft_s": _seconds(end.ttft_s),
        "queue_wait_s": _seconds(end.queue_wait_s),
        "duration_s": _seconds(end.duration_s),
    }


class AccessLogPlugin(Plugin):
    def __init__(self, config: AccessLogConfig) -> None:
        self.config = config
        self._file: logging.Handler | None = None

    async def startup(self) -> None:
        if self.config.path is not None:
            self.config.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = logging.FileHandler(self.config.path, encoding="utf-8")
            self._file.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(self._file)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)

    async def shutdown(self) -> None:
        if self._file is not None:
            log.removeHandler(self._file)
            self._file.close()
            self._file = None

    async def on_response_end(self, ctx: RequestContext, end: ResponseEnd) -> None:
        line = json.dumps(access_record(ctx, end), ensure_ascii=False, separators=(",", ":"))
        log.info("%s", line)


class AccessLogFactory:
    config_type = AccessLogConfig

    def create(self, config: PluginConfig, pool: ModelPool) -> AccessLogPlugin:
        assert isinstance(config, AccessLogConfig)
        return AccessLogPlugin(config)
