"""Load and abuse: issue 23's findings, each request against a live gateway, while a steady
chat stream and ``/health`` are measured.

    python scripts/abuse.py [--base-url http://127.0.0.1:PORT] [--idle-s 8] [--settle-s 5]

Without ``--base-url`` it starts ``gateway serve`` itself (127.0.0.1, a free port) on the
embedded default model with what the findings need: three API keys (``c`` with a 100-token
per-minute limit), the rate limits, a SQLite response store and KV tiers in a temporary folder,
short header and body deadlines. With ``--base-url`` (loopback only) the server must have the
same keys (``--keys``); the locked-store finding and the RSS check are then skipped.

Every request is bounded (a timeout, a count). The findings run ``--rounds`` times (2). It
prints one row per finding (requests, the statuses seen, any 5xx, the steady stream's longest
gap while it ran, the RSS after it) and checks: no 5xx; ``/health`` p99 under 100 ms
throughout; the steady stream's inter-token gap p99 under 3x its idle value; the server's RSS
after the last round within 10% of its RSS after the first (the first round pages in what is
allocated once: the KV cells, the allocator's per-thread arenas, the store's caches). The
steady stream runs on a model of its own (the same file), so its gaps measure what the abuse
does to the server (event loop, threads, memory), not the prefill of the abuse's long prompts
in its batch (a 256-token prefill chunk on one CPU thread costs about 100 decode steps). The
exit code is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

KEYS = {"a": "sk-abuse-a-0123456789", "b": "sk-abuse-b-0123456789", "c": "sk-abuse-c-0123456789"}
MODEL = "default"
SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: be brief." for i in range(40))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_toml(port: int, tmp: Path) -> str:
    from gateway.defaults import default_model_path

    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    return f"""
[server]
host = "127.0.0.1"
port = {port}
header_timeout_s = 2
body_timeout_s = 2
log_level = "warning"

[models.smollm2-135m-instruct]
backend = "llamacpp"
aliases = ["default"]
model_path = "{default_model_path()}"
batching = {{ max_concurrent = 2, n_threads = 1 }}

[models.smollm2-135m-instruct.kv_cache]
n_ctx_per_slot = 1024
host_cache_bytes = 8388608
disk_cache_bytes = 268435456
disk_cache_dir = "{tmp / "kv"}"

# the steady stream's own engine: its gaps show what the abuse does to the server (event
# loop, threads, memory), not the prefill of the abuse's long prompts sharing its batch
[models.steady]
backend = "llamacpp"
model_path = "{default_model_path()}"
batching = {{ max_concurrent = 1, n_threads = 1 }}
kv_cache = {{ n_ctx_per_slot = 512 }}

[responses]
path = "{tmp / "responses.sqlite3"}"

[plugins.api_keys]
keys = [
  {{ name = "a", sha256 = "{sha(KEYS["a"])}" }},
  {{ name = "b", sha256 = "{sha(KEYS["b"])}" }},
  {{ name = "c", sha256 = "{sha(KEYS["c"])}", tokens_per_minute = 100 }},
]

[plugins.rate_limit]
"""


class Server:
    """``gateway serve`` in a process of its own, on a temporary config."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        path = tmp / "config.toml"
        path.write_text(config_toml(self.port, tmp))
        self.log = (tmp / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base_url = f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@dataclass
class Finding:
    name: str
    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    rss_mb: float | None = None

    def saw(self, status: int | str) -> None:
        self.statuses[str(status)] += 1

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    @property
    def fivexx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.isdigit() and int(s) >= 500)


