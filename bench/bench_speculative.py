"""Speculative decoding (n-gram drafting): this gateway against llama-server, on and off.

    python bench/bench_speculative.py [--gguf PATH] [--llama-server BIN] [--wait-peer S]
        [--streams 1,8] [--rounds 1] [--max-tokens 1600] [--chat-tokens 256]
        [--edit-tokens 1500] [--threads N] [--n-ctx 4096] [--json out.json] [--plot out.png]
        [--quick]

Four configurations, all up at once and taking turns, on the same model file (SmolLM2 by
default) with the same threads and slots (``--parallel`` = the most ``--streams``):

- ``gateway ngram``: ``gateway serve``, model ``spec`` (``[models.spec.speculative]
  mode = "ngram"``, the other keys at their defaults);
- ``gateway off``: the same gateway process, model ``off`` (same file, ``mode = "off"``);
- ``llama-server ngram-mod``: llama.cpp's own C++ server (``scripts/build_llama_server.sh``)
  with ``--spec-type ngram-mod`` and the documented defaults of its n-gram sizes;
- ``llama-server off``: the same binary without speculation.

Two tasks, at temperature 0:

- ``edit``: rewrite a source file with one rename (the stdlib ``colorsys`` module, cut at a
  top-level block to about ``--edit-tokens`` tokens, ``--max-tokens`` 1,600); each stream
  asks for a different rename, in the system prompt and after the file, so no two prompts
  share a prefix (no server gets prefill for free) and every stream has its own answer; the
  answer copies the prompt, which is what n-gram drafting is for (a 135M model copies some of
  it and makes up the rest);
- ``chat``: an ordinary question, a different one per stream (8 of them), ``--chat-tokens``
  256.

For each stream count, ``--rounds`` times: each task runs once on each configuration, one
load at a time (``streams`` concurrent requests, one per stream), in an order that rotates
every round so the machine's drift falls on all alike. Reported per task, stream count and
configuration: generated tokens/s over all streams (``usage.completion_tokens`` / wall time,
prefill included), the decode rate (each stream's tokens after its first over the time from
its first token to its last, summed over the streams), TTFT p50, the prompt tokens as each
server counted them (``usage.prompt_tokens``), draft tokens and the share accepted (the
gateway's engine stats, read from its ``/metrics`` before and after each load;
llama-server's ``timings.draft_n`` / ``draft_n_accepted`` of each answer), and whether the
text of ``gateway ngram`` is identical to ``gateway off``'s for the same request (it must
be: verification goes through the same sampler chain; the same check for llama-server is
shown for information; ``--json`` keeps both texts of each difference). Ratios: gateway ngram
/ gateway off and gateway ngram / llama-server ngram-mod, per task and stream count.
Both servers pool n-grams across requests, so later rounds may accept more than the first.
Prints rich tables and the same results as a markdown table (``--json``, ``--plot`` save
them). ``--quick``: a smoke run (short answers, one stream) of about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import colorsys
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import (
    Server,
    _env,
    _free_port,
    _quantile,
    _toml,
    default_gguf,
    int_list,
    running,
)

ROOT = Path(__file__).resolve().parent.parent
PEER_VERSION = "0.3.36"
PEER_BIN = ROOT / ".peers" / f"llama-server-{PEER_VERSION}-nollamafile" / "bin" / "llama-server"
#: llama-server's n-gram drafter, with the defaults ``llama-server --help`` and
#: docs/speculative.md give for it (lookup length 24, drafts of 48 to 64 tokens).
PEER_SPEC_ARGS = [
    "--spec-type", "ngram-mod",
    "--spec-ngram-mod-n-match", "24",
    "--spec-ngram-mod-n-min", "48",
    "--spec-ngram-mod-n-max", "64",
]  # fmt: skip

GW_SPEC, GW_OFF = "gateway ngram", "gateway off"
PEER_SPEC, PEER_OFF = "llama-server ngram-mod", "llama-server off"
CONFIGS = [GW_SPEC, GW_OFF, PEER_SPEC, PEER_OFF]
#: each speculative configuration and the one its text must equal
BASELINE = {GW_SPEC: GW_OFF, PEER_SPEC: PEER_OFF}
TASKS = ("edit", "chat")

EDIT_SYSTEM = (
    "You are a precise code editor. When asked to change a file, reply with the complete "
    "updated file in one ```python code block and nothing else."
)
#: (old, new) identifier pairs; those the trimmed file holds are used, one per stream
RENAMES = [
    ("maxc", "max_c"), ("minc", "min_c"), ("rangec", "range_c"), ("ONE_THIRD", "THIRD"),
    ("TWO_THIRD", "TWO_THIRDS"), ("ONE_SIXTH", "SIXTH"), ("_v", "_hue_value"),
    ("sumc", "sum_c"), ("m1", "low"), ("m2", "high"),
]  # fmt: skip
QUESTIONS = [
    "How does a refrigerator keep food cold?",
    "What were the main causes of the French Revolution?",
    "How do vaccines train the immune system?",
    "Give me three tips for writing clear e-mails, with an example of each.",
    "Why is the sky blue, and why are sunsets red?",
    "What is the difference between a virus and a bacterium?",
    "How does compound interest work? Show a small example.",
    "Describe how bread rises and what yeast does in the dough.",
]


# --- prompts ----------------------------------------------------------------------------------


def count_tokens(gguf: Path) -> Any:
    """A tokenizer of the model file (vocabulary only): text -> number of tokens."""
    import llama_cpp

    # llama.cpp warns on stderr about the context of a vocabulary-only load: not ours to show
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False))


@dataclass
class EditSource:
    text: str
    lines: int
    tokens: int
    full_tokens: int
    renames: list[tuple[str, str]]


def edit_source(gguf: Path, target: int) -> EditSource:
    """``colorsys``'s source cut after the top-level block that brings it nearest ``target``
    tokens (the module is ~1,850 tokens: it is trimmed, never padded)."""
    source = inspect.getsource(colorsys)
    tokens = count_tokens(gguf)
    lines = source.splitlines(keepends=True)
    body = next(i for i, line in enumerate(lines) if i and line.rstrip().endswith('"""')) + 1
    # cut before a top-level statement that follows a blank line, never between a comment
    # and what it describes
    cuts = [
        i
        for i in range(body + 1, len(lines))
        if lines[i][:1].strip() and not lines[i - 1].strip()
        and not next(x for x in reversed(lines[:i]) if x.strip()).startswith("#")
    ]  # fmt: skip
    cuts.append(len(lines))
    best = min(cuts, key=lambda c: abs(tokens("".join(lines[:c])) - target))
    text = "".join(lines[:best]).rstrip() + "\n"
    renames = [(a, b) for a, b in RENAMES if re.search(rf"\b{re.escape(a)}\b", text)]
    return EditSource(text, text.count("\n"), tokens(text), tokens(source), renames)


