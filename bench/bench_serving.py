"""Serving benchmark: this gateway against ``python -m llama_cpp.server`` on the same model.

    python bench/bench_serving.py [--gguf PATH] [--n-ctx 2048] [--threads N] [--n-gpu-layers -1]
        [--concurrency 1 4 8] [--max-tokens 64] [--rounds 2] [--turns 10] [--users 4]
        [--backend-config FILE] [--skip-peer] [--json out.json] [--plot out.png]

Both servers run one at a time, as subprocesses on free ports, with the same model file, context
size per sequence (``--n-ctx``) and thread counts; the peer with ``--interrupt_requests false``
(its default cuts a running stream off when another request arrives). The client is the official
``openai`` SDK (async) in this process, the same for both.

Scenarios, with fixed prompts and ``max_tokens`` (EOS banned through ``logit_bias`` when the
GGUF is known, so every request generates exactly ``max_tokens``):

* ``C`` concurrent streams (each of ``C`` workers sends ``--rounds`` requests back to back):
  aggregate generated tokens/s and time to first token p50/p95;
* a ``--turns``-turn conversation for ``--users`` users interleaved round-robin (A1 B1 C1 D1 A2
  ...), each turn re-sending the whole history with the model's own replies: TTFT per turn.

``--backend-config FILE`` points the gateway at any model table (a TOML file holding one
``[models.<name>]`` table, any backend), e.g. on a GPU machine; ``--skip-peer`` runs the gateway
alone. Prints a table (rich), saves JSON, and a plot when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

SYSTEM = "You are a helpful assistant. Answer in full sentences."
TOPICS = [
    "the ocean", "volcanoes", "the moon", "honey bees",
    "ancient Rome", "rainforests", "the piano", "glaciers",
]  # fmt: skip
CONVERSATION = [
    "Tell me about {t}.",
    "What is the most surprising fact about it?",
    "How would you explain that to a child?",
    "Give me an example.",
    "Why does that matter?",
    "What do people often get wrong about it?",
    "Can you compare it with something else?",
    "What should I read next about it?",
    "Summarize our conversation so far.",
    "Thank you. One last fact, please.",
]


@dataclass
class LoadResult:
    server: str
    streams: int
    requests: int
    tokens: int
    seconds: float
    ttft_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def ttft(self, q: float) -> float:
        return _quantile(self.ttft_s, q)


@dataclass
class ConversationResult:
    server: str
    #: ttft[user][turn] in seconds
    ttft: list[list[float]] = field(default_factory=list)
    prompt_tokens: list[list[int]] = field(default_factory=list)

    def turn_mean(self, turn: int) -> float:
        return statistics.fmean(u[turn] for u in self.ttft)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers, as an argparse ``type``: ``"1,8"`` -> ``[1, 8]``."""
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def default_gguf() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gateway.defaults import default_model_path

    return default_model_path()


