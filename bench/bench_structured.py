"""Constrained decoding benchmark: free text vs ``json_schema``, this gateway vs llama-server.

    python bench/bench_structured.py [--gguf PATH] [--llama-server BIN] [--concurrency 1 8]
        [--max-tokens 64] [--rounds 2] [--threads N] [--json out.json] [--plot out.png]

Both servers run one at a time on free ports with the same model file, slots (the largest
``--concurrency``), context per slot and threads: this gateway (``gateway serve``, the
llama.cpp backend, llguidance in the sampler chain) and llama.cpp's own C++ ``llama-server``
(its GBNF grammar sampler, built by ``scripts/build_llama_server.sh`` from the llama.cpp
sources vendored in the pinned llama-cpp-python sdist). The client is the official ``openai``
SDK (async), the same for both.

Every request streams exactly ``--max-tokens`` tokens (EOS banned through ``logit_bias``; the
schema asks for more than any answer reaches), so free and constrained runs generate the same
number of tokens. Two schemas (``--schema``): ``text``, a fixed head (enum, bounded integer,
array of strings) before one long string; ``records``, an array of many small objects (enum,
integer, boolean, short string each), the shape of extraction and tool arguments, where the
grammar decides most tokens. Both servers run at once and take turns, one load at a time
(gateway free, gateway json, llama-server free, llama-server json, repeated ``--rounds``
times), so the machine's drift falls on both alike. Tokens are counted from ``usage``
(``stream_options.include_usage``). Reports aggregate tok/s and TTFT p50/p95 per server, mode
and stream count, with the ratios the targets are stated in: constrained / free for each
server, and gateway / llama-server for each mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving
from bench_serving import Server, default_gguf, eos_tokens, gateway_server, running

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["essay", "story", "report"]


def text_schema(max_tokens: int) -> dict[str, Any]:
    """A head, then a ``text`` that needs more characters than ``max_tokens`` tokens hold
    (at most 1,024: llama-server cannot parse the grammar of a longer ``minLength``)."""
    return {
        "type": "object",
        "properties": {
            "kind": {"enum": KINDS},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "text": {"type": "string", "minLength": min(16 * max_tokens, 1024)},
        },
        "required": ["kind", "year", "tags", "text"],
        "additionalProperties": False,
    }


RECORD = {
    "type": "object",
    "properties": {
        "kind": {"enum": KINDS},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "done": {"type": "boolean"},
        "title": {"type": "string", "maxLength": 24},
    },
    "required": ["kind", "year", "done", "title"],
    "additionalProperties": False,
}


def records_schema(max_tokens: int) -> dict[str, Any]:
    """More records than ``max_tokens`` tokens hold (each takes at least ~20 tokens)."""
    return {
        "type": "object",
        "properties": {
            "records": {"type": "array", "items": RECORD, "minItems": max(4, max_tokens // 8)}
        },
        "required": ["records"],
        "additionalProperties": False,
    }


SCHEMAS = {"text": text_schema, "records": records_schema}


MODES = ("free", "json_schema")


@dataclass
class Run:
    server: str
    mode: str
    streams: int
    requests: int
    tokens: int
    seconds: float
    ttft_s: list[float]
    #: Answers whose text follows the schema as far as it goes (constrained runs).
    valid: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def ttft(self, q: float) -> float:
        return bench_serving._quantile(self.ttft_s, q)


def llama_server_binary(given: Path | None) -> Path:
    if given is not None:
        return given
    out = subprocess.run(
        [str(ROOT / "scripts" / "build_llama_server.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return ROOT / out.stdout.strip().splitlines()[-1]


def llama_server(args: argparse.Namespace, binary: Path) -> Server:
    port = bench_serving._free_port()
    slots = max(args.concurrency)
    command = [
        str(binary), "--model", str(args.gguf), "--alias", "peer",
        "--parallel", str(slots), "--ctx-size", str(slots * args.n_ctx), "--cont-batching",
        "--threads", str(args.threads), "--threads-batch", str(args.threads),
        "--n-gpu-layers", str(args.n_gpu_layers), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    return Server(
        "llama-server", "peer", command, f"http://127.0.0.1:{port}/v1", bench_serving._env()
    )


class Driver:
    def __init__(self, server: Server, args: argparse.Namespace, ban: list[int]) -> None:
        self.server = server
        self.max_tokens = args.max_tokens
        self.logit_bias = {str(t): -100 for t in ban}
        self.kind = args.schema
        self.schema = SCHEMAS[args.schema](args.max_tokens)
        self.client = AsyncOpenAI(
            base_url=server.base_url, api_key="bench", max_retries=0, timeout=httpx.Timeout(900),
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256)),
        )  # fmt: skip

    async def one(self, mode: str, topic: str) -> tuple[float, int, str]:
        """Stream one completion: (TTFT s, completion tokens, text)."""
        extra: dict[str, Any] = {}
        if mode == "json_schema":
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "doc", "schema": self.schema, "strict": True},
            }
        started = time.perf_counter()
        ttft, pieces, tokens = float("nan"), [], 0
        stream = await self.client.chat.completions.create(
            model=self.server.model,
            messages=[{"role": "user", "content": f"Write a long essay about {topic} as JSON."}],
            max_tokens=self.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, logit_bias=self.logit_bias or None,  # type: ignore[arg-type]
            **extra,
        )  # fmt: skip
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    if not pieces:
                        ttft = time.perf_counter() - started
                    pieces.append(choice.delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return ttft, tokens or len(pieces), "".join(pieces)

    async def load(self, mode: str, streams: int, rounds: int) -> Run:
        ttfts: list[float] = []
        tokens = valid = 0

        async def worker(w: int) -> None:
            nonlocal tokens, valid
            for r in range(rounds):
                topic = bench_serving.TOPICS[(w + r * streams) % len(bench_serving.TOPICS)]
                ttft, n, text = await self.one(mode, f"{topic} (#{w}.{r})")
                valid += mode == "json_schema" and follows_schema(text, self.kind)
                ttfts.append(ttft)
                tokens += n

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(streams)))
        seconds = time.perf_counter() - started
        n = streams * rounds
        return Run(self.server.name, mode, streams, n, tokens, seconds, ttfts, valid)

    async def aclose(self) -> None:
        await self.client.close()


def follows_schema(text: str, kind: str) -> bool:
    """A constrained answer, cut by max_tokens, follows the schema so far (llama-server's
    GBNF for a schema lets white space and stray tokens through, so the peer is counted, not
    trusted): the text schema's head parses and holds; every complete record validates."""
    if kind == "records":
        return _records_follow(text)
    cut = re.split(r'"text"\s*:\s*"', text, maxsplit=1)
    if len(cut) != 2:
        return False
    try:
        head = json.loads(cut[0] + '"text": ""}')
    except ValueError:
        return False
    return (
        isinstance(head, dict)
        and head.get("kind") in KINDS
        and isinstance(head.get("year"), int)
        and 1900 <= head["year"] <= 2100
    )