def messages(task: str, item: int, src: EditSource) -> list[ChatCompletionMessageParam]:
    if task == "chat":
        return [{"role": "user", "content": QUESTIONS[item % len(QUESTIONS)]}]
    old, new = src.renames[item % len(src.renames)]
    # the rename opens the prompt too, so no two streams share a prefix past a few tokens
    system = f"{EDIT_SYSTEM} Your task: rename `{old}` to `{new}`."
    ask = (
        f"```python\n{src.text}```\n\n"
        f"Rename `{old}` to `{new}` in this file and output the whole file."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": ask}]


# --- servers ----------------------------------------------------------------------------------


def peer_binary(args: argparse.Namespace) -> Path:
    """The llama-server binary: given, cached, waited for (a build under way), or built."""
    if args.llama_server is not None:
        return Path(args.llama_server)
    deadline = time.monotonic() + args.wait_peer
    if not PEER_BIN.exists() and args.wait_peer:
        print(f"waiting up to {args.wait_peer:.0f} s for {PEER_BIN} ...", flush=True)
    while not os.access(PEER_BIN, os.X_OK) and time.monotonic() < deadline:
        time.sleep(5)
    if not os.access(PEER_BIN, os.X_OK):
        print("building llama-server (scripts/build_llama_server.sh) ...", flush=True)
        out = subprocess.run(
            [str(ROOT / "scripts" / "build_llama_server.sh")],
            check=True,
            capture_output=True,
            text=True,
        )
        return ROOT / out.stdout.strip().splitlines()[-1]
    return PEER_BIN


def peer_version(binary: Path) -> str:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(r"version: .*", out.stdout + out.stderr)
    return found.group(0) if found else "?"


def gateway_server(args: argparse.Namespace, workdir: Path) -> Server:
    port = _free_port()
    slots = max(args.streams)
    common: dict[str, Any] = {
        "backend": "llamacpp",
        "model_path": str(args.gguf),
        "n_gpu_layers": args.n_gpu_layers,
        "batching": {
            "max_concurrent": slots,
            "max_queue": 1024,
            "queue_timeout_s": 3600.0,
            "n_threads": args.threads,
            "n_threads_batch": args.threads,
        },
        "kv_cache": {"n_ctx_per_slot": args.n_ctx},
    }
    config = {
        "server": {"log_level": "warning"},
        "models": {
            "spec": {**common, "speculative": {"mode": "ngram"}},
            "off": {**common, "speculative": {"mode": "off"}},
        },
        "plugins": {"metrics": {"path": "/metrics", "process_metrics": False}},
    }
    path = workdir / "gateway.toml"
    path.write_text(_toml(config))
    args.gateway_config = path.read_text()
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    return Server("gateway", "spec", command, f"http://127.0.0.1:{port}/v1", _env())


def gateway_summary(path: Path, args: argparse.Namespace) -> str:
    """The speculative settings the gateway resolves from its config (defaults filled in)."""
    common = (
        f"max_concurrent {max(args.streams)}, n_ctx_per_slot {args.n_ctx}, n_threads {args.threads}"
    )
    try:
        sys.path.insert(0, str(ROOT))
        from gateway.config import load_config

        models = load_config(path).models
        spec = {m: getattr(models[m], "speculative", None) for m in ("spec", "off")}
        shown = {
            m: s.model_dump(exclude_none=True) if s is not None else "-" for m, s in spec.items()
        }
        return f"spec {shown['spec']}, off {shown['off']}; both {common}"
    except Exception as err:  # the report goes on without it
        return f'spec: mode = "ngram", off: mode = "off" ({err}); both {common}'


def peer_server(args: argparse.Namespace, binary: Path, spec: bool) -> Server:
    port = _free_port()
    slots = max(args.streams)
    command = [
        str(binary), "--model", str(args.gguf), "--alias", "peer",
        "--parallel", str(slots), "--ctx-size", str(slots * args.n_ctx), "--cont-batching",
        "--threads", str(args.threads), "--threads-batch", str(args.threads),
        "--n-gpu-layers", str(args.n_gpu_layers), "--host", "127.0.0.1", "--port", str(port),
        *(args.peer_spec_args if spec else []),
    ]  # fmt: skip
    name = PEER_SPEC if spec else PEER_OFF
    return Server(name, "peer", command, f"http://127.0.0.1:{port}/v1", _env())


def wait_healthy(server: Server, timeout_s: float = 180) -> None:
    """llama-server answers /v1/models while it still loads; /health says 200 once it can serve."""
    url = server.base_url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} is not healthy after {timeout_s:.0f} s")


