"""KV tiers: does a long conversation survive an unload and a restart without a full prefill?

    python bench/bench_kv_tiers.py [--gguf PATH] [--users 4] [--turns 10] [--system-tokens 2000]
        [--json out.json] [--plot out.png]

Each user has a ~``--system-tokens`` system prompt of their own and asks ``--turns`` questions
on ``/v1/chat/completions`` (streamed, temperature 0, the history re-sent as a chat client
does). Then turn ``--turns + 1`` is asked three ways, each on the same history:

- after ``POST /admin/models/<m>/unload`` (the KV cells are gone, the host tier is not; this
  probe asks another question, so the next two still prefill their own);
- after the gateway is stopped with SIGTERM and started again on the same disk folder;
- on a gateway with the tiers off, started fresh (the full prefill a restart costs today).

It prints each turn's TTFT (mean of the users), the ratios the issue asks for (turn 11 after a
restart vs turn 10 before it, and vs the tiers off) and the restore time per 1,000 tokens from
host memory and from disk (``/admin/models``: the tiers' restore and prefetch time over
restored tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import Server, _env, _free_port, _toml, default_gguf, running

QUESTIONS = [
    "What is a star?", "Why does it shine?", "How long does it live?", "What is left after?",
    "What is a planet?", "Why do planets orbit?", "What is a moon?", "Why are there tides?",
    "What is a comet?", "Where do comets come from?", "What is a galaxy?", "How big is it?",
]  # fmt: skip
Messages = list[dict[str, str]]


def system_prompt(user: int, tokens: int) -> str:
    """About ``tokens`` tokens of rules, different for each user (no shared prefix)."""
    rules = [
        f"Rule {user}.{i}: answer plainly about topic {i} for reader {user}."
        for i in range(tokens // 16)
    ]
    return f"You are tutor number {user}. " + " ".join(rules)


def gateway(args: argparse.Namespace, workdir: Path, *, tiers: bool) -> Server:
    port = _free_port()
    kv: dict[str, Any] = {"n_ctx_per_slot": args.n_ctx}
    if tiers:
        kv |= {
            "host_cache_bytes": 2 << 30, "disk_cache_bytes": 4 << 30,
            "disk_cache_dir": str(workdir / "kv"),
        }  # fmt: skip
    else:
        kv |= {"host_cache_bytes": 0, "disk_cache_bytes": 0}
    model = {
        "backend": "llamacpp", "model_path": str(args.gguf), "n_gpu_layers": args.n_gpu_layers,
        "batching": {
            "max_concurrent": args.users, "n_threads": args.threads,
            "n_threads_batch": args.threads,
        },
        "kv_cache": kv,
    }  # fmt: skip
    path = workdir / f"gateway-{'tiers' if tiers else 'plain'}.toml"
    path.write_text(_toml({"models": {"bench": model}}))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return Server("gateway", "bench", command, f"http://127.0.0.1:{port}/v1", _env())


async def turn(
    client: AsyncOpenAI, history: Messages, args: argparse.Namespace
) -> tuple[float, str]:
    """One streamed turn on ``history``: its TTFT and its answer."""
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench",
        messages=history,
        stream=True,
        temperature=0,
        max_tokens=args.max_tokens,  # type: ignore[arg-type]
    )
    first, parts = 0.0, []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
    return first or time.perf_counter() - started, "".join(parts)


def client_for(server: Server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=900)


async def conversations(
    server: Server, args: argparse.Namespace
) -> tuple[list[list[float]], list[Messages]]:
    """Every user's ``--turns`` turns (users in turn, one request at a time)."""
    histories: list[Messages] = [
        [{"role": "system", "content": system_prompt(u, args.system_tokens)}]
        for u in range(args.users)
    ]
    ttfts: list[list[float]] = [[] for _ in range(args.users)]
    async with client_for(server) as client:
        for t in range(args.turns):
            for u, history in enumerate(histories):
                history.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
                first, answer = await turn(client, history, args)
                history.append({"role": "assistant", "content": answer})
                ttfts[u].append(first)
    return ttfts, histories


async def next_turn(
    server: Server, histories: list[Messages], args: argparse.Namespace, offset: int = 0
) -> list[float]:
    """Turn ``--turns + 1`` of every user (the histories are left as they were); with
    ``offset``, another question than the real turn's, so that the probe leaves the real
    turn's question uncached."""
    question = {"role": "user", "content": QUESTIONS[(args.turns + offset) % len(QUESTIONS)]}
    async with client_for(server) as client:
        return [(await turn(client, [*h, question], args))[0] for h in histories]