def _records_follow(text: str) -> bool:
    import jsonschema

    last = text.rfind("}")
    if last < 0:
        return False
    try:  # the complete records, closed as if the list ended there
        doc = json.loads(text[: last + 1] + "]}")
    except ValueError:
        return False
    relaxed = {**records_schema(0), "properties": {"records": {"type": "array", "items": RECORD}}}
    valid = jsonschema.Draft202012Validator(relaxed).is_valid(doc)
    return valid and len(doc["records"]) > 0


async def interleaved(servers: list[Server], args: argparse.Namespace, ban: list[int]) -> list[Run]:
    """Each (server, mode, streams) load ``args.rounds`` times, taking turns."""
    drivers = [Driver(server, args, ban) for server in servers]
    for driver in drivers:
        for mode in MODES:  # warm up: the first grammar builds llguidance's token trie
            await driver.one(mode, "warm up")
    runs: dict[tuple[str, str, int], Run] = {}
    for streams in args.concurrency:
        for _ in range(args.rounds):
            for driver in drivers:
                for mode in MODES:
                    one = await driver.load(mode, streams, 1)
                    key = (one.server, mode, streams)
                    runs[key] = _merge(runs[key], one) if key in runs else one
        for key in [k for k in runs if k[2] == streams]:
            run = runs[key]
            valid = f", valid {run.valid}/{run.requests}" if run.mode == "json_schema" else ""
            print(
                f"  {run.server} {run.mode:11} {streams:2} streams: {run.tokens_per_s:7.1f} tok/s,"
                f" TTFT p50 {run.ttft(0.5):.2f} s p95 {run.ttft(0.95):.2f} s{valid}",
                flush=True,
            )
    for driver in drivers:
        await driver.aclose()
    return list(runs.values())


