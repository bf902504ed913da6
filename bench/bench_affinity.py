"""Prefix affinity vs round-robin over a fleet of caching replicas, on a multi-turn workload.

    python bench/bench_affinity.py [--replicas 2] [--conversations 8] [--turns 4]
        [--concurrency 4] [--policies affinity round_robin] [--engine llamacpp] [--json F]

Each policy gets fresh replicas (empty caches): ``--replicas`` gateway processes running the
llama.cpp backend on SmolLM2 (prefix reuse plus an LRU of finished prefixes), or with
``--engine llama_cpp_server`` llama-cpp-python's own server (a one-slot prefix cache, no
usage on streams, so no cached-token column). In front, a gateway process whose one model uses
the ``openai`` backend with that policy. Conversations run ``--concurrency`` at a time, each
turn after the previous one's answer; every conversation opens with its own long document, so
its prefix is worth keeping. Per turn: time to first token at the client, and prompt tokens the
replica took from its cache (``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

WORDS = ("orbit", "planet", "comet", "moon", "dust", "ring", "storm", "crater", "ice", "rock")
QUESTIONS = [
    "Summarize the report in one sentence.",
    "Which object is mentioned first?",
    "What does the report say about the storms?",
    "Name one number from the report.",
    "Is anything said about ice?",
    "What should the next probe measure?",
]


@dataclass
class Turn:
    policy: str
    conversation: int
    turn: int
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    #: The replica that answered, where it says (``x-gateway-replica``: Ray Serve).
    replica: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: object) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def toml(config: Mapping[str, Mapping[str, object]]) -> str:
    out = []
    for table, entries in config.items():
        out.append(f"[{table}]")
        out.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in entries.items())
    return "\n".join(out) + "\n"


class Server:
    def __init__(self, argv: list[str], port: int, ready: str, log: Path) -> None:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:4]} not ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def gateway(tmp: Path, name: str, config: Mapping[str, Mapping[str, object]]) -> Server:
    path = tmp / f"{name}.toml"
    path.write_text(toml(config))
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return Server(argv, port, "/ready", tmp / f"{name}.log")


def replica(tmp: Path, name: str, engine: str, model_path: str) -> Server:
    if engine == "llama_cpp_server":
        port = free_port()
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", model_path]
        argv += ["--model_alias", "smol", "--n_threads", "1", "--n_threads_batch", "1"]
        argv += ["--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port)]
        return Server(argv, port, "/docs", tmp / f"{name}.log")
    table = {
        "backend": "llamacpp",
        "model_path": model_path,
        "batching": {"max_concurrent": 2, "n_threads": 1},
        "kv_cache": {"n_ctx_per_slot": 2048, "cached_prefixes": 8},
    }
    return gateway(tmp, name, {"models": {"smol": table}})


def front(tmp: Path, policy: str, replicas: list[Server], engine: str) -> Server:
    health = {"path": "/docs" if engine == "llama_cpp_server" else "/ready", "interval_s": 2.0}
    table: dict[str, object] = {
        "backend": "openai",
        "upstream_model": "smol",
        "context_length": 2048,
        "balancing": policy,
        "replicas": [{"url": r.url} for r in replicas],
        "health": health,
        "timeouts": {"first_byte_s": 300.0, "total_s": 900.0},
    }
    return gateway(tmp, f"front-{policy}", {"models": {"fleet": table}})


@contextmanager
def fleet(tmp: Path, policy: str, args: argparse.Namespace) -> Iterator[Server]:
    replicas: list[Server] = []
    servers: list[Server] = []
    try:
        for i in range(args.replicas):
            replicas.append(replica(tmp, f"{policy}-replica{i}", args.engine, args.model_path))
        servers = [*replicas, front(tmp, policy, replicas, args.engine)]
        yield servers[-1]
    finally:
        for s in reversed(servers or replicas):
            s.stop()


def document(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def opening(conversation: int, doc_words: int) -> list[dict[str, str]]:
    rng = random.Random(conversation)
    report = document(rng, doc_words)
    return [
        {"role": "system", "content": "You are a planetary science assistant. Answer briefly."},
        {"role": "user", "content": f"Report #{conversation}: {report}\n\n{QUESTIONS[0]}"},
    ]


async def ask(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str, dict[str, object], str]:
    body = {
        "model": "fleet",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    usage: dict[str, object] = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        replica = r.headers.get("x-gateway-replica", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", ()):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(piece)
            usage = chunk.get("usage") or usage
    took = ttft if ttft is not None else time.perf_counter() - started
    return took, "".join(text), usage, replica


async def conversation(
    client: httpx.AsyncClient, url: str, policy: str, i: int, args: argparse.Namespace
) -> list[Turn]:
    messages = opening(i, args.doc_words)
    turns = []
    for t in range(1, args.turns + 1):
        ttft, reply, usage, replica = await ask(client, url, messages, args.max_tokens)
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt = _count(usage.get("prompt_tokens"))
        turns.append(Turn(policy, i, t, ttft, prompt, _count(cached), replica))
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]},
        ]
    return turns


async def workload(url: str, policy: str, args: argparse.Namespace) -> list[Turn]:
    gate = asyncio.Semaphore(args.concurrency)

    async def one(i: int, client: httpx.AsyncClient) -> list[Turn]:
        async with gate:
            return await conversation(client, url, policy, i, args)

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(10_000, client)  # warm-up conversation (not counted)
        results = await asyncio.gather(*(one(i, client) for i in range(args.conversations)))
    return [t for turns in results for t in turns]


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def table(turns: list[Turn], policies: list[str], turn_count: int) -> str:
    head = (
        f"{'policy':<18}{'turn':>5}{'TTFT p50 ms':>13}{'TTFT mean ms':>14}"
        f"{'prompt tok':>12}{'cached tok':>12}{'cached %':>10}"
    )
    lines = [head, "-" * len(head)]
    for policy in policies:
        for t in [*range(1, turn_count + 1), 0]:
            rows = [x for x in turns if x.policy == policy and (t == 0 or x.turn == t)]
            if not rows:
                continue
            ttfts = [x.ttft_s * 1000 for x in rows]
            prompt = sum(x.prompt_tokens for x in rows)
            cached = sum(x.cached_tokens for x in rows)
            share = f"{100 * cached / prompt:.0f}" if prompt else "n/a"
            label = "all" if t == 0 else str(t)
            lines.append(
                f"{policy:<18}{label:>5}{statistics.median(ttfts):>13.0f}"
                f"{statistics.fmean(ttfts):>14.0f}{prompt:>12}{cached:>12}{share:>10}"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--doc-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["affinity", "round_robin"])
    parser.add_argument("--engine", choices=["llamacpp", "llama_cpp_server"], default="llamacpp")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.model_path is None:
        from gateway.defaults import default_model_path

        args.model_path = str(default_model_path())
    turns: list[Turn] = []
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
        for policy in args.policies:
            started = time.perf_counter()
            with fleet(Path(tmp), policy, args) as gw:
                turns += asyncio.run(workload(gw.url, policy, args))
            print(f"{policy}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(
        f"\n{args.replicas} replicas ({args.engine}, SmolLM2 Q4_1, 1 thread each), "
        f"{args.conversations} conversations x {args.turns} turns, {args.concurrency} at a time, "
        f"~{args.doc_words}-word opening document, max_tokens {args.max_tokens}\n"
    )
    print(table(turns, args.policies, args.turns))
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in turns], indent=1))


if __name__ == "__main__":
    main()
