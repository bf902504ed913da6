"""Embeddings throughput on the llama.cpp backend: 64 short inputs in one request vs the same
64 inputs as 64 concurrent requests of one, on the same server in the same run.

    python bench/bench_embeddings.py [--gguf PATH] [--inputs 64] [--rounds 3] [--json F]

Prints a table (embeddings/s, best of ``--rounds``) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from gateway.config import parse_config
from gateway.defaults import default_model_path
from gateway.testing import ServerThread


@dataclass
class Row:
    mode: str
    inputs: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.inputs / self.seconds


def texts(n: int) -> list[str]:
    return [f"Short sentence number {i} about llamas and gateways." for i in range(n)]


async def one_request(url: str, inputs: list[str]) -> float:
    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        r = await client.post(url, json={"model": "m", "input": inputs})
        r.raise_for_status()
        assert len(r.json()["data"]) == len(inputs)
        return time.perf_counter() - started


async def many_requests(url: str, inputs: list[str]) -> float:
    limits = httpx.Limits(max_connections=len(inputs))
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        rs = await asyncio.gather(
            *(client.post(url, json={"model": "m", "input": t}) for t in inputs)
        )
        for r in rs:
            r.raise_for_status()
        return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    table = {
        "backend": "llamacpp",
        "model_path": str(args.gguf or default_model_path()),
        "batching": {"n_threads": args.threads, "max_concurrent": 4, "max_queue": 256},
        "kv_cache": {"n_ctx_per_slot": 512},
    }
    config = parse_config({"models": {"m": table}}, "<bench>")
    inputs = texts(args.inputs)
    rows: list[Row] = []
    with ServerThread(config) as server:
        url = server.base_url + "/v1/embeddings"
        asyncio.run(one_request(url, inputs[:4]))  # warm-up
        for mode, run in (
            ("1 request x 64 inputs", one_request),
            ("64 requests x 1", many_requests),
        ):
            best = min(asyncio.run(run(url, inputs)) for _ in range(args.rounds))
            rows.append(Row(mode.replace("64", str(args.inputs)), args.inputs, best))
    print(f"| mode | inputs | seconds (best of {args.rounds}) | embeddings/s |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row.mode} | {row.inputs} | {row.seconds:.3f} | {row.per_s:.1f} |")
    print(f"ratio (batched / separate): {rows[0].per_s / rows[1].per_s:.2f}x")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "per_s": r.per_s} for r in rows], indent=2))


if __name__ == "__main__":
    main()