# --- client -----------------------------------------------------------------------------------


@dataclass
class Answer:
    ttft: float
    #: from the first token to the last
    decode_s: float
    completion_tokens: int
    prompt_tokens: int
    text: str
    #: llama-server's own draft counts for this answer (absent where it drafted nothing)
    drafted: int | None
    accepted: int | None


@dataclass
class Run:
    task: str
    config: str
    streams: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    #: each request's tokens after its first / time from its first token to its last
    decode_rates: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    drafted: int | None = None
    accepted: int | None = None
    #: against the baseline configuration (speculative rows only): identical texts / compared
    same: int = 0
    compared: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode rates of the streams summed (prefill left out), averaged over the rounds."""
        rates = self.decode_rates
        return sum(rates) * self.streams / len(rates) if rates else 0.0

    @property
    def acceptance(self) -> float | None:
        if not self.drafted or self.accepted is None:
            return None
        return self.accepted / self.drafted

    def ttft(self, q: float) -> float:
        return float(_quantile(self.ttft_s, q))

    def add_drafts(self, drafted: int | None, accepted: int | None) -> None:
        if drafted is not None:
            self.drafted = (self.drafted or 0) + drafted
            self.accepted = (self.accepted or 0) + (accepted or 0)


class Target:
    """One configuration: a server and the model name to ask it for."""

    def __init__(self, config: str, server: Server, model: str) -> None:
        self.config = config
        self.server = server
        self.model = model
        self.client = AsyncOpenAI(
            base_url=server.base_url, api_key="bench", max_retries=0, timeout=1800.0
        )
        self.root = server.base_url.removesuffix("/v1")

    async def one(self, msgs: list[ChatCompletionMessageParam], max_tokens: int) -> Answer:
        started = time.perf_counter()
        ttft, tokens, prompt = float("nan"), 0, 0
        pieces: list[str] = []
        drafted: int | None = None
        accepted: int | None = None
        stream = await self.client.chat.completions.create(
            model=self.model, messages=msgs,
            max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    if not pieces:
                        ttft = time.perf_counter() - started
                    pieces.append(choice.delta.content)
            if chunk.usage is not None:
                tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            timings = (chunk.model_extra or {}).get("timings")
            if isinstance(timings, dict):  # llama-server: draft_n only where it drafted
                drafted = int(timings.get("draft_n", 0))
                accepted = int(timings.get("draft_n_accepted", 0))
        decode_s = time.perf_counter() - started - ttft
        n = tokens or len(pieces)
        return Answer(ttft, decode_s, n, prompt, "".join(pieces), drafted, accepted)

    async def engine_drafts(self) -> tuple[int, int] | None:
        """The gateway's engine stats for this model, from /metrics: (drafted, accepted)."""
        if self.server.name != "gateway":
            return None
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                text = (await http.get(self.root + "/metrics")).text
        except httpx.HTTPError:
            return None
        return parse_drafts(text, self.model)

    async def aclose(self) -> None:
        await self.client.close()


