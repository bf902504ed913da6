"""One HTTP exchange carried between two processes: the ingress reads the client's request
(:class:`Forwarded`) and hands it to a model-server replica, which runs it through the
gateway's own ASGI app (:func:`run`) and streams the ASGI messages back, which the ingress
sends on to the client (:func:`relay`). No Ray here: the deployments carry these over
Ray Serve's handles.

Cancelling :func:`run`'s iteration (the client went away: Ray Serve cancels the call) is
told to the app as ``http.disconnect``, which the gateway's request flow turns into a
cancelled sequence (freed at once, the plugins' end hook told); an app that does not finish
within :data:`DISCONNECT_GRACE_S` of it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Send

Message = MutableMapping[str, Any]

#: How long the app has to end a request once told its client is gone.
DISCONNECT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What the app needs of a client's HTTP request (the body read whole, bounded)."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"
    http_version: str = "1.1"

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": self.query_string,
            "root_path": "",
            "headers": [list(h) for h in self.headers],
            "client": list(self.client) if self.client else None,
            "server": None,
            "state": {},
        }


async def read(scope: Message, receive: Receive, limit: int) -> Forwarded | None:
    """The request of an ASGI ``http`` scope with its body; None if the body is longer than
    ``limit`` bytes (or the client left before sending it all)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    client = scope.get("client")
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"  # the application's own routes, under its prefix
    return Forwarded(
        method=scope["method"],
        path=path,
        query_string=scope.get("query_string", b""),
        headers=tuple((bytes(k), bytes(v)) for k, v in scope["headers"]),
        body=b"".join(chunks),
        client=(str(client[0]), int(client[1])) if client else None,
        scheme=scope.get("scheme", "http"),
        http_version=scope.get("http_version", "1.1"),
    )


async def run(app: ASGIApp, request: Forwarded) -> AsyncGenerator[Message, None]:
    """The app's response to ``request``, message by message (``http.response.start``, then
    ``http.response.body`` pieces)."""
    out: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await out.put(message)

    async def serve() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(serve())
    try:
        while (message := await out.get()) is not None:
            yield message
        await task  # the app's own error, if it raised
    finally:
        if not task.done():
            gone.set()  # the caller stopped listening: the client is gone
            await _end(task)


async def _end(task: asyncio.Task[None]) -> None:
    done, _ = await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def relay(messages: AsyncIterator[Message], send: Send) -> None:
    """Send the app's messages on to the client."""
    async for message in messages:
        await send(message)
