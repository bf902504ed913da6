"""What verifying a draft costs on this machine, in llama.cpp alone (no gateway, no HTTP): one
decode of ``1 + k`` tokens of each sequence, with logits on every token as speculative
verification needs, against a step of one token each, at several context lengths.

    python bench/bench_verify_cost.py [--gguf PATH] [--cells 128,800,1600]
        [--drafts 1,2,4,8,16,32,64] [--seqs 1] [--threads 2] [--reps 7] [--n-gpu-layers 0]
        [--flash-attn auto|on|off] [--json out.json] [--plot out.png]

For each context length (``--cells`` tokens already in each sequence's cells) and draft length
``k``: the median time of ``--reps`` steps (the step's cells removed after each, as a rejected
draft's are). ``--seqs`` sequences decode together, each in a KV stream of its own, 512 tokens
a micro-batch, as the engine runs them (``kv_cache.layout = "per_sequence"``).

The ceiling is what a step writes per second when every draft token is taken, over a one-token
step's: ``(k + 1) * t(1) / t(k + 1)``. No drafting policy gets decoding past it. Where a draft
token costs about what decoding it costs, the step is compute-bound (a CPU reading a long
context: llama.cpp's CPU attention does one query row at a time) and the ceiling stays small;
where a step is bound by reading the weights (a GPU, as expected; this script is how to check)
the ceiling grows with ``k``. The ``--threads`` and OpenMP settings are the gateway's
(``backends.llamacpp.native``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import default_gguf, int_list

from backends.llamacpp.native import load_llama_cpp

CHUNK = 512
FLASH = {"auto": -1, "off": 0, "on": 1}


@dataclass
class Cost:
    cells: int
    draft: int
    step_ms: float
    one_token_ms: float
    seqs: int = 1

    @property
    def per_token_ms(self) -> float:
        """The step's time per token it decodes (``1 + k`` of each sequence)."""
        return self.step_ms / ((self.draft + 1) * self.seqs)

    @property
    def ceiling(self) -> float:
        """Tokens per second of a step whose drafts are all taken, over a one-token step's."""
        return (self.draft + 1) * self.one_token_ms / self.step_ms


class Context:
    """One llama.cpp context holding ``seqs`` sequences of ``cells`` random tokens each."""

    def __init__(self, llama: Any, model: Any, args: argparse.Namespace, cells: int) -> None:
        self.llama, self.cells, self.seqs = llama, cells, args.seqs
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        cp = llama.llama_context_default_params()
        most = max(args.drafts) + 1
        cp.n_ctx = args.seqs * (cells + most + 256)
        cp.n_batch = max(CHUNK, most * args.seqs)
        cp.n_ubatch = CHUNK
        cp.n_seq_max = args.seqs
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = args.threads
        cp.flash_attn_type = FLASH[args.flash_attn]
        cp.no_perf = True
        self.ctx = llama.llama_init_from_model(model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(cp.n_batch, 0, 1)
        self.rnd = random.Random(cells)
        for seq in range(args.seqs):
            for first in range(0, cells, CHUNK):
                last = min(cells, first + CHUNK)
                self.decode(first, last - first, [seq], logits=False)

    def decode(self, pos: int, n: int, seqs: list[int], *, logits: bool = True) -> float:
        """One decode of ``n`` tokens from ``pos`` in each of ``seqs``; its seconds."""
        b = self.batch
        for j, seq in enumerate(seqs):
            for i in range(j * n, (j + 1) * n):
                b.token[i] = self.rnd.randrange(self.n_vocab // 4, self.n_vocab)
                b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = pos + i - j * n, 1, seq
                b.logits[i] = logits
        b.n_tokens = n * len(seqs)
        started = time.perf_counter()
        if self.llama.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        self.llama.llama_synchronize(self.ctx)
        return time.perf_counter() - started

    def step(self, n: int, reps: int) -> float:
        """Median seconds of a step of ``n`` tokens of every sequence after its context (one
        warm-up step)."""
        times = []
        seqs = list(range(self.seqs))
        for _ in range(reps + 1):
            times.append(self.decode(self.cells, n, seqs))
            for seq in seqs:
                self.llama.llama_memory_seq_rm(self.memory, seq, self.cells, -1)
        return statistics.median(times[1:])

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)


def measure(llama: Any, model: Any, args: argparse.Namespace) -> list[Cost]:
    costs = []
    for cells in args.cells:
        context = Context(llama, model, args, cells)
        try:
            one = 1000 * context.step(1, args.reps)
            costs.append(Cost(cells, 0, one, one, args.seqs))
            for k in args.drafts:
                step = 1000 * context.step(k + 1, args.reps)
                costs.append(Cost(cells, k, step, one, args.seqs))
        finally:
            context.close()
    return costs


def report(costs: list[Cost], args: argparse.Namespace, device: str) -> None:
    name = Path(args.gguf).name
    title = f"{name}, {device}, {args.seqs} sequence(s), {args.threads} threads"
    table = Table(title=f"{title}, flash_attn {args.flash_attn}")
    for column in ("cells", "draft k", "step ms", "ms / token", "ceiling if all taken"):
        table.add_column(column, justify="right")
    for c in costs:
        table.add_row(
            str(c.cells),
            str(c.draft),
            f"{c.step_ms:.1f}",
            f"{c.per_token_ms:.2f}",
            f"{c.ceiling:.2f}x",  # 1.00x for the one-token step itself
        )
    Console().print(table)


def plot(costs: list[Cost], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for cells in sorted({c.cells for c in costs}):
        rows = [c for c in costs if c.cells == cells and c.draft > 0]
        ax.plot([c.draft for c in rows], [c.ceiling for c in rows], marker="o", label=f"{cells}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="draft tokens k", ylabel="ceiling: tok/s if all taken / 1-token step's")
    ax.legend(title="cells", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: SmolLM2)")
    p.add_argument("--cells", type=int_list, default=[128, 800, 1600])
    p.add_argument("--drafts", type=int_list, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--seqs", type=int, default=1, help="sequences decoded together")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--flash-attn", choices=sorted(FLASH), default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    lengths = [*args.cells, *args.drafts, args.seqs, args.reps]
    if not args.cells or not args.drafts or min(lengths) < 1:
        p.error("--cells, --drafts, --seqs and --reps take positive numbers")
    args.gguf = args.gguf or default_gguf()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llama = load_llama_cpp()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = args.n_gpu_layers
    model = llama.llama_model_load_from_file(str(args.gguf).encode(), params)
    if not model:
        raise SystemExit(f"cannot load {args.gguf}")
    try:
        costs = measure(llama, model, args)
    finally:
        llama.llama_model_free(model)
    device = "GPU" if args.n_gpu_layers and llama.llama_supports_gpu_offload() else "CPU"
    report(costs, args, device)
    if args.json:
        out = {
            "gguf": Path(args.gguf).name,
            "device": device,
            "seqs": args.seqs,
            "threads": args.threads,
            "flash_attn": args.flash_attn,
            "costs": [{**asdict(c), "ceiling": c.ceiling} for c in costs],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(costs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