def _merge(a: Run, b: Run) -> Run:
    return Run(
        a.server, a.mode, a.streams, a.requests + b.requests, a.tokens + b.tokens,
        a.seconds + b.seconds, a.ttft_s + b.ttft_s, a.valid + b.valid,
    )  # fmt: skip


def _find(runs: list[Run], server: str, mode: str, streams: int) -> Run | None:
    return next((r for r in runs if (r.server, r.mode, r.streams) == (server, mode, streams)), None)


def _ratio(a: Run | None, b: Run | None) -> str:
    return f"{a.tokens_per_s / b.tokens_per_s:.2f}x" if a and b and b.tokens_per_s else "-"


def report(runs: list[Run], args: argparse.Namespace) -> None:
    console = Console(width=160)
    title = f"Constrained decoding, {args.gguf.name}, {args.schema}, {args.max_tokens} tokens"
    table = Table(title=title)
    for column in ("server", "mode", "streams", "tok/s", "TTFT p50 s", "TTFT p95 s", "valid"):
        table.add_column(column, justify="right")
    for r in runs:
        valid = f"{r.valid}/{r.requests}" if r.mode == "json_schema" else "-"
        table.add_row(
            r.server, r.mode, str(r.streams), f"{r.tokens_per_s:.1f}",
            f"{r.ttft(0.5):.3f}", f"{r.ttft(0.95):.3f}", valid,
        )  # fmt: skip
    console.print(table)
    ratios = Table(title="Ratios (aggregate tok/s)")
    columns = ["streams", "gateway json/free", "llama-server json/free"]
    for column in (*columns, "json: gw/llama-server", "free: gw/llama-server"):
        ratios.add_column(column, justify="right")
    for s in args.concurrency:

        def get(server: str, mode: str, s: int = s) -> Run | None:
            return _find(runs, server, mode, s)

        ratios.add_row(
            str(s),
            _ratio(get("gateway", "json_schema"), get("gateway", "free")),
            _ratio(get("llama-server", "json_schema"), get("llama-server", "free")),
            _ratio(get("gateway", "json_schema"), get("llama-server", "json_schema")),
            _ratio(get("gateway", "free"), get("llama-server", "free")),
        )
    console.print(ratios)


def plot(runs: list[Run], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for server in sorted({r.server for r in runs}):
        for mode in MODES:
            points = [
                (r.streams, r.tokens_per_s) for r in runs if (r.server, r.mode) == (server, mode)
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=f"{server} {mode}")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: SmolLM2)")
    p.add_argument("--llama-server", type=Path, default=None, help="binary (default: build it)")
    p.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    p.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--schema", choices=sorted(SCHEMAS), default="text")
    p.add_argument("--rounds", type=int, default=2, help="requests per stream and level")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", default="bench_structured.json")
    p.add_argument("--plot", default="bench_structured.png")
    args = p.parse_args(argv)
    args.gguf = args.gguf or default_gguf()
    args.backend_config = None  # gateway_server's own model table
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ban = eos_tokens(args.gguf)
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        servers = [gateway_server(args, workdir)]
        if not args.skip_peer:
            servers.append(llama_server(args, llama_server_binary(args.llama_server)))
        for server in servers:
            print(f"starting {server.name} ...", flush=True)
            stack.enter_context(running(server, workdir / f"{server.name}.log"))
        runs = asyncio.run(interleaved(servers, args, ban))
    report(runs, args)
    Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))
    plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