_METRIC = re.compile(r"^(gateway_engine_\w*draft\w*)\{([^}]*)\}\s+(\S+)", re.M)


def parse_drafts(text: str, model: str) -> tuple[int, int] | None:
    """EngineStats.draft_tokens / draft_accepted as exported by the metrics plugin (a gauge
    under the field's name, or a counter with ``_total``); None until the engine has them."""
    drafted = accepted = None
    for name, labels, value in _METRIC.findall(text):
        if f'model="{model}"' not in labels or name.endswith("_created"):
            continue
        if "accept" in name:
            accepted = int(float(value))
        elif "token" in name:
            drafted = int(float(value))
    if drafted is None or accepted is None:
        return None
    return drafted, accepted


# --- the run ----------------------------------------------------------------------------------


def item_of(worker: int, rnd: int, streams: int) -> int:
    return worker + rnd * streams


async def load(
    target: Target, task: str, streams: int, rnd: int, args: argparse.Namespace, src: EditSource
) -> tuple[Run, dict[int, str]]:
    max_tokens = args.max_tokens if task == "edit" else args.chat_tokens
    before = await target.engine_drafts()
    started = time.perf_counter()
    answers = await asyncio.gather(
        *(
            target.one(messages(task, item_of(w, rnd, streams), src), max_tokens)
            for w in range(streams)
        )
    )
    seconds = time.perf_counter() - started
    after = await target.engine_drafts()
    run = Run(task, target.config, streams, streams, sum(a.completion_tokens for a in answers))
    run.seconds = seconds
    run.ttft_s = [a.ttft for a in answers]
    run.decode_rates = [(a.completion_tokens - 1) / a.decode_s for a in answers if a.decode_s > 0]
    run.prompt_tokens = [a.prompt_tokens for a in answers]
    if before is not None and after is not None:
        run.add_drafts(after[0] - before[0], after[1] - before[1])
    for a in answers:
        run.add_drafts(a.drafted, a.accepted)
    return run, {item_of(w, rnd, streams): a.text for w, a in enumerate(answers)}


