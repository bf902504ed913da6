"""Serves the page and its two assets from package data, read once at startup."""

from __future__ import annotations

import html
from collections.abc import Sequence
from importlib.resources import files

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.config import PluginConfig
from gateway.plugins import Plugin
from gateway.pool import ModelPool

_ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css"}
#: The page's own files only; it talks to ``api_base`` (CORS: ``[server].cors_origins`` there).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ChatPageConfig(PluginConfig):
    #: Where the page is served; its assets are served beside it.
    path: str = Field("/", pattern=r"^/(.*/)?$")
    title: str = Field("Gateway chat", max_length=200)
    #: The API the page talks to: this server (``/v1``) or another origin's ``.../v1``.
    api_base: str = Field("/v1", pattern=r"^(/|https?://)\S*$")


def _read(name: str) -> str:
    return files(__package__ or "plugins.chat_page").joinpath(name).read_text(encoding="utf-8")


class ChatPagePlugin(Plugin):
    def __init__(self, config: ChatPageConfig) -> None:
        self.config = config
        page = _read("index.html")
        page = page.replace("{{title}}", html.escape(config.title))
        page = page.replace("{{api_base}}", html.escape(config.api_base.rstrip("/")))
        self._page = page.encode()
        self._assets = {name: _read(name).encode() for name in _ASSETS}

    def routes(self) -> Sequence[BaseRoute]:
        base = self.config.path
        headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}

        async def page(request: Request) -> Response:
            return Response(self._page, media_type="text/html", headers=headers)

        def asset(name: str) -> Route:
            body, media = self._assets[name], _ASSETS[name]

            async def serve(request: Request) -> Response:
                return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

            return Route(base + name, serve, methods=["GET"])

        return [Route(base, page, methods=["GET"]), *(asset(n) for n in _ASSETS)]


class ChatPageFactory:
    config_type = ChatPageConfig

    def create(self, config: PluginConfig, pool: ModelPool) -> ChatPagePlugin:
        assert isinstance(config, ChatPageConfig)
        return ChatPagePlugin(config)
