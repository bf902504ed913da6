"""The baseline for bench_gateway.py: a bare sse-starlette endpoint streaming pre-serialized chunks.

Run as ``python -m bench.bare_sse PORT CHUNKS``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(chunks: int) -> Starlette:
    chunk = json.dumps(
        {
            "id": "chatcmpl-bare",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}],
        }
    )
    frame = f"data: {chunk}\n\n".encode()

    async def stream(request: Request) -> Response:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(chunks):
                yield frame
            yield b"data: [DONE]\n\n"

        return EventSourceResponse(body())

    return Starlette(routes=[Route("/v1/chat/completions", stream, methods=["POST"])])


if __name__ == "__main__":
    port, chunks = int(sys.argv[1]), int(sys.argv[2])
    uvicorn.run(make_app(chunks), host="127.0.0.1", port=port, log_level="warning")
