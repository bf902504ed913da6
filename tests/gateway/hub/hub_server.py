"""A Hugging Face Hub stand-in on 127.0.0.1: the parts of the Hub's HTTP API ``huggingface_hub``
uses to resolve and download model files, serving repos from local files.

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true``: sizes,
  git blob ids, LFS sha256);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``ETag`` / ``X-Linked-Etag`` (the sha256),
  ``X-Linked-Size``, ``X-Repo-Commit``, ``Content-Length`` and ``Range`` (206) for resumes;
- errors as the Hub sends them: ``X-Error-Code`` ``RepoNotFound``, ``GatedRepo``,
  ``RevisionNotFound``, ``EntryNotFound``.

Knobs for the tests: a download rate limit, file bodies held back until the test lets them go,
files served corrupt (same size, one byte flipped), gated repos, file bodies redirected to a
second host (a CDN, as the Hub's LFS files are: it records the headers it gets). Every request
is logged (method, path, Range), and timed with its client (:class:`Request`: the
``User-Agent``, which ``HF_HUB_USER_AGENT_ORIGIN`` marks per process) and the body bytes sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class HubFile:
    path: Path
    sha256: str
    size: int


@dataclass
class Request:
    """One request as the stand-in served it: when it came and was done (``time.monotonic``),
    from whom (``User-Agent``), and how many file-body bytes it was sent."""

    method: str
    path: str
    range: str | None
    agent: str
    start: float
    end: float | None = None
    sent: int = 0


@dataclass
class HubState:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    #: Bytes per second for file bodies (0: as fast as it goes).
    rate: int = 0
    #: Set: file bodies wait for it (at most 30 s) before their first byte, so a test can see
    #: what clients do while a download is under way.
    hold: threading.Event | None = None
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: The same requests, timed (:class:`Request`).
    requests: list[Request] = field(default_factory=list)
    #: A second server's URL (:func:`cdn_server`): file bodies are redirected there (302).
    cdn_url: str | None = None
    #: The headers of every request the CDN got (lower-case names).
    cdn_headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    #: Commits ``main`` pointed to before (:meth:`add_repo` again moves it); still served.
    old_commits: dict[str, set[str]] = field(default_factory=dict)

    def add_repo(self, repo: str, files: dict[str, Path]) -> None:
        """Add a repo, or move its ``main`` to a new commit with these files (the old commit
        stays resolvable: the stand-in serves today's files under it)."""
        if repo in self.repos:
            self.old_commits.setdefault(repo, set()).add(self.commit(repo))
        self.repos[repo] = {name: _describe(path) for name, path in files.items()}

    def commit(self, repo: str) -> str:
        text = json.dumps(sorted((n, f.sha256) for n, f in self.repos[repo].items()))
        return hashlib.sha1(text.encode()).hexdigest()

    def downloads(self, name: str) -> list[str | None]:
        """The ``Range`` of every GET of a file named ``name`` (None: from the start)."""
        return [r for m, p, r in self.log if m == "GET" and p.endswith("/" + name)]


def _describe(path: Path) -> HubFile:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return HubFile(path, h.hexdigest(), path.stat().st_size)


def _git_sha1(f: HubFile) -> str:
    h = hashlib.sha1(f"blob {f.size}\0".encode())
    h.update(f.path.read_bytes())
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    #: The request being handled (``self.request`` is the socket).
    served: Request

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        wanted = self.headers.get("Range")
        self.served = Request(
            self.command, path, wanted, self.headers.get("User-Agent", ""), time.monotonic()
        )
        with self.state.lock:
            self.state.log.append((self.command, path, wanted))
            self.state.requests.append(self.served)
        try:
            self._dispatch(path, body)
        finally:
            self.served.end = time.monotonic()

    def _dispatch(self, path: str, body: bool) -> None:
        parts = path.strip("/").split("/")
        if self.server.cdn:
            with self.state.lock:
                self.state.cdn_headers.append({k.lower(): v for k, v in self.headers.items()})
            if parts[0] == "cdn" and len(parts) >= 4:
                self._cdn("/".join(parts[1:3]), "/".join(parts[3:]), body)
            else:
                self._error(404, "NotFound", f"no route {path}")
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._model_info("/".join(parts[2:4]), parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self._error(404, "NotFound", f"no route {path}")

    def _repo(self, repo: str, rev: str) -> dict[str, HubFile] | None:
        files = self.state.repos.get(repo)
        if files is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo in self.state.gated and "authorization" not in self.headers:
            self._error(401, "GatedRepo", f"Access to model {repo} is restricted")
            return None
        if rev not in ("main", self.state.commit(repo), *self.state.old_commits.get(repo, ())):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return files

    def _commit(self, repo: str, rev: str) -> str:
        """The commit ``rev`` names (an old one stays itself)."""
        return rev if rev in self.state.old_commits.get(repo, ()) else self.state.commit(repo)

    def _model_info(self, repo: str, rest: list[str]) -> None:
        rev = rest[1] if len(rest) >= 2 and rest[0] == "revision" else "main"
        files = self._repo(repo, rev)
        if files is None:
            return
        siblings = [
            {
                "rfilename": name,
                "size": f.size,
                "blobId": _git_sha1(f),
                "lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134},
            }
            for name, f in sorted(files.items())
        ]
        doc = {
            "_id": repo, "id": repo, "modelId": repo, "sha": self._commit(repo, rev),
            "private": False, "gated": repo in self.state.gated, "disabled": False,
            "downloads": 0, "likes": 0, "tags": ["gguf"], "siblings": siblings,
        }  # fmt: skip
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _resolve(self, repo: str, rev: str, name: str, body: bool) -> None:
        files = self._repo(repo, rev)
        if files is None:
            return
        commit = self._commit(repo, rev)
        f = files.get(name)
        if f is None:
            self._error(404, "EntryNotFound", f"{name} does not exist", commit=commit)
            return
        if self.state.cdn_url is not None:  # a signed CDN URL, as the Hub sends for LFS files
            self.send_response(302)
            self.send_header("Location", f"{self.state.cdn_url}/cdn/{repo}/{name}")
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._body(f, name, body, commit)

    def _cdn(self, repo: str, name: str, body: bool) -> None:
        f = self.state.repos.get(repo, {}).get(name)
        if f is None:
            self._error(404, "NotFound", f"no file {repo}/{name}")
            return
        self._body(f, name, body, None)

    def _body(self, f: HubFile, name: str, body: bool, commit: str | None) -> None:
        start = 0
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and body:
            start = int(wanted.removeprefix("bytes=").split("-")[0] or 0)
        length = f.size - start
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.sha256}"')
        self.send_header("X-Linked-Etag", f'"{f.sha256}"')
        self.send_header("X-Linked-Size", str(f.size))
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(length))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
        self.end_headers()
        if body:
            self._send_file(f, name, start)

    def _send_file(self, f: HubFile, name: str, start: int) -> None:
        rate = self.state.rate
        chunk = max(4096, rate // 20) if rate else 1 << 20
        flip = f.size // 2 if name in self.state.corrupt else -1
        if self.state.hold is not None:
            self.state.hold.wait(30)
        with f.path.open("rb") as src:
            src.seek(start)
            pos = start
            while data := src.read(chunk):
                if pos <= flip < pos + len(data):
                    b = bytearray(data)
                    b[flip - pos] ^= 0xFF
                    data = bytes(b)
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
                pos += len(data)
                self.served.sent += len(data)
                if rate:
                    time.sleep(len(data) / rate)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    #: The CDN (file bodies at ``/cdn/{repo}/{file}``), not the Hub.
    cdn = False


@contextmanager
def hub_server(state: HubState, *, cdn: bool = False) -> Iterator[str]:
    """Serve ``state`` on 127.0.0.1 (a free port); yields the endpoint URL. ``cdn``: the second
    host the Hub redirects file bodies to (set ``state.cdn_url`` to its URL)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = state
    server.cdn = cdn
    thread = threading.Thread(target=server.serve_forever, name="hub stand-in", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def point_hub_client(endpoint: str, hf_home: Path, *, offline: bool = False) -> dict[str, object]:
    """The ``huggingface_hub.constants`` that ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE``
    set at import, for this process (a test patches them with these values); also the env for
    subprocesses (:func:`hub_env`)."""
    return {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": offline,
    }


def hub_env(endpoint: str, hf_home: Path, *, offline: bool = False) -> dict[str, str]:
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env