def _merge(into: Run, more: Run) -> None:
    into.requests += more.requests
    into.tokens += more.tokens
    into.seconds += more.seconds
    into.ttft_s += more.ttft_s
    into.decode_rates += more.decode_rates
    into.prompt_tokens += more.prompt_tokens
    into.add_drafts(more.drafted, more.accepted)


def _first_difference(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def interleaved(
    servers: dict[str, Server], args: argparse.Namespace, src: EditSource
) -> list[Run]:
    targets = [
        Target(GW_SPEC, servers["gateway"], "spec"),
        Target(GW_OFF, servers["gateway"], "off"),
    ]
    if PEER_SPEC in servers:
        targets += [Target(PEER_SPEC, servers[PEER_SPEC], "peer")]
        targets += [Target(PEER_OFF, servers[PEER_OFF], "peer")]
    for target in targets:  # warm up: first decode, page the weights in
        await target.one([{"role": "user", "content": "Say hello."}], 8)
    runs: dict[tuple[str, int, str], Run] = {}
    texts: dict[tuple[str, int, str], dict[int, str]] = {}
    for streams in args.streams:
        for rnd in range(args.rounds):
            for task in args.tasks:
                shift = rnd % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    one, out = await load(target, task, streams, rnd, args, src)
                    key = (task, streams, target.config)
                    if key in runs:
                        _merge(runs[key], one)
                    else:
                        runs[key] = one
                    texts.setdefault(key, {}).update(out)
                    acc = f", accepted {one.acceptance:.0%}" if one.acceptance is not None else ""
                    print(
                        f"  {task} {streams} streams round {rnd + 1}: {target.config:23}"
                        f" {one.tokens_per_s:7.1f} tok/s ({one.tokens} tokens,"
                        f" {one.seconds:.1f} s), TTFT p50 {one.ttft(0.5):.2f} s{acc}",
                        flush=True,
                    )
    for key, run in runs.items():
        base = BASELINE.get(run.config)
        if base is None or (key[0], key[1], base) not in texts:
            continue
        ours, theirs = texts[key], texts[(key[0], key[1], base)]
        for item in sorted(ours.keys() & theirs.keys()):
            run.compared += 1
            if ours[item] == theirs[item]:
                run.same += 1
            else:
                at = _first_difference(ours[item], theirs[item])
                run.mismatches.append(
                    {"item": item, "first_difference": at, "text": ours[item],
                     "baseline_text": theirs[item]}
                )  # fmt: skip
    for target in targets:
        await target.aclose()
    return list(runs.values())


# --- report -----------------------------------------------------------------------------------


def _find(runs: list[Run], task: str, streams: int, config: str) -> Run | None:
    return next((r for r in runs if (r.task, r.streams, r.config) == (task, streams, config)), None)


def _ratio(a: Run | None, b: Run | None) -> str:
    return f"{a.tokens_per_s / b.tokens_per_s:.2f}x" if a and b and b.tokens_per_s else "-"


def _row(r: Run) -> list[str]:
    drafted = str(r.drafted) if r.drafted is not None else "-"
    acceptance = f"{r.acceptance:.0%}" if r.acceptance is not None else "-"
    same = f"{r.same}/{r.compared}" if r.compared else "-"
    prompt = f"{sum(r.prompt_tokens) / len(r.prompt_tokens):.0f}" if r.prompt_tokens else "-"
    return [
        r.task, str(r.streams), r.config, f"{r.tokens_per_s:.1f}",
        f"{r.decode_tokens_per_s:.1f}", f"{r.ttft(0.5):.3f}",
        str(r.tokens), prompt, drafted, acceptance, same,
    ]  # fmt: skip


COLUMNS = [
    "task", "streams", "config", "tok/s", "decode tok/s", "TTFT p50 s", "tokens", "prompt tok",
    "drafted", "accepted", "same text",
]  # fmt: skip
RATIO_COLUMNS = [
    "task", "streams", "gw ngram / gw off", "gw ngram / llama-server ngram-mod",
    "llama-server ngram-mod / off", "gw off / llama-server off",
]  # fmt: skip


def ratio_rows(runs: list[Run], args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for task in args.tasks:
        for s in args.streams:

            def get(config: str, task: str = task, s: int = s) -> Run | None:
                return _find(runs, task, s, config)

            rows.append(
                [
                    task,
                    str(s),
                    _ratio(get(GW_SPEC), get(GW_OFF)),
                    _ratio(get(GW_SPEC), get(PEER_SPEC)),
                    _ratio(get(PEER_SPEC), get(PEER_OFF)),
                    _ratio(get(GW_OFF), get(PEER_OFF)),
                ]
            )
    return rows


def _ordered(runs: list[Run], args: argparse.Namespace) -> list[Run]:
    order = {c: i for i, c in enumerate(CONFIGS)}
    return sorted(
        runs,
        key=lambda r: (args.tasks.index(r.task), args.streams.index(r.streams), order[r.config]),
    )


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(row) + " |" for row in rows)])


