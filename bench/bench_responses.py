"""Stored conversations: turn-by-turn TTFT of a 10-turn conversation through
``/v1/responses`` with ``previous_response_id``, against re-sending the whole history on
``/v1/chat/completions``, and turn 10 after a cold restart of the gateway.

    python bench/bench_responses.py [--gguf PATH] [--turns 10] [--users 3] [--max-tokens 32]
        [--json out.json] [--plot out.png]

One gateway (the llama.cpp backend, SmolLM2 by default) with its response store in a
temporary folder. Each user has a long system prompt and asks ``--turns`` questions, streamed
at temperature 0; the chat run asks the same questions under its own user label and re-sends
its own answers, as a chat client does (the two runs share only the system prompt). Then
the gateway is restarted on the same store and each user's last turn is
asked again through ``previous_response_id`` of turn ``--turns - 1``: the store survives the
restart, the KV cache does not, so that turn prefills its whole history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import Server, default_gguf, gateway_server, running

SYSTEM = (
    "You are a patient tutor. You answer in two short sentences, plainly, without lists. "
    "You never repeat the question. You keep to the facts a curious student can check. "
) * 6
QUESTIONS = [
    "What is a star?", "Why does it shine?", "How long does it live?", "What is left after?",
    "What is a planet?", "Why do planets orbit?", "What is a moon?", "Why are there tides?",
    "What is a comet?", "Where do comets come from?", "What is a galaxy?", "How big is it?",
]  # fmt: skip


def with_store(server: Server, store: Path) -> Server:
    env = {**server.env, "XDG_STATE_HOME": str(store)}
    return Server(server.name, server.model, server.command, server.base_url, env)


async def ttft_of(stream: Any, started: float) -> tuple[float, str]:
    """Seconds from ``started`` (before the request was sent: the headers come with the first
    token) to the first text, and the text."""
    first, parts = float("nan"), []
    async for event in stream:
        piece = _piece(event)
        if piece:
            if not parts:
                first = time.perf_counter() - started
            parts.append(piece)
    return first, "".join(parts)


def _piece(event: Any) -> str:
    if getattr(event, "type", None) == "response.output_text.delta":
        return str(event.delta)
    choices = getattr(event, "choices", None)
    if choices:
        return str(choices[0].delta.content or "")
    return ""


async def ask(
    client: AsyncOpenAI,
    model: str,
    user: int,
    turn: int,
    previous: str | None,
    args: argparse.Namespace,
) -> tuple[float, str]:
    """One turn through ``/v1/responses``, streamed: its TTFT and its response id."""
    question = f"(user {user}) {QUESTIONS[turn % len(QUESTIONS)]}"
    started = time.perf_counter()
    stream = await client.responses.create(
        model=model, input=question, instructions=SYSTEM, previous_response_id=previous,
        max_output_tokens=args.max_tokens, temperature=0, stream=True,
    )  # fmt: skip
    first, rid = float("nan"), ""
    async for event in stream:
        if event.type == "response.created":
            rid = event.response.id
        elif event.type == "response.output_text.delta" and math.isnan(first):
            first = time.perf_counter() - started
    return first, rid


async def responses_turns(
    client: AsyncOpenAI, model: str, user: int, args: argparse.Namespace
) -> tuple[list[float], list[str]]:
    ttfts, ids = [], []
    previous: str | None = None
    for turn in range(args.turns):
        first, previous = await ask(client, model, user, turn, previous, args)
        ttfts.append(first)
        ids.append(previous)
    return ttfts, ids


async def chat_turns(
    client: AsyncOpenAI, model: str, user: int, args: argparse.Namespace
) -> list[float]:
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for turn in range(args.turns):
        # its own label: only the system prompt is shared with the responses run's prompts
        question = f"(chat user {user}) {QUESTIONS[turn % len(QUESTIONS)]}"
        messages.append({"role": "user", "content": question})
        started = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        first, answer = await ttft_of(stream, started)
        ttfts.append(first)
        messages.append({"role": "assistant", "content": answer})  # its own, as a chat client
    return ttfts


def client_for(server: Server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=600)


async def warm(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"responses": [], "chat": [], "ids": []}
    async with client_for(server) as client:
        # the system prompt once, so that no run's first turn pays its first prefill
        warmup = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
        await client.chat.completions.create(model=server.model, messages=warmup, max_tokens=1)  # type: ignore[arg-type]
        for user in range(args.users):
            ttfts, ids = await responses_turns(client, server.model, user, args)
            out["responses"].append(ttfts)
            out["ids"].append(ids)
            out["chat"].append(await chat_turns(client, server.model, user, args))
    return out


async def cold(server: Server, ids: list[list[str]], args: argparse.Namespace) -> list[float]:
    async with client_for(server) as client:
        last = args.turns - 1  # asked again after turn 9's response, as it was before
        ttfts = [
            await ask(client, server.model, u, last, ids[u][-2], args) for u in range(args.users)
        ]
        return [first for first, _ in ttfts]


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    console = Console(width=160)
    table = Table(title=f"TTFT per turn (s), mean of {args.users} users, {args.gguf.name}")
    table.add_column("turn", justify="right")
    for name in ("responses (previous_response_id)", "chat (whole history)", "ratio"):
        table.add_column(name, justify="right")
    for t in range(args.turns):
        r = statistics.mean(u[t] for u in result["responses"])
        c = statistics.mean(u[t] for u in result["chat"])
        table.add_row(str(t + 1), f"{r:.3f}", f"{c:.3f}", f"{r / c:.2f}x")
    console.print(table)
    warm10 = statistics.mean(u[-1] for u in result["responses"])
    cold10 = statistics.mean(result["cold"])
    console.print(
        f"turn {args.turns} after a restart (store kept, KV cache gone): {cold10:.3f} s, "
        f"{cold10 / warm10:.2f}x the warm turn {args.turns} ({warm10:.3f} s)"
    )


def plot(result: dict[str, Any], path: str, turns: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, turns + 1))
    for key, label in (
        ("responses", "responses + previous_response_id"),
        ("chat", "chat, whole history"),
    ):
        ax.plot(
            xs,
            [statistics.mean(u[t] for u in result[key]) for t in range(turns)],
            marker="o",
            label=label,
        )
    ax.axhline(
        statistics.mean(result["cold"]), linestyle="--", label=f"turn {turns} after a restart"
    )
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--json", default="bench_responses.json")
    p.add_argument("--plot", default="bench_responses.png")
    args = p.parse_args(argv)
    args.gguf = args.gguf or default_gguf()
    args.concurrency = [2]
    args.backend_config = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-responses-") as tmp:
        workdir = Path(tmp)
        server = with_store(gateway_server(args, workdir), workdir / "state")
        with running(server, workdir / "gateway.log"):
            result = asyncio.run(warm(server, args))
        with running(server, workdir / "gateway-restarted.log"):
            result["cold"] = asyncio.run(cold(server, result["ids"], args))
    report(result, args)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(result, args.plot, args.turns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