class Abuse:
    def __init__(
        self,
        base_url: str,
        keys: dict[str, str],
        store: Path | None,
        rss: Callable[[], float] | None = None,
    ) -> None:
        self.base = base_url
        self.rss = rss
        self.keys = keys
        self.store = store
        self.client = httpx.AsyncClient(base_url=base_url, timeout=60)
        self.findings: list[Finding] = []

    def headers(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[key]}"}

    async def post(
        self, f: Finding, path: str, body: Any, key: str = "a", **kw: Any
    ) -> httpx.Response | None:
        try:
            r = await self.client.post(path, json=body, headers=self.headers(key), **kw)
        except httpx.TimeoutException:
            f.saw("timeout")
            return None
        f.saw(r.status_code)
        return r

    async def background(self, f: Finding, prompt: str, max_output_tokens: int) -> str | None:
        """Start a background response of key ``a``; its id (None if refused)."""
        body = {"model": MODEL, "input": prompt, "background": True,
                "max_output_tokens": max_output_tokens}  # fmt: skip
        r = await self.post(f, "/v1/responses", body)
        return r.json()["id"] if r is not None and r.status_code == 200 else None

    async def get(self, f: Finding, path: str, key: str = "a", **kw: Any) -> httpx.Response | None:
        try:
            r = await self.client.get(path, headers=self.headers(key), **kw)
        except httpx.TimeoutException:
            f.saw("timeout")
            return None
        f.saw(r.status_code)
        return r

    # -- the findings ------------------------------------------------------------------------

    async def f1_follow_past_the_end(self, f: Finding) -> None:
        rid = await self.background(f, "Count to twenty.", 32)
        if rid is None:
            return
        with contextlib.suppress(httpx.TimeoutException):
            async with self.client.stream(
                "GET", f"/v1/responses/{rid}", params={"stream": "true", "starting_after": 100000},
                headers=self.headers("a"), timeout=15,
            ) as s:  # fmt: skip
                f.saw(s.status_code)
                async for _ in s.aiter_bytes():
                    pass

    async def f2_many_bad_messages(self, f: Finding) -> None:
        body = {"model": MODEL, "messages": [{"role": "bogus"}] * 110_000}
        for _ in range(2):
            r = await self.post(f, "/v1/chat/completions", body)
            f.expect(r is not None and r.status_code == 400, "2 MB of bad messages: not a 400")

    async def f3_truncation(self, f: Finding) -> None:
        turns: list[dict[str, str]] = []
        for i in range(512):
            turns += [{"role": "user", "content": f"question {i} about the weather"},
                      {"role": "assistant", "content": f"answer {i}: it is sunny"}]  # fmt: skip
        turns.append({"role": "user", "content": "and tomorrow?"})
        body = {"model": MODEL, "input": turns, "truncation": "auto", "store": False,
                "max_output_tokens": 4}  # fmt: skip
        started = time.perf_counter()
        count = {k: body[k] for k in ("model", "input", "truncation")}
        r = await self.post(f, "/v1/responses/input_tokens", count)
        f.expect(r is not None and r.status_code == 200, "512 turns: not a 200")
        f.expect(time.perf_counter() - started < 5, "fitting 512 turns took 5 s or more")
        await self.post(f, "/v1/responses", body, timeout=0.2)  # the client leaves
        r = await self.post(f, "/v1/responses", body)
        f.expect(r is not None and r.status_code == 200, "512 turns: not a 200")

    async def f4_store_then_get(self, f: Finding) -> None:
        for i in range(10):
            body = {"model": MODEL, "input": f"Say {i}.", "max_output_tokens": 4}
            r = await self.post(f, "/v1/responses", body)
            if r is not None and r.status_code == 200:
                got = await self.get(f, f"/v1/responses/{r.json()['id']}")
                f.expect(got is not None and got.status_code == 200, "stored, then 404")

    async def f5_locked_store(self, f: Finding) -> None:
        store = self.store
        if store is None:
            f.saw("skipped")
            return
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:
            db = sqlite3.connect(store, timeout=5)
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(10)
            db.rollback()
            db.close()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        await asyncio.to_thread(locked.wait, 5)
        try:
            for _ in range(3):
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4}  # fmt: skip
                started = time.perf_counter()
                r = await self.post(f, "/v1/chat/completions", body)
                f.expect(r is not None and r.status_code == 200, "a chat failed, store locked")
                f.expect(time.perf_counter() - started < 5, "a chat waited on the store lock")
        finally:
            release.set()
            await asyncio.to_thread(holder.join, 10)

    async def f6_cache_salt(self, f: Finding) -> None:
        def chat(question: str) -> dict[str, Any]:
            system = {"role": "system", "content": f"{nonce} {SYSTEM}"}
            user = {"role": "user", "content": question}
            return {"model": MODEL, "max_tokens": 2, "messages": [system, user]}

        async def cached(key: str, question: str) -> int:
            r = await self.post(f, "/v1/chat/completions", chat(question), key=key)
            if r is None or r.status_code != 200:
                return -1
            return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        nonce = time.time_ns()  # a's prompt, new to both keys (each has cached its own before)
        await cached("a", "my secret question")
        # b shares at most the chat template's opening with its own earlier prompts
        f.expect(await cached("b", "my secret question") <= 8, "key b reused key a's prefix")
        f.expect(await cached("a", "my secret question?") > 100, "key a did not reuse its own")

    async def f7_admin_csrf(self, f: Finding) -> None:
        attempts = [
            {"origin": "http://evil.example", "content-type": "text/plain"},
            {"host": "evil.example"},
            {"x-forwarded-for": "127.0.0.1"},
        ]
        for headers in attempts:
            r = await self.client.post(f"/admin/models/{MODEL}/unload", headers=headers,
                                       content=b"x")  # fmt: skip
            f.saw(r.status_code)
            f.expect(r.status_code in (400, 401, 403), f"/admin passed {headers}")

    async def f8_unbounded_fields(self, f: Finding) -> None:
        for field_name in ("user", "prompt_cache_key"):
            body = {"model": MODEL, "input": "x", field_name: "u" * 100_000, "background": True}
            r = await self.post(f, "/v1/responses", body)
            f.expect(r is not None and r.status_code == 400, f"a 100 kB {field_name} was kept")
        for i in range(5):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1, f"{i}{'x' * 200_000}": 1}  # fmt: skip
            await self.post(f, "/v1/chat/completions", body)

    async def f9_delete_running(self, f: Finding) -> None:
        rid = await self.background(f, "Write a long story.", 64)
        if rid is None:
            return
        gone = await self.client.delete(f"/v1/responses/{rid}", headers=self.headers("a"))
        f.saw(gone.status_code)
        await asyncio.sleep(2)
        again = await self.get(f, f"/v1/responses/{rid}")
        f.expect(again is not None and again.status_code == 404, "a deleted response came back")

    async def f10_tokens_per_minute(self, f: Finding) -> None:
        body = {"model": MODEL, "max_tokens": 4,
                "messages": [{"role": "user", "content": "word " * 400}]}  # fmt: skip
        statuses = []
        for _ in range(3):
            r = await self.post(f, "/v1/chat/completions", body, key="c")
            statuses.append(r.status_code if r is not None else 0)
        f.expect(429 in statuses, "400-token prompts passed a 100-token limit")

    async def f11_smaller(self, f: Finding) -> None:
        item = [{"type": "message", "role": "user", "content": "mine", "id": "msg_abuse"}]
        for key in ("a", "b"):
            await self.post(f, "/v1/responses", {"model": MODEL, "input": item,
                            "max_output_tokens": 1}, key=key)  # fmt: skip
        ref = [{"type": "item_reference", "id": "msg_abuse"}]
        r = await self.post(f, "/v1/responses/input_tokens", {"model": MODEL, "input": ref})
        f.expect(r is not None and r.status_code == 200, "key b broke key a's item reference")
        many = {"model": MODEL, "input": ref * 25_000}
        r = await self.post(f, "/v1/responses/input_tokens", many)
        f.expect(r is not None and r.status_code == 400, "25,000 references: not a 400")
        tools = [{"type": "web_search\r\nx-forged: 1"}]
        r = await self.post(f, "/v1/responses", {"model": MODEL, "input": "hi", "tools": tools,
                            "max_output_tokens": 1, "store": False})  # fmt: skip
        f.expect(r is not None and "x-forged" not in r.headers, "a tool type forged a header")
        embed = {"model": MODEL, "input": [f"text {i}" for i in range(64)]}
        await self.post(f, "/v1/embeddings", embed)
        f.saw(await slow_headers(self.base, 10))
        f.saw(await slow_body(self.base, self.keys["a"]))

    async def run(self, findings: list[tuple[str, Callable[[Finding], Awaitable[None]]]]) -> None:
        for name, action in findings:
            f = Finding(name, started=time.perf_counter())
            self.findings.append(f)
            try:
                await asyncio.wait_for(action(f), 60)
            except (TimeoutError, httpx.HTTPError) as err:
                f.problems.append(f"{type(err).__name__}: {err}")
            f.ended = time.perf_counter()
            f.rss_mb = self.rss() if self.rss is not None else None

    def plan(self) -> list[tuple[str, Callable[[Finding], Awaitable[None]]]]:
        return [
            ("1 follow past the end", self.f1_follow_past_the_end),
            ("2 2 MB of bad messages", self.f2_many_bad_messages),
            ("3 truncation, 512 turns", self.f3_truncation),
            ("4 store then get", self.f4_store_then_get),
            ("5 locked SQLite store", self.f5_locked_store),
            ("6 prefix cache across keys", self.f6_cache_salt),
            ("7 /admin CSRF", self.f7_admin_csrf),
            ("8 unbounded fields", self.f8_unbounded_fields),
            ("9 delete a running response", self.f9_delete_running),
            ("10 tokens per minute", self.f10_tokens_per_minute),
            ("11 items, tools, slow clients", self.f11_smaller),
        ]


