"""Serves the page, its own script and style and the vendored libraries (``vendor/``, see its
VENDOR.md) from package data, read and gzipped once at startup. The vendored files carry their
version in their names, so they are cached for good; the page's own files are revalidated."""

from __future__ import annotations

import gzip
import html
from collections.abc import Iterator, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.config import PluginConfig
from gateway.plugins import Plugin
from gateway.pool import ModelPool

#: What is served, by suffix (anything else in the folder is not: this module, VENDOR.md).
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".woff2": "font/woff2",
}
#: Already compressed: sent as they are.
_COMPRESSED = {".woff2"}
#: The page's own files only; it talks to ``api_base`` (CORS: ``[server].cors_origins`` there).
#: Styles: files only (KaTeX sets its inline styles through the DOM, which CSP allows).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; font-src 'self'; "
    "img-src 'self' data:; connect-src *; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_IMMUTABLE = "public, max-age=31536000, immutable"


class ChatPageConfig(PluginConfig):
    #: Where the page is served; its assets are served beside it.
    path: str = Field("/", pattern=r"^/(.*/)?$")
    title: str = Field("Gateway chat", max_length=200)
    #: The API the page talks to: this server (``/v1``) or another origin's ``.../v1``.
    api_base: str = Field("/v1", pattern=r"^(/|https?://)\S*$")


def _root() -> Traversable:
    return files(__package__ or "plugins.chat_page")


def _walk(folder: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            if not entry.name.startswith(("_", ".")):
                yield from _walk(entry, f"{prefix}{entry.name}/")
        elif any(entry.name.endswith(s) for s in _TYPES):
            yield prefix + entry.name, entry


class _Asset:
    """One file: its bytes, gzipped once (if that helps), and its headers."""

    def __init__(self, name: str, body: bytes) -> None:
        suffix = name[name.rindex(".") :]
        self.media = _TYPES[suffix]
        self.body = body
        packed = None if suffix in _COMPRESSED else gzip.compress(body, 9, mtime=0)
        self.gzipped = packed if packed is not None and len(packed) < len(body) else None
        cache = _IMMUTABLE if name.startswith("vendor/") else "no-cache"
        self.headers = {"Cache-Control": cache, "Vary": "Accept-Encoding"}

    def response(self, request: Request) -> Response:
        if self.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
            headers = {**self.headers, "Content-Encoding": "gzip"}
            return Response(self.gzipped, media_type=self.media, headers=headers)
        return Response(self.body, media_type=self.media, headers=self.headers)


class ChatPagePlugin(Plugin):
    def __init__(self, config: ChatPageConfig) -> None:
        self.config = config
        root = _root()
        page = root.joinpath("index.html").read_text(encoding="utf-8")
        page = page.replace("{{title}}", html.escape(config.title))
        page = page.replace("{{api_base}}", html.escape(config.api_base.rstrip("/")))
        self._page = page.encode()
        self._page_gz = gzip.compress(self._page, 9, mtime=0)
        self._assets = {name: _Asset(name, entry.read_bytes()) for name, entry in _walk(root)}

    @property
    def asset_names(self) -> list[str]:
        return list(self._assets)

    def routes(self) -> Sequence[BaseRoute]:
        base = self.config.path
        headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}

        async def page(request: Request) -> Response:
            if "gzip" in request.headers.get("accept-encoding", ""):
                zipped = {**headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
                return Response(self._page_gz, media_type="text/html", headers=zipped)
            return Response(self._page, media_type="text/html", headers=headers)

        def asset(name: str) -> Route:
            item = self._assets[name]

            async def serve(request: Request) -> Response:
                return item.response(request)

            return Route(base + name, serve, methods=["GET"])

        return [Route(base, page, methods=["GET"]), *(asset(n) for n in self._assets)]


class ChatPageFactory:
    config_type = ChatPageConfig

    def create(self, config: PluginConfig, pool: ModelPool) -> ChatPagePlugin:
        assert isinstance(config, ChatPageConfig)
        return ChatPagePlugin(config)