def report(runs: list[Run], args: argparse.Namespace, src: EditSource) -> None:
    console = Console(width=170)
    title = (
        f"Speculative decoding, {args.gguf.name}, {args.threads} threads, temperature 0,"
        f" edit max_tokens {args.max_tokens}, chat max_tokens {args.chat_tokens},"
        f" {args.rounds} round(s)"
    )
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="right")
    rows = [_row(r) for r in _ordered(runs, args)]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    ratios = Table(title="Ratios (aggregate generated tok/s)")
    for column in RATIO_COLUMNS:
        ratios.add_column(column, justify="right")
    ratio_table = ratio_rows(runs, args)
    for row in ratio_table:
        ratios.add_row(*row)
    console.print(ratios)
    print(
        f"\nedit task: {Path(colorsys.__file__ or 'colorsys.py').name}, first {src.lines} lines,"
        f" {src.tokens} tokens (the whole module: {src.full_tokens}); prompt tokens with the"
        f" chat template: {_prompt_summary(runs)}"
    )
    print(f"gateway models: {args.gateway_config_summary}")
    print(f"llama-server {args.peer_version}: {' '.join(args.peer_args_shown)}")
    print(f"llama-server ngram-mod adds: {' '.join(args.peer_spec_args)}")
    for r in runs:
        for m in r.mismatches[:3]:
            print(
                f"DIFFERENT TEXT: {r.config} vs {BASELINE[r.config]}, {r.task}, {r.streams} "
                f"streams, request {m['item']}: first difference at character "
                f"{m['first_difference']} (lengths {len(m['text'])} / {len(m['baseline_text'])})"
            )
    print("\nMarkdown:\n")
    print(_markdown(COLUMNS, rows))
    print()
    print(_markdown(RATIO_COLUMNS, ratio_table))


def _prompt_summary(runs: list[Run]) -> str:
    parts = []
    for config in CONFIGS:
        counts = sorted({p for r in runs if r.task == "edit" and r.config == config
                         for p in r.prompt_tokens})  # fmt: skip
        if counts:
            parts.append(f"{config} {counts[0]}-{counts[-1]}")
    return ", ".join(parts) or "-"


def save(runs: list[Run], args: argparse.Namespace, src: EditSource, path: str) -> None:
    data = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "edit_source": {k: v for k, v in asdict(src).items() if k != "text"},
        "runs": [
            {
                **asdict(r),
                "tokens_per_s": r.tokens_per_s,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "ttft_p50_s": r.ttft(0.5),
                "acceptance": r.acceptance,
            }
            for r in _ordered(runs, args)
        ],
        "ratios": [dict(zip(RATIO_COLUMNS, row, strict=True)) for row in ratio_rows(runs, args)],
    }
    Path(path).write_text(json.dumps(data, indent=1))
    print(f"saved {path}")