def eos_tokens(gguf: Path) -> list[int]:
    """End-of-generation token ids of a GGUF (vocabulary only), to ban them."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        return []
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        return [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llama_cpp.llama_model_free(model)


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    model: str
    command: list[str]
    base_url: str
    env: dict[str, str]


@contextlib.contextmanager
def running(server: Server, log_path: Path, timeout_s: float = 180) -> Iterator[Server]:
    with log_path.open("w") as log:
        proc = subprocess.Popen(server.command, env=server.env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited; see {log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if _ready(server):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} did not start; see {log_path}")
                time.sleep(0.2)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ready(server: Server) -> bool:
    """The gateway says so on /ready (models loaded); the peer answers /v1/models once up."""
    if server.name == "gateway":
        url = server.base_url.removesuffix("/v1") + "/ready"
    else:
        url = server.base_url + "/models"
    return httpx.get(url, timeout=2).status_code == 200


def gateway_server(args: argparse.Namespace, workdir: Path) -> Server:
    port = _free_port()
    if args.backend_config:
        raw = tomllib.loads(Path(args.backend_config).read_text())
        models = raw.get("models", raw)
        name = next(iter(models))
        config = {"models": {name: models[name]}}
    else:
        name = "bench"
        config = {
            "models": {
                name: {
                    "backend": "llamacpp",
                    "model_path": str(args.gguf),
                    "n_gpu_layers": args.n_gpu_layers,
                    "batching": {
                        "max_concurrent": max(args.concurrency),
                        "max_queue": 1024,
                        "queue_timeout_s": 600.0,
                        "n_threads": args.threads,
                        "n_threads_batch": args.threads,
                    },
                    "kv_cache": {"n_ctx_per_slot": args.n_ctx},
                }
            }
        }
    path = workdir / "gateway.toml"
    path.write_text(_toml(config))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return Server("gateway", name, command, f"http://127.0.0.1:{port}/v1", _env())


def peer_server(args: argparse.Namespace) -> Server:
    port = _free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(args.gguf), "--model_alias", "peer",
        "--n_ctx", str(args.n_ctx),
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
        "--n_gpu_layers", str(args.n_gpu_layers),
        "--interrupt_requests", "false",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    return Server("llama_cpp.server", "peer", command, f"http://127.0.0.1:{port}/v1", _env())


def _env() -> dict[str, str]:
    """The servers' environment: this one, as their users start them (the gateway then picks its
    own OpenMP wait settings, llama-server keeps libgomp's); export ``OMP_WAIT_POLICY`` before
    the run to impose one on every server."""
    return dict(os.environ)


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for nested tables of scalars and lists."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(_toml(value, f"{prefix}{key}."))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    head = f"[{prefix[:-1]}]\n" if prefix and scalars else ""
    return head + "".join(s + "\n" for s in scalars) + "\n".join(tables)


# --- client -----------------------------------------------------------------------------------


class Driver:
    def __init__(self, server: Server, max_tokens: int, ban: list[int]) -> None:
        self.server = server
        self.client = AsyncOpenAI(
            base_url=server.base_url,
            api_key="bench",
            max_retries=0,
            timeout=httpx.Timeout(900),
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256)),
        )
        self.max_tokens = max_tokens
        self.logit_bias = {str(t): -100 for t in ban}

    async def chat(
        self, messages: list[dict[str, str]], max_tokens: int | None = None
    ) -> tuple[float, int, str]:
        """Stream one completion: (TTFT s, tokens, text)."""
        started = time.perf_counter()
        ttft = float("nan")
        pieces: list[str] = []
        chunks = 0
        stream = await self.client.chat.completions.create(
            model=self.server.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens or self.max_tokens,
            temperature=0,
            stream=True,
            logit_bias=self.logit_bias or None,  # type: ignore[arg-type]
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    if not pieces:
                        ttft = time.perf_counter() - started
                    pieces.append(choice.delta.content)
                    chunks += 1
        return ttft, chunks, "".join(pieces)

    async def load(self, streams: int, rounds: int) -> LoadResult:
        ttfts: list[float] = []
        tokens = 0

        async def worker(w: int) -> None:
            nonlocal tokens
            for r in range(rounds):
                topic = TOPICS[(w + r * streams) % len(TOPICS)]
                messages = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Write a long essay about {topic} (#{w}.{r})."},
                ]
                ttft, n, _ = await self.chat(messages)
                ttfts.append(ttft)
                tokens += n

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(streams)))
        seconds = time.perf_counter() - started
        return LoadResult(self.server.name, streams, streams * rounds, tokens, seconds, ttfts)

    async def conversation(self, users: int, turns: int, reply_tokens: int) -> ConversationResult:
        result = ConversationResult(self.server.name)
        histories = [[{"role": "system", "content": SYSTEM}] for _ in range(users)]
        result.ttft = [[] for _ in range(users)]
        for turn in range(turns):
            for u in range(users):
                text = CONVERSATION[turn % len(CONVERSATION)].format(t=TOPICS[u % len(TOPICS)])
                histories[u].append({"role": "user", "content": text})
                ttft, _, reply = await self.chat(histories[u], reply_tokens)
                histories[u].append({"role": "assistant", "content": reply})
                result.ttft[u].append(ttft)
        return result

    async def aclose(self) -> None:
        await self.client.close()


async def run_all(server: Server, args: argparse.Namespace, ban: list[int]) -> dict[str, Any]:
    driver = Driver(server, args.max_tokens, ban)
    try:
        await driver.chat([{"role": "user", "content": "Warm up."}], 4)
        loads = []
        for c in args.concurrency:
            result = await driver.load(c, args.rounds)
            print(
                f"  {server.name}: {c} streams: {result.tokens_per_s:.1f} tok/s, "
                f"TTFT p50 {result.ttft(0.5):.2f} s p95 {result.ttft(0.95):.2f} s",
                flush=True,
            )
            loads.append(result)
        conv = await driver.conversation(args.users, args.turns, args.reply_tokens)
        means = " ".join(f"{conv.turn_mean(t):.2f}" for t in range(args.turns))
        print(f"  {server.name}: conversation TTFT per turn (mean over users): {means}")
        return {"load": loads, "conversation": conv}
    finally:
        await driver.aclose()


# --- report -----------------------------------------------------------------------------------


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    console = Console(width=150)
    ours, peer = results["gateway"], results.get("llama_cpp.server")
    table = Table(title=f"Concurrent streams ({args.max_tokens} tokens each, {args.rounds} rounds)")
    columns = ["streams", "gateway tok/s", "peer tok/s", "tok/s ratio"]
    columns += ["gateway TTFT p50/p95 s", "peer TTFT p50/p95 s", "p95 ratio (gw/peer)"]
    for col in columns:
        table.add_column(col, justify="right")
    for i, ours_load in enumerate(ours["load"]):
        peer_load = peer["load"][i] if peer else None
        table.add_row(
            str(ours_load.streams),
            f"{ours_load.tokens_per_s:.1f}",
            f"{peer_load.tokens_per_s:.1f}" if peer_load else "-",
            _ratio(ours_load.tokens_per_s, peer_load.tokens_per_s if peer_load else None),
            f"{ours_load.ttft(0.5):.2f} / {ours_load.ttft(0.95):.2f}",
            f"{peer_load.ttft(0.5):.2f} / {peer_load.ttft(0.95):.2f}" if peer_load else "-",
            _ratio(ours_load.ttft(0.95), peer_load.ttft(0.95) if peer_load else None),
        )
    console.print(table)
    conv = Table(title=f"{args.turns}-turn conversation, {args.users} interleaved users: TTFT (s)")
    for col in ("turn", "gateway mean", "gateway max", "peer mean", "peer max", "ratio (gw/peer)"):
        conv.add_column(col, justify="right")
    oc: ConversationResult = ours["conversation"]
    pc: ConversationResult | None = peer["conversation"] if peer else None
    for t in range(args.turns):
        peer_mean = pc.turn_mean(t) if pc else None
        conv.add_row(
            str(t + 1),
            f"{oc.turn_mean(t):.3f}",
            f"{max(u[t] for u in oc.ttft):.3f}",
            f"{peer_mean:.3f}" if pc and peer_mean is not None else "-",
            f"{max(u[t] for u in pc.ttft):.3f}" if pc else "-",
            _ratio(oc.turn_mean(t), peer_mean),
        )
    console.print(conv)
    worst = max(u[-1] / u[0] for u in oc.ttft)
    console.print(f"gateway: worst turn-{args.turns} / turn-1 TTFT over users: {worst:.2f}x")


def save(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    data = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": {
            name: {
                "load": [
                    {
                        **asdict(r),
                        "tokens_per_s": r.tokens_per_s,
                        "ttft_p50_s": r.ttft(0.5),
                        "ttft_p95_s": r.ttft(0.95),
                    }
                    for r in res["load"]
                ],
                "conversation": asdict(res["conversation"]),
            }
            for name, res in results.items()
        },
    }
    Path(args.json).write_text(json.dumps(data, indent=2))
    print(f"saved {args.json}")


def plot(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for name, res in results.items():
        streams = [r.streams for r in res["load"]]
        ax1.plot(streams, [r.tokens_per_s for r in res["load"]], marker="o", label=name)
        ax2.plot(streams, [r.ttft(0.95) for r in res["load"]], marker="o", label=name)
        conv: ConversationResult = res["conversation"]
        turns = range(1, len(conv.ttft[0]) + 1)
        ax3.plot(turns, [conv.turn_mean(t - 1) for t in turns], marker="o", label=name)
    ax1.set(xlabel="concurrent streams", ylabel="generated tokens/s", title="throughput")
    ax2.set(xlabel="concurrent streams", ylabel="TTFT p95 (s)", title="time to first token")
    ax3.set(xlabel="turn", ylabel="TTFT (s)", title=f"{args.users} interleaved users")
    for ax in (ax1, ax2, ax3):
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"saved {args.plot}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: SmolLM2)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context per sequence")
    p.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per worker and level")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--reply-tokens", type=int, default=32, help="max_tokens per conversation turn")
    p.add_argument(
        "--backend-config",
        type=Path,
        default=None,
        help="TOML with one [models.<name>] table for the gateway (any backend)",
    )
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--no-ban-eos", action="store_true", help="let generations stop at EOS")
    p.add_argument("--json", default="bench_serving.json")
    p.add_argument("--plot", default="bench_serving.png")
    args = p.parse_args(argv)
    if args.gguf is None and not args.backend_config:
        args.gguf = default_gguf()
    if args.gguf is None:
        args.skip_peer = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ban = [] if args.no_ban_eos or args.gguf is None else eos_tokens(args.gguf)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        servers = [gateway_server(args, workdir)]
        if not args.skip_peer:
            servers.append(peer_server(args))
        for server in servers:
            print(f"starting {server.name} ...", flush=True)
            with running(server, workdir / f"{server.name}.log"):
                results[server.name] = asyncio.run(run_all(server, args, ban))
    report(results, args)
    save(results, args)
    plot(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
