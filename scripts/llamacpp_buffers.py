#!/usr/bin/env python3
"""Compare backends/llamacpp/memory.py's estimate with the buffers llama.cpp reports at load.

    python scripts/llamacpp_buffers.py [MODEL.gguf] [--out report.md]

Without a model it writes a SmolLM2-shaped GGUF (30 layers, 576 wide, 9 heads / 3 KV heads,
49152 vocabulary, tied output; f16 zeros, no tokenizer) so it runs where SmolLM2 is not
installed, e.g. on a GPU machine. For each K/V type, slot count and flash-attention setting it
builds the context exactly as the backend does (``LoadedModel._context_params``), parses the
"<buffer> <kind> buffer size = X MiB" lines llama.cpp logs, and prints estimate vs reported,
per term and per device (all layers on the GPU when llama.cpp has one).
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20
_LINE = re.compile(r"(\S+)\s+(model|KV|output|compute) buffer size =\s*([\d.]+) MiB")
MATRIX = [  # (K/V type, slots, flash_attn)
    ("f16", 1, "auto"),
    ("f16", 4, "auto"),
    ("q8_0", 1, "on"),
    ("q8_0", 4, "on"),
    ("f16", 4, "off"),
]


def write_smollm2_shaped(path: Path) -> Path:
    import gguf
    import numpy as np

    n_embd, n_ff, n_layer, n_head, n_kv, n_vocab = 576, 1536, 30, 9, 3, 49152
    head = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("none")
    f16 = np.float16
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd), f16))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((n_embd, n_embd), f16))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.zeros((n_kv * head, n_embd), f16))
        w.add_tensor(f"blk.{i}.attn_v.weight", np.zeros((n_kv * head, n_embd), f16))
        w.add_tensor(f"blk.{i}.attn_output.weight", np.zeros((n_embd, n_embd), f16))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", np.zeros((n_ff, n_embd), f16))
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((n_ff, n_embd), f16))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((n_embd, n_ff), f16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gpu_used_mib() -> int | None:
    """What nvidia-smi says GPU 0 has in use (None without nvidia-smi)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = ["--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"]
    return int(subprocess.run([exe, *query], capture_output=True, text=True).stdout.strip())


class Log:
    def __init__(self, llama: Any) -> None:
        self.lines: list[str] = []

        def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            self.lines.append(text.decode("utf-8", errors="replace"))

        self.callback = llama.llama_log_callback(on_log)
        llama.llama_log_set(self.callback, ctypes.c_void_p(0))

    def buffers(self) -> dict[tuple[str, str], float]:
        found: dict[tuple[str, str], float] = {}
        for m in _LINE.finditer("".join(self.lines)):
            key = (m[1], m[2])
            found[key] = found.get(key, 0.0) + float(m[3])
        return found


def measure(path: Path, out: list[str]) -> list[float]:
    import llama_cpp as llama

    from backends.llamacpp.config import LlamaCppConfig
    from backends.llamacpp.memory import estimate
    from backends.llamacpp.model import LoadedModel

    log = Log(llama)
    llama.llama_backend_init()
    gpus = 1 if llama.llama_supports_gpu_offload() else 0
    out.append(
        f"model {path.name}, {'1 GPU' if gpus else 'CPU only'}, llama-cpp-python "
        f"{llama.__version__}\n"
    )
    errors: list[float] = []
    for kv_type, slots, fa in MATRIX:
        cfg = LlamaCppConfig.model_validate(
            {
                "model_path": str(path),
                "kv_cache": {"type_k": kv_type, "type_v": kv_type},
                "batching": {"max_concurrent": slots, "n_threads": 1},
                "flash_attn": fa,
            }
        )
        n_seq = cfg.n_seq  # as LlamaCppBackend.start
        n_batch = cfg.batching.prefill_chunk_tokens + slots
        log.lines.clear()
        mp = llama.llama_model_default_params()
        mp.n_gpu_layers = 1_000_000
        model = llama.llama_model_load_from_file(str(path).encode(), mp)
        shim = object.__new__(LoadedModel)
        shim.llama, shim.config = llama, cfg
        ctx = llama.llama_init_from_model(model, shim._context_params(n_seq, n_batch))
        got = log.buffers()
        loaded = gpu_used_mib()
        llama.llama_free(ctx)
        llama.llama_model_free(model)
        if loaded is not None:
            out.append(f"\nGPU memory in use: loaded {loaded} MiB, freed {gpu_used_mib()} MiB\n")
        est = estimate(cfg, gpus)
        errors += report(out, f"K/V {kv_type}, {slots} slot(s), flash_attn {fa}", est, got, gpus)
    return errors


def _sum(got: dict[tuple[str, str], float], kinds: tuple[str, ...], where: str = "") -> float:
    return sum(v for (buf, kind), v in got.items() if kind in kinds and where in buf)


def report(
    out: list[str], title: str, est: Any, got: dict[tuple[str, str], float], gpus: int
) -> list[float]:
    rows = [
        ("weights", est.weights_bytes, _sum(got, ("model",))),
        ("KV cache", est.kv_cache_bytes, _sum(got, ("KV",))),
        ("compute + output", est.compute_bytes, _sum(got, ("compute", "output"))),
    ]
    if gpus:
        rows.append(("on GPU 0", est.gpu_bytes[0], _sum(got, ("model", "KV", "compute"), "CUDA0")))
        host = sum(v for (buf, _), v in got.items() if not buf.startswith("CUDA0"))
        rows.append(("on the host", est.host_bytes, host))
    out.append(f"\n{title}\n")
    out.append("| term | estimate MiB | llama.cpp MiB | error |\n|---|---:|---:|---:|\n")
    errors = []
    for name, mine, theirs in rows:
        error = (mine / MiB - theirs) / theirs if theirs else 0.0
        errors.append(error)
        out.append(f"| {name} | {mine / MiB:.2f} | {theirs:.2f} | {error:+.2%} |\n")
    out.append("buffers: " + ", ".join(f"{b} {k} {v:.2f}" for (b, k), v in got.items()) + "\n")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_smollm2_shaped(Path(tmp) / "smollm2-shaped-f16.gguf")
        out: list[str] = []
        errors = measure(path, out)
    text = "".join(out) + f"\nlargest error: {max(abs(e) for e in errors):.2%}\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