def plot(runs: list[Run], args: argparse.Namespace, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(6 * len(args.tasks), 4), squeeze=False)
    width = 0.8 / len(CONFIGS)
    for ax, task in zip(axes[0], args.tasks, strict=True):
        for k, config in enumerate(CONFIGS):
            values = [
                (r.tokens_per_s if (r := _find(runs, task, s, config)) else 0.0)
                for s in args.streams
            ]
            xs = [i + k * width for i in range(len(args.streams))]
            ax.bar(xs, values, width, label=config)
        ax.set_xticks([i + width * (len(CONFIGS) - 1) / 2 for i in range(len(args.streams))])
        ax.set_xticklabels([f"{s} stream{'s' * (s != 1)}" for s in args.streams])
        ax.set(ylabel="generated tok/s (all streams)", title=task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: SmolLM2)")
    p.add_argument("--llama-server", type=Path, default=None, help=f"default: {PEER_BIN}")
    p.add_argument(
        "--wait-peer", type=float, default=0.0,
        help="seconds to wait for a llama-server build under way before building it here",
    )  # fmt: skip
    p.add_argument("--streams", type=int_list, default=None, help="streams (default 1,8)")
    p.add_argument("--rounds", type=int, default=1, help="loads per task, config and streams")
    p.add_argument("--tasks", type=lambda t: t.split(","), default=list(TASKS))
    p.add_argument("--max-tokens", type=int, default=None, help="edit task (default 1600)")
    p.add_argument("--chat-tokens", type=int, default=None, help="chat task (default 256)")
    p.add_argument("--edit-tokens", type=int, default=1500, help="size of the file to edit")
    p.add_argument("--n-ctx", type=int, default=4096, help="context per slot")
    p.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument(
        "--peer-spec-args", default=" ".join(PEER_SPEC_ARGS),
        help="llama-server's speculative arguments (default: ngram-mod, its documented defaults)",
    )  # fmt: skip
    p.add_argument("--skip-peer", action="store_true", help="the gateway's two models only")
    p.add_argument("--quick", action="store_true", help="smoke run: short answers, 1 stream")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="save a PNG plot here (needs matplotlib)")
    args = p.parse_args(argv)
    if bad := [t for t in args.tasks if t not in TASKS]:
        p.error(f"unknown task(s) {bad}: choose from {TASKS}")
    args.streams = args.streams or ([1] if args.quick else [1, 8])
    args.max_tokens = args.max_tokens or (96 if args.quick else 1600)
    args.chat_tokens = args.chat_tokens or (48 if args.quick else 256)
    args.peer_spec_args = args.peer_spec_args.split()
    args.gguf = args.gguf or default_gguf()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src = edit_source(args.gguf, args.edit_tokens)
    if "edit" in args.tasks and not src.renames:
        raise SystemExit(f"--edit-tokens {args.edit_tokens}: the cut file has no name to rename")
    if len(src.renames) < min(max(args.streams), len(QUESTIONS)):
        print(f"note: {len(src.renames)} renames for {max(args.streams)} streams: some repeat")
    args.peer_version, args.peer_args_shown = "-", ["(skipped)"]
    with tempfile.TemporaryDirectory(prefix="bench-speculative-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        servers = {"gateway": gateway_server(args, workdir)}
        args.gateway_config_summary = gateway_summary(workdir / "gateway.toml", args)
        if not args.skip_peer:
            binary = peer_binary(args)
            args.peer_version = peer_version(binary)
            for spec in (True, False):
                server = peer_server(args, binary, spec)
                servers[server.name] = server
            shown = servers[PEER_OFF].command
            args.peer_args_shown = [
                "<port>" if i and shown[i - 1] == "--port" else a for i, a in enumerate(shown)
            ]
        for server in servers.values():
            print(f"starting {server.name} ...", flush=True)
            log = workdir / f"{server.name.replace(' ', '-')}.log"
            stack.enter_context(running(server, log))
            if server.name != "gateway":
                wait_healthy(server)
        print(
            f"edit task: {src.lines} lines of colorsys.py, {src.tokens} tokens;"
            f" streams {args.streams}, rounds {args.rounds}",
            flush=True,
        )
        runs = asyncio.run(interleaved(servers, args, src))
    report(runs, args, src)
    if args.json:
        save(runs, args, src, args.json)
    if args.plot:
        plot(runs, args, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