async def slow_headers(base: str, n: int) -> str:
    """``n`` connections sending a header line every 0.5 s: all closed by the server?"""
    url = urlparse(base)

    async def one() -> bool:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(40):
                await asyncio.sleep(0.5)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                if reader.at_eof():
                    return True
            return False
        except (ConnectionError, OSError):
            return True
        finally:
            writer.close()

    closed = await asyncio.gather(*(one() for _ in range(n)))
    return "closed" if all(closed) else "held"


async def slow_body(base: str, key: str) -> int:
    """A request whose body never arrives whole: its status (408 past the body deadline)."""
    url = urlparse(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 100\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\n\r\n{")  # fmt: skip
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
        return int(line.split()[1]) if line else 0
    finally:
        writer.close()


class Probe:
    """``/health`` every 100 ms and a steady chat stream, measured until stopped."""

    def __init__(self, base: str, key: str, model: str) -> None:
        self.base = base
        self.key = key
        self.model = model
        self.health_ms: list[float] = []
        self.gaps: list[float] = []
        #: When each gap ended (``time.perf_counter()``), to place it in a finding's window.
        self.gap_at: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.stop = asyncio.Event()

    async def health(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as c:
            while not self.stop.is_set():
                started = time.perf_counter()
                r = await c.get("/health")
                self.health_ms.append((time.perf_counter() - started) * 1000)
                self.statuses[f"health {r.status_code}"] += 1
                await asyncio.sleep(0.1)

    async def stream(self) -> None:
        body = {"model": self.model, "stream": True, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me about the sea."}]}  # fmt: skip
        headers = {"authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as c:
            while not self.stop.is_set():
                async with c.stream("POST", "/v1/chat/completions", json=body,
                                    headers=headers) as r:  # fmt: skip
                    self.statuses[f"stream {r.status_code}"] += 1
                    last = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        delta = json.loads(line[6:])["choices"]
                        if not delta or not delta[0]["delta"].get("content"):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            self.gaps.append(now - last)
                            self.gap_at.append(now)
                        last = now

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Probe]:
        self.stop.clear()
        tasks = [asyncio.create_task(self.health()), asyncio.create_task(self.stream())]
        try:
            yield self
        finally:
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


async def warm_up(base: str, key: str) -> None:
    """Long prompts on every slot of the model at once: the KV cells (allocated at load, paged
    in as they are first written) count in the RSS from here on."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers) as c:

        async def one(i: int) -> None:
            text = f"{i} " + "warm words " * 400
            messages = [{"role": "user", "content": text}]
            body = {"model": MODEL, "max_tokens": 2, "messages": messages}
            await c.post("/v1/chat/completions", json=body)

        await asyncio.gather(*(one(i) for i in range(2)))


async def wait_ready(base: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"{base} did not become ready")


async def main(args: argparse.Namespace) -> int:
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="abuse-"))
    keys = dict(zip("abc", args.keys.split(","), strict=True)) if args.keys else KEYS
    if args.base_url:
        if urlparse(args.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--base-url must be a loopback address")
        base, store = args.base_url.rstrip("/"), None
    else:
        server = Server(tmp)
        base, store = server.base_url, tmp / "responses.sqlite3"
    try:
        await wait_ready(base)
        probe = Probe(base, keys["a"], args.steady_model)
        await warm_up(base, keys["a"])
        async with probe.running():  # warm-up, then the idle figures
            await asyncio.sleep(2)
            probe.gaps.clear()
            probe.gap_at.clear()
            await asyncio.sleep(args.idle_s)
        idle_gaps, idle_health = list(probe.gaps), list(probe.health_ms)
        probe.gaps.clear()
        probe.gap_at.clear()
        probe.health_ms.clear()
        abuse = Abuse(base, keys, store, server.rss_mb if server else None)
        started = time.perf_counter()
        rss_start = None
        async with probe.running():
            for _ in range(args.rounds):
                if abuse.findings:  # after the first round: what it paged in stays
                    await asyncio.sleep(args.settle_s)
                    rss_start = server.rss_mb() if server else None
                await abuse.run(abuse.plan())
        abuse_s = time.perf_counter() - started
        await abuse.client.aclose()
        await asyncio.sleep(args.settle_s)
        rss_end = server.rss_mb() if server else None
    finally:
        if server is not None:
            server.stop()
    return report(abuse, probe, idle_gaps, idle_health, rss_start, rss_end, abuse_s)


def merged(rounds: list[Finding]) -> Finding:
    """One finding's rounds as one row (RSS: after its last round)."""
    out = Finding(rounds[0].name, rss_mb=rounds[-1].rss_mb)
    for f in rounds:
        out.statuses.update(f.statuses)
        out.problems += f.problems
    return out


def report(
    abuse: Abuse,
    probe: Probe,
    idle_gaps: list[float],
    idle_health: list[float],
    rss_start: float | None,
    rss_end: float | None,
    abuse_s: float,
) -> int:
    print("| finding | requests | statuses seen | 5xx | longest token gap | RSS after |")
    print("|---|---:|---|---:|---:|---:|")
    failures: list[str] = []
    by_name: dict[str, list[Finding]] = {}
    for f in abuse.findings:
        by_name.setdefault(f.name, []).append(f)
    for rounds in by_name.values():
        f = merged(rounds)
        seen = ", ".join(f"{s} x{n}" for s, n in sorted(f.statuses.items()))
        during = [g for g, at in zip(probe.gaps, probe.gap_at, strict=True)
                  if any(r.started <= at <= r.ended for r in rounds)]  # fmt: skip
        gap = f"{max(during) * 1000:.0f} ms" if during else "-"
        rss = f"{f.rss_mb:.0f} MB" if f.rss_mb is not None else "-"
        print(f"| {f.name} | {sum(f.statuses.values())} | {seen} | {f.fivexx} | {gap} | {rss} |")
        failures += [f"finding {f.name}: {p}" for p in f.problems]
        if f.fivexx:
            failures.append(f"finding {f.name}: {f.fivexx} responses were 5xx")
    idle_p99, busy_p99 = p99(idle_gaps) * 1000, p99(probe.gaps) * 1000
    health_p99 = p99(probe.health_ms)
    print()
    print(f"abuse phase: {abuse_s:.0f} s; probe statuses: {dict(probe.statuses)}")
    print(f"/health p99: idle {p99(idle_health):.1f} ms, under abuse {health_p99:.1f} ms "
          f"(limit 100 ms)")  # fmt: skip
    print(f"steady stream inter-token gap p99: idle {idle_p99:.1f} ms, under abuse "
          f"{busy_p99:.1f} ms ({busy_p99 / max(idle_p99, 1e-9):.2f}x, limit 3x)")  # fmt: skip
    if health_p99 >= 100:
        failures.append(f"/health p99 {health_p99:.1f} ms")
    if busy_p99 >= 3 * idle_p99:
        failures.append(f"inter-token gap p99 {busy_p99:.1f} ms vs {idle_p99:.1f} ms idle")
    if any(not s.endswith(" 200") for s in probe.statuses):
        failures.append(f"probe statuses {dict(probe.statuses)}")
    if rss_start is not None and rss_end is not None:
        growth = (rss_end - rss_start) / rss_start
        print(f"RSS: {rss_start:.0f} MB after the first round, {rss_end:.0f} MB after the "
              f"last ({growth:+.1%}, limit 10%)")  # fmt: skip
        if growth > 0.10:
            failures.append(f"RSS grew {growth:.1%}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running gateway (loopback only)")
    parser.add_argument("--keys", help="the API keys a,b,c of --base-url (comma-separated)")
    parser.add_argument("--steady-model", default="steady", help="the steady stream's model")
    parser.add_argument("--idle-s", type=float, default=5.0, help="the idle measurement")
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait before an RSS sample")
    parser.add_argument(
        "--rounds", type=int, default=2, help="of every finding; RSS from the first's end"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
