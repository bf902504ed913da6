"""Constrained answers within ``max_tokens``: budget steering on vs off, on the same model.

    python bench/bench_budget.py [--gguf PATH] [--runs 100] [--plain-runs N] [--concurrency 8]
        [--temperatures 0 1.0] [--cases person tool object] [--json out.json] [--plot out.png]

One ``gateway serve`` holds the model file twice: ``steered`` (``budget_steering = true``, the
default) and ``plain`` (``budget_steering = false``: the grammar keeps the text a valid
prefix and nothing more, as every peer's does). The client is the official ``openai`` SDK.
The cases are the shapes agent clients send:

- ``person``: ``json_schema``, a nested Person (6 fields: a string, an integer, an enum, an
  array of strings, a sub-object, an e-mail string), at ``max_tokens`` 120 / 200 / 400;
- ``tool``: a forced (named) tool whose arguments nest objects and arrays, at 100 / 300;
- ``object``: ``json_object``, at 60 / 300.

Each request asks about a different subject (so runs differ at temperature 0 too), and the two
models take turns request by request. Reported per case, budget, temperature and model:
answers that parse and validate against the schema, ``length`` finishes, the mean length of
the string values written (what steering costs the answer) and completion tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import Server, _env, _free_port, _toml, default_gguf, running

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["engineer", "teacher", "doctor", "artist", "other"]},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "country": {"type": "string"},
            },
            "required": ["street", "city", "country"],
        },
        "email": {"type": "string"},
    },
    "required": ["name", "age", "role", "hobbies", "address", "email"],
}
ORDER = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
            "required": ["name", "email"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "product": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "options": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["product", "quantity", "options"],
            },
        },
        "shipping": {
            "type": "object",
            "properties": {"address": {"type": "string"}, "express": {"type": "boolean"}},
            "required": ["address", "express"],
        },
    },
    "required": ["customer", "items", "shipping"],
}
SUBJECTS = [
    "a retired sailor from Lisbon", "a young violinist in Vienna", "a baker in Lyon",
    "a nurse in Toronto", "a chess teacher in Kyiv", "a potter in Kyoto",
    "a software engineer in Nairobi", "a beekeeper in Oregon", "a librarian in Dublin",
    "a surfer in Sydney", "a carpenter in Oslo", "a doctor in Lima",
]  # fmt: skip
BUDGETS = {"person": [120, 200, 400], "tool": [100, 300], "object": [60, 300]}


@dataclass
class Tally:
    case: str
    budget: int
    temperature: float
    model: str
    runs: int = 0
    valid: int = 0
    length: int = 0
    string_chars: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: int = 0

    def row(self) -> dict[str, Any]:
        chars = self.string_chars
        return {
            "case": self.case, "budget": self.budget, "temperature": self.temperature,
            "model": self.model, "runs": self.runs,
            "valid_pct": 100.0 * self.valid / max(1, self.runs),
            "length_pct": 100.0 * self.length / max(1, self.runs),
            "mean_string_chars": sum(chars) / len(chars) if chars else 0.0,
            "mean_tokens": sum(self.tokens) / len(self.tokens) if self.tokens else 0.0,
            "errors": self.errors,
        }  # fmt: skip


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def request(case: str, subject: str, budget: int, temperature: float) -> dict[str, Any]:
    base: dict[str, Any] = {"max_tokens": budget, "temperature": temperature}
    if case == "person":
        content = f"Describe {subject} as a person record."
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        return {**base, "messages": [{"role": "user", "content": content}], "response_format": fmt}
    if case == "object":
        content = f"Describe {subject} as a JSON object with as many details as you know."
        return {**base, "messages": [{"role": "user", "content": content}],
                "response_format": {"type": "json_object"}}  # fmt: skip
    tool = {"type": "function", "function": {"name": "place_order", "parameters": ORDER,
            "description": "Place an order for a customer."}}  # fmt: skip
    content = f"Place an order of three gifts, with options, for {subject}."
    return {**base, "messages": [{"role": "user", "content": content}], "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "place_order"}}}  # fmt: skip


def check(case: str, choice: Any) -> tuple[bool, Any]:
    """The answer parses and validates (its parsed value, for the string lengths)."""
    try:
        if case == "tool":
            calls = choice.message.tool_calls or []
            value = json.loads(calls[0].function.arguments) if calls else None
            schema: dict[str, Any] = ORDER
        else:
            value = json.loads(choice.message.content or "")
            schema = PERSON if case == "person" else {"type": "object"}
        jsonschema.validate(value, schema)
        return True, value
    except (ValueError, IndexError, jsonschema.ValidationError):
        return False, None


async def one(client: AsyncOpenAI, model: str, body: dict[str, Any], case: str, t: Tally) -> None:
    t.runs += 1
    try:
        reply = await client.chat.completions.create(model=model, **body)
    except Exception:  # a failed request counts, the run goes on
        t.errors += 1
        return
    choice = reply.choices[0]
    t.length += choice.finish_reason == "length"
    ok, value = check(case, choice)
    if ok:
        t.valid += 1
        t.string_chars += [len(s) for s in strings_in(value)]
    if reply.usage is not None:
        t.tokens.append(reply.usage.completion_tokens)


async def bench(base_url: str, args: argparse.Namespace) -> list[Tally]:
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    tallies: dict[tuple[str, int, float, str], Tally] = {}
    jobs: list[tuple[str, dict[str, Any], str, Tally]] = []
    for case in args.cases:
        for budget in BUDGETS[case]:
            for temp in args.temperatures:
                for i in range(args.runs):
                    body = request(case, SUBJECTS[i % len(SUBJECTS)] + f" (#{i})", budget, temp)
                    models = ("steered", "plain") if i < args.plain_runs else ("steered",)
                    for model in models:
                        key = (case, budget, temp, model)
                        tally = tallies.setdefault(key, Tally(case, budget, temp, model))
                        jobs.append((model, body, case, tally))
    gate = asyncio.Semaphore(args.concurrency)

    async def run(job: tuple[str, dict[str, Any], str, Tally]) -> None:
        async with gate:
            await one(client, job[0], job[1], job[2], job[3])

    await asyncio.gather(*(run(j) for j in jobs))
    return list(tallies.values())


def report(tallies: list[Tally]) -> None:
    table = Table(title="Constrained answers within max_tokens: steered vs plain (same model)")
    columns = ("case", "max_tokens", "temp", "model", "valid %", "length %", "str chars", "tokens")
    for col in columns:
        table.add_column(col, justify="right")
    for t in tallies:
        r = t.row()
        table.add_row(
            t.case, str(t.budget), f"{t.temperature:g}", t.model, f"{r['valid_pct']:.0f}",
            f"{r['length_pct']:.0f}", f"{r['mean_string_chars']:.1f}", f"{r['mean_tokens']:.0f}",
        )  # fmt: skip
    Console().print(table)


def plot(tallies: list[Tally], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(t.case, t.budget, t.temperature) for t in tallies})
    fig, ax = plt.subplots(figsize=(max(6, len(labels)), 4))
    width = 0.4
    for k, model in enumerate(("plain", "steered")):
        values = [next((t.row()["valid_pct"] for t in tallies
                        if (t.case, t.budget, t.temperature, t.model) == (*lab, model)), 0.0)
                  for lab in labels]  # fmt: skip
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=model)
    ax.set_xticks([i + width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{c}\n{b} t={t:g}" for c, b, t in labels], fontsize=7)
    ax.set_ylabel("answers valid (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def gateway(args: argparse.Namespace, workdir: Path) -> Server:
    port = _free_port()
    common = {
        "backend": "llamacpp",
        "model_path": str(args.gguf),
        "batching": {
            "max_concurrent": args.concurrency,
            "max_queue": 100_000,
            "queue_timeout_s": 3600.0,
            "n_threads": args.threads,
        },
        "kv_cache": {"n_ctx_per_slot": 1024},
    }
    models = {"steered": dict(common), "plain": {**common, "budget_steering": False}}
    path = workdir / "gateway.toml"
    path.write_text(_toml({"models": models}))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return Server("gateway", "steered", command, f"http://127.0.0.1:{port}/v1", _env())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: SmolLM2)")
    p.add_argument("--runs", type=int, default=100, help="requests per case, budget and temp")
    p.add_argument("--plain-runs", type=int, default=None, help="runs of the plain model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--cases", nargs="+", choices=sorted(BUDGETS), default=list(BUDGETS))
    p.add_argument("--json", default="bench_budget.json")
    p.add_argument("--plot", default="")
    args = p.parse_args(argv)
    args.gguf = args.gguf or default_gguf()
    args.plain_runs = args.runs if args.plain_runs is None else min(args.plain_runs, args.runs)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = gateway(args, Path(tmp))
        with running(server, Path(tmp) / "gateway.log"):
            tallies = asyncio.run(bench(server.base_url, args))
    report(tallies)
    Path(args.json).write_text(json.dumps([asdict(t) | t.row() for t in tallies], indent=1))
    if args.plot:
        plot(tallies, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