def tiers_of(server: Server) -> dict[str, Any]:
    admin = server.base_url.removesuffix("/v1") + "/admin/models"
    tiers: dict[str, Any] = httpx.get(admin, timeout=30).json()["data"][0]["kv_tiers"] or {}
    return tiers


def per_1000(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Restore time per 1,000 restored tokens: the engine thread's copy into the cells plus
    the worker thread's read of disk entries into memory ahead of it."""
    tokens = after.get("restored_tokens", 0) - before.get("restored_tokens", 0)
    seconds = sum(after.get(k, 0.0) - before.get(k, 0.0) for k in ("restore_s", "prefetch_s"))
    return 1000 * seconds / tokens if tokens else float("nan")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tiered = gateway(args, workdir, tiers=True)
    out: dict[str, Any] = {}
    with running(tiered, workdir / "gateway-1.log", timeout_s=300):
        out["turns"], histories = asyncio.run(conversations(tiered, args))
        base = tiers_of(tiered)
        unload = tiered.base_url.removesuffix("/v1") + "/admin/models/bench/unload"
        httpx.post(unload, timeout=120).raise_for_status()
        out["after_unload"] = asyncio.run(next_turn(tiered, histories, args, offset=1))
        out["host_restore_s_per_1000"] = per_1000(base, after := tiers_of(tiered))
        out["tiers_after_unload"] = after
    with running(tiered, workdir / "gateway-2.log", timeout_s=300):  # SIGTERM, then again
        base = tiers_of(tiered)
        out["after_restart"] = asyncio.run(next_turn(tiered, histories, args))
        out["disk_restore_s_per_1000"] = per_1000(base, after := tiers_of(tiered))
        out["tiers_after_restart"] = after
    plain = gateway(args, workdir, tiers=False)
    with running(plain, workdir / "gateway-3.log", timeout_s=300):
        out["tiers_off"] = asyncio.run(next_turn(plain, histories, args))
    out["prompt_chars"] = [sum(len(m["content"]) for m in h) for h in histories]
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    console = Console(width=160)
    table = Table(
        title=f"TTFT (s), mean of {args.users} users, {args.gguf.name}, "
        f"~{args.system_tokens}-token system prompts"
    )
    table.add_column("turn")
    table.add_column("TTFT s", justify="right")
    mean = statistics.mean
    for t in range(args.turns):
        table.add_row(str(t + 1), f"{mean(u[t] for u in out['turns']):.3f}")
    last = mean(u[-1] for u in out["turns"])
    n = args.turns + 1
    rows = (
        (f"{n} after an unload (host tier)", out["after_unload"]),
        (f"{n} after a restart (disk tier)", out["after_restart"]),
        (f"{n}, tiers off, fresh gateway", out["tiers_off"]),
    )
    for label, values in rows:
        table.add_row(label, f"{mean(values):.3f}")
    console.print(table)
    restart = mean(out["after_restart"])
    console.print(
        f"turn {n} after a restart: {restart / last:.2f}x turn {args.turns} before it "
        "(target <= 1.2x); "
        f"{restart / mean(out['tiers_off']):.2f}x the same turn with the tiers off"
    )
    console.print(
        f"restore per 1,000 tokens: host {out['host_restore_s_per_1000'] * 1000:.1f} ms, "
        f"disk {out['disk_restore_s_per_1000'] * 1000:.1f} ms"
    )


def plot(out: dict[str, Any], path: str, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    turns = list(range(1, args.turns + 1))
    ax.plot(
        turns,
        [statistics.mean(u[t] for u in out["turns"]) for t in range(args.turns)],
        marker="o",
        label="turns",
    )
    n = args.turns + 1
    for key, label, marker in (
        ("after_unload", "after an unload", "s"), ("after_restart", "after a restart", "^"),
        ("tiers_off", "tiers off", "x"),
    ):  # fmt: skip
        ax.plot(
            [n], [statistics.mean(out[key])], marker=marker, linestyle="", label=f"turn {n} {label}"
        )
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--json", default="bench_kv_tiers.json")
    p.add_argument("--plot", default="bench_kv_tiers.png")
    args = p.parse_args(argv)
    args.gguf = args.gguf or default_gguf()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-kv-tiers-") as tmp:
        out = run(args, Path(tmp))
    report(out, args)
    Path(args.json).write_text(json.dumps(out, indent=1))
    plot(out, args.plot, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
