"""The gateway's own cost: SSE chunks/s and added TTFT through the test double, beside a bare
sse-starlette endpoint that streams pre-serialized chunks, both measured in the same run.

    python bench/bench_gateway.py [--tokens 200] [--streams 1 64 256] [--json F] [--plot F.png]

Each server runs in its own process (one uvicorn worker); the client is a minimal asyncio
HTTP/1.1 reader in this process that counts SSE events, so client cost stays low and equal for
both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: a content delta with at least one character (the gateway's role chunk has empty content)
FIRST_CONTENT = re.compile(rb'"content": ?"[^"]')


@dataclass
class Result:
    server: str
    streams: int
    chunks_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_bytes(port: int, max_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "go"}],
            "stream": True,
            "max_tokens": max_tokens,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def one_stream(port: int, payload: bytes) -> tuple[int, float]:
    """Returns (SSE data events received, seconds to the first content event)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(payload)
    events = 0
    ttft = 0.0
    buf = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        if not ttft and FIRST_CONTENT.search(data):
            ttft = time.perf_counter() - start
        buf = buf[-16:] + data
        events += data.count(b"\ndata: ") + data.startswith(b"data: ")
        if b"data: [DONE]" in buf:
            break
    writer.close()
    return events, ttft or (time.perf_counter() - start)


async def run_level(
    port: int, streams: int, tokens: int, rounds: int = 1
) -> tuple[float, list[float]]:
    """``rounds`` waves of ``streams`` concurrent streams: (events/s, every stream's TTFT)."""
    payload = request_bytes(port, tokens)
    events, elapsed, ttfts = 0, 0.0, []
    for _ in range(rounds):
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(port, payload) for _ in range(streams)))
        elapsed += time.perf_counter() - started
        events += sum(r[0] for r in results)
        ttfts += [r[1] for r in results]
    return events / elapsed, ttfts


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def start_gateway(port: int, tokens: int, tmp: Path) -> subprocess.Popen[bytes]:
    config = tmp / "bench.toml"
    reply = " ".join(["word"] * tokens)
    config.write_text(
        f'[server]\nlog_level = "warning"\n\n[models.m]\nbackend = "scripted"\n'
        f'reply = "{reply}"\ncontext_length = {tokens * 4 + 64}\nengine_slots = 1024\n'
        "[models.m.batching]\nmax_concurrent = 1024\nmax_queue = 1024\n"
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT)


def start_bare(port: int, tokens: int) -> subprocess.Popen[bytes]:
    # the gateway sends a role chunk, `tokens` content chunks and a finish chunk
    cmd = [sys.executable, "-m", "bench.bare_sse", str(port), str(tokens + 2)]
    return subprocess.Popen(cmd, cwd=ROOT)


def measure(
    name: str, proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace
) -> list[Result]:
    try:
        wait_port(port, proc)
        asyncio.run(run_level(port, 4, args.tokens))  # warm-up
        out = []
        for streams in args.streams:
            rounds = max(1, 32 // streams)
            rate, ttfts = asyncio.run(run_level(port, streams, args.tokens, rounds))
            q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else [ttfts[0]] * 19
            out.append(Result(name, streams, rate, statistics.median(ttfts) * 1e3, q[18] * 1e3))
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def report(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Gateway overhead: scripted backend (no delay) vs bare sse-starlette")
    for col in (
        "streams",
        "gateway chunks/s",
        "bare chunks/s",
        "ratio",
        "gateway TTFT p50 ms",
        "bare TTFT p50 ms",
        "added TTFT p50 ms",
        "gateway TTFT p95 ms",
    ):
        table.add_column(col, justify="right")
    by = {(r.server, r.streams): r for r in results}
    for streams in sorted({r.streams for r in results}):
        g, b = by[("gateway", streams)], by[("bare", streams)]
        table.add_row(
            str(streams),
            f"{g.chunks_per_s:,.0f}",
            f"{b.chunks_per_s:,.0f}",
            f"{g.chunks_per_s / b.chunks_per_s:.2f}",
            f"{g.ttft_p50_ms:.2f}",
            f"{b.ttft_p50_ms:.2f}",
            f"{g.ttft_p50_ms - b.ttft_p50_ms:+.2f}",
            f"{g.ttft_p95_ms:.2f}",
        )
    Console().print(table)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("gateway", "bare"):
        rs = [r for r in results if r.server == name]
        a1.plot([r.streams for r in rs], [r.chunks_per_s for r in rs], marker="o", label=name)
        a2.plot([r.streams for r in rs], [r.ttft_p50_ms for r in rs], marker="o", label=name)
    a1.set(xscale="log", xlabel="concurrent streams", ylabel="chunks/s")
    a2.set(xscale="log", xlabel="concurrent streams", ylabel="TTFT p50 (ms)")
    a1.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200, help="chunks per stream")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="save a PNG plot here (needs matplotlib)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        port = free_port()
        results += measure("gateway", start_gateway(port, args.tokens, Path(tmp)), port, args)
        port = free_port()
        results += measure("bare", start_bare(port, args.tokens), port, args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
