"""One KV pool for all sequences (``kv_unified``, what the llama.cpp engine uses so that
conversations share cached prefixes) against one KV stream per sequence (llama-server's
default), in llama.cpp alone: no gateway, no HTTP.

    python bench/bench_kv_layout.py [--gguf PATH] [--seqs 8] [--cells 1536] [--threads 2]
        [--steps 24]

For each layout: ``--seqs`` sequences each read a ``--cells``-token prompt (one after another,
512 tokens a step), then decode one token each per step, all together, ``--steps`` times.
Prints the time to read the prompts and the median decode step, and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import default_gguf

CHUNK = 512


def measure(llama: Any, model: Any, args: argparse.Namespace, unified: bool) -> tuple[float, float]:
    """Seconds to read every prompt, and the median decode step."""
    cp = llama.llama_context_default_params()
    cp.n_ctx = args.seqs * (args.cells + args.steps + 256)
    cp.n_batch = cp.n_ubatch = CHUNK
    cp.n_seq_max = args.seqs
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.kv_unified = unified
    cp.flash_attn_type = 1  # on, as the engine's default resolves on a CPU
    cp.no_perf = True
    ctx = llama.llama_init_from_model(model, cp)
    batch = llama.llama_batch_init(CHUNK, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if llama.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        started = time.perf_counter()
        for s in range(args.seqs):  # a different prompt per sequence
            for first in range(0, args.cells, CHUNK):
                last = min(args.cells, first + CHUNK)
                decode(
                    [
                        ((s * 7 + p) % 40000 + 100, p, s, p == args.cells - 1)
                        for p in range(first, last)
                    ]
                )
        read = time.perf_counter() - started
        steps = []
        for step in range(args.steps):
            started = time.perf_counter()
            decode([(500 + step, args.cells + step, s, True) for s in range(args.seqs)])
            steps.append(time.perf_counter() - started)
        return read, statistics.median(steps)
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: SmolLM2)")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--cells", type=int, default=1536, help="prompt tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args(argv)
    import llama_cpp as llama

    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    model = llama.llama_model_load_from_file(str(args.gguf or default_gguf()).encode(), params)
    try:
        unified = measure(llama, model, args, unified=True)
        streams = measure(llama, model, args, unified=False)
    finally:
        llama.llama_model_free(model)
    table = Table(title=f"{args.seqs} sequences x {args.cells} cells, {args.threads} threads")
    for column in ("layout", "read prompts s", "decode step ms"):
        table.add_column(column, justify="right")
    table.add_row("unified", f"{unified[0]:.1f}", f"{1000 * unified[1]:.1f}")
    table.add_row("per-sequence streams", f"{streams[0]:.1f}", f"{1000 * streams[1]:.1f}")
    table.add_row("ratio", f"{unified[0] / streams[0]:.2f}x", f"{unified[1] / streams[1]:.2f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
