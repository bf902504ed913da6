"""Ray Serve: the gateway's prefix-aware request router against Ray Serve's default router
(power of two choices), on a multi-turn workload, in one run on one local Ray cluster.

    python bench/bench_ray_routing.py [--replicas 2] [--conversations 8] [--turns 6]
        [--concurrency 8] [--routers prefix power_of_two] [--json F] [--plot F.png]

Each router gets its own application (fresh replicas, empty caches) of ``--replicas``
model-server replicas running SmolLM2 on the llama.cpp backend (1 thread each, 4 sequences and
``--cached-prefixes`` finished prefixes kept: a replica's cache holds about 6 conversations,
fewer than the workload's 8, as a real cache holds fewer than its traffic), behind the same
Serve proxy. Conversations run ``--concurrency`` at a time, each turn after the previous
answer, each opening with its own long document (the workload of bench_affinity.py). Per
turn: time to first token at the client and the prompt tokens the replica took from its KV
cache (``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.bench_affinity import Turn, free_port, workload


def config(tmp: Path, router: str, args: argparse.Namespace) -> Any:
    from gateway.config import parse_config
    from gateway.defaults import default_model_path

    model = {
        "backend": "llamacpp",
        "model_path": args.model_path or str(default_model_path()),
        "batching": {"n_threads": 1, "max_concurrent": 4, "prefill_chunk_tokens": 256},
        "kv_cache": {"n_ctx_per_slot": 2048, "cached_prefixes": args.cached_prefixes},
    }
    raw = {
        "models": {"fleet": model},
        "responses": {"path": str(tmp / f"{router}.sqlite3")},
        "ray": {
            "num_replicas": args.replicas, "num_cpus": 0.5, "router": router,
            "app_name": router, "max_ongoing_requests": 16,
        },
    }  # fmt: skip
    return parse_config(raw, f"<bench {router}>")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(turns: list[Turn], routers: list[str]) -> str:
    head = (
        f"{'router':<14}{'turns':>6}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}"
        f"{'prompt tok':>12}{'cached tok':>12}{'cached %':>10}{'cached % t2+':>14}"
        f"{'replicas/conv':>15}"
    )
    lines = [head, "-" * len(head)]
    for router in routers:
        rows = [t for t in turns if t.policy == router]
        later = [t for t in rows if t.turn > 1]
        ttft = [t.ttft_s * 1000 for t in rows]
        prompt, cached = sum(t.prompt_tokens for t in rows), sum(t.cached_tokens for t in rows)
        p2, c2 = sum(t.prompt_tokens for t in later), sum(t.cached_tokens for t in later)
        lines.append(
            f"{router:<14}{len(rows):>6}{statistics.median(ttft):>13.0f}"
            f"{percentile(ttft, 0.95):>13.0f}{prompt:>12}{cached:>12}"
            f"{100 * cached / max(prompt, 1):>10.0f}{100 * c2 / max(p2, 1):>14.0f}"
            f"{spread(rows):>15.2f}"
        )
    return "\n".join(lines)


def spread(rows: list[Turn]) -> float:
    """Replicas a conversation's turns visited, on average."""
    conversations = {t.conversation for t in rows}
    visits = [len({t.replica for t in rows if t.conversation == c}) for c in conversations]
    return statistics.fmean(visits)


def plot(turns: list[Turn], routers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for router in routers:
        rows = [t for t in turns if t.policy == router]
        by_turn = sorted({t.turn for t in rows})
        ttft = [statistics.median(t.ttft_s * 1000 for t in rows if t.turn == n) for n in by_turn]
        share = [
            100
            * sum(t.cached_tokens for t in rows if t.turn == n)
            / max(1, sum(t.prompt_tokens for t in rows if t.turn == n))
            for n in by_turn
        ]
        left.plot(by_turn, ttft, marker="o", label=router)
        right.plot(by_turn, share, marker="o", label=router)
    left.set(xlabel="turn", ylabel="TTFT p50 (ms)", title="time to first token")
    right.set(xlabel="turn", ylabel="prompt tokens cached (%)", title="KV cache hits")
    left.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--doc-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cached-prefixes", type=int, default=2)
    parser.add_argument("--routers", nargs="+", default=["prefix", "power_of_two"])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    import ray
    from ray import serve

    from gateway.ray_serve.deployments import application

    port = free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    turns: list[Turn] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            for router in args.routers:
                started = time.perf_counter()
                app = application(config(Path(tmp), router, args))
                serve.run(app, name=router, route_prefix=f"/{router}", blocking=False)
                url = f"http://127.0.0.1:{port}/{router}"
                turns += asyncio.run(workload(url, router, args))
                serve.delete(router)
                print(f"{router}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        f"\nRay Serve, {args.replicas} model-server replicas (llama.cpp, SmolLM2 Q4_1, 1 thread "
        f"each, 4 sequences + {args.cached_prefixes} cached prefixes), {args.conversations} "
        f"conversations x {args.turns} turns, {args.concurrency} at a time, ~{args.doc_words}-word "
        f"opening document, max_tokens {args.max_tokens}\n"
    )
    print(summary(turns, args.routers))
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in turns], indent=1))
    if args.plot:
        plot(turns, args.routers, args.plot)


if __name__ == "__main__":
    main()
