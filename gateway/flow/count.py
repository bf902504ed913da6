"""A token-counting route (``/v1/responses/input_tokens``, ``/v1/messages/count_tokens``):
the same checks as the endpoint's real request (:func:`gateway.flow.prepare.check`), so the
count is the prompt that request would run; nothing is generated or stored."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.flow.contract import EndpointSpec, Parser
from gateway.flow.prepare import check
from gateway.flow.report import report_unadmitted
from gateway.flow.route import new_context, unadmitted
from gateway.services import Services

#: The count as the wire API answers it.
Answer = Callable[[int], dict[str, object]]


def count_route(
    services: Services, endpoint: EndpointSpec, path: str, parser: Parser, answer: Answer
) -> Route:
    """``POST path``: ``parser`` reads the counting body into the request it stands for; the
    plugins' hooks run as for any request (API keys, rate limits, the end hook)."""
    plugins = services.plugins

    async def handle(request: Request) -> Response:
        ctx = new_context(request, endpoint)
        try:
            checked = await check(services, ctx, request, parser)
        except BaseException as exc:
            return await unadmitted(exc, plugins, ctx, endpoint)
        checked.release()
        await report_unadmitted(plugins, ctx, "completed", 200)
        return JSONResponse(answer(checked.prompt_tokens), headers=ctx.response_headers)

    return Route(path, handle, methods=["POST"])
