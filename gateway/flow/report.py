"""Telling the plugins how a request ended: once, with its outcome, usage and timings."""

from __future__ import annotations

import time

import anyio

from gateway.errors import GatewayError
from gateway.generation import Progress
from gateway.plugins import Outcome, PluginChain, RequestContext, ResponseEnd
from gateway.types import Usage


async def report_unadmitted(
    plugins: PluginChain,
    ctx: RequestContext,
    outcome: Outcome,
    status: int,
    error: GatewayError | None = None,
) -> None:
    """The end of a request that never reached admission (nothing was generated)."""
    duration = time.perf_counter() - ctx.started
    with anyio.CancelScope(shield=True):
        await plugins.on_response_end(
            ctx, ResponseEnd(outcome, status, Usage(), duration, error=error)
        )


class EndReport:
    """The end hook of one admitted request. The first :meth:`send` wins; later ones are
    ignored. A request the server interrupted (:meth:`interrupt`) that then ends as
    ``cancelled`` is reported as failed with the interruption's error."""

    def __init__(
        self,
        plugins: PluginChain,
        ctx: RequestContext,
        progress: Progress,
        queue_wait_s: float,
    ) -> None:
        self.plugins = plugins
        self.ctx = ctx
        self.progress = progress
        self.queue_wait_s = queue_wait_s
        self.sent = False
        self.interrupted: GatewayError | None = None

    async def send(self, outcome: Outcome, status: int, error: GatewayError | None) -> None:
        if self.sent:
            return
        self.sent = True
        if outcome == "cancelled" and self.interrupted is not None:
            outcome, status, error = "failed", self.interrupted.status, self.interrupted
        end = ResponseEnd(
            outcome=outcome,
            status=status,
            usage=self.progress.usage(),
            duration_s=time.perf_counter() - self.ctx.started,
            queue_wait_s=self.queue_wait_s,
            ttft_s=self.progress.ttft_s,
            error=error,
            inter_token_s=self.progress.token_gaps,
        )
        with anyio.CancelScope(shield=True):
            await self.plugins.on_response_end(self.ctx, end)
