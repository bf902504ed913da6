"""Real model sizes on the GPU: the gateway's llama.cpp backend beside llama-server and
llama-cpp-python's server on 8B-shaped GGUFs, against the card's bandwidth roofline (issue 29).

    python scripts/gpu-kit/real_sizes.py OUTDIR [--tiny] [--quants q4_k_m q8_0]
        [--streams 1 8 32 64] [--max-tokens 256] [--peer-streams 1] [--llama-server BIN]
        [--bandwidth-gbs GB/S] [--n-gpu-layers -1] [--deadline-s 330] [--models DIR] [--report FILE]
    python scripts/gpu-kit/real_sizes.py --plan       (file sizes of the 8B GGUFs, nothing written)

Steps, each printed with its elapsed seconds:

1. card: name, driver and memory (nvidia-smi), the card's memory bandwidth from a table of specs
   (``--bandwidth-gbs`` overrides; none on a CPU), and a measured device-to-device copy rate;
2. build: llama-cpp-python's version and ``llama_print_system_info`` (its compiled flags), the
   llama-server binary's ``--version``, the git commit;
3. models: Llama-3-8B-shaped GGUFs (vocab 128256, 4096 hidden, 14336 FFN, 32 layers, 32/8 heads)
   written with the ``gguf`` package. ``gguf`` 0.19 quantizes Q8_0 but not the K-quants, so every
   weight is written directly as random *quantized blocks* (random quants, fixed block scales):
   Q8_0 everywhere for ``q8_0``; for ``q4_k_m`` llama-quantize's Q4_K_M mix (Q4_K, with Q6_K for
   ``output`` and for ``attn_v``/``ffn_down`` in the layers its ``use_more_bits`` picks). Same
   tensor types and sizes as a quantized Llama-3-8B, so the same bytes move per token. The LM-head
   rows of control and non-printable byte tokens are zero, so each sampled token is one printable
   piece; EOS is banned through ``logit_bias`` so every request generates ``--max-tokens``;
4. per model, one server at a time on the same file and the same slots: ``gateway serve`` (llama.cpp
   backend, run under this script's engine profiler), llama-server (``-np`` = the gateway's
   ``max_concurrent``, ``-c`` = slots x context per slot), ``python -m llama_cpp.server`` (one
   sequence at a time: ``--peer-streams`` only). Each at 1/8/32/64 concurrent streams: aggregate
   tok/s, TTFT p50/p95; batch-1 decode tok/s ((tokens - 1) / (time - TTFT), best of 2) as a fraction
   of the roofline (card bandwidth / bytes read per token = all weights but ``token_embd``);
5. engine profile at the largest stream count: per ``llama_decode`` step, seconds in decode
   (``llama_decode`` + ``llama_synchronize``), sampling (the sampler chain) and Python (building the
   batch, detokenizing, stop strings, handing items to the event loop), from timers wrapped around
   the engine's methods in the gateway process (``--serve-profiled``; the engine code is unchanged);
6. report: markdown (``--report``, default OUTDIR/real-sizes.md) and JSON (OUTDIR/real-sizes.json),
   rewritten after every server so that a run cut short keeps what it measured.

``--tiny`` (the CPU dry run): the same steps with 2-layer, 256-wide models on the CPU, 1 and 2
streams, 16 tokens; llama-server only if a binary is given or found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
T0 = time.monotonic()

# ------------------------------------------------------------------------------------ card specs

#: Memory bandwidth (GB/s, vendor spec) by a substring of the nvidia-smi name, most specific first.
SERVERS = ("gateway", "llama-server", "llama_cpp.server")
BANDWIDTH_GBS: list[tuple[str, float]] = [
    ("H200 NVL", 4800.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("RTX 4090", 1008.0),
    ("L4", 300.0),
]


def spec_bandwidth(name: str) -> float | None:
    for key, gbs in BANDWIDTH_GBS:
        if key.lower() in name.lower():
            return gbs
    return None


def log(msg: str) -> None:
    print(f"[real-sizes {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = Shape("llama3-8b-shape", 128256, 4096, 14336, 32, 32, 8, 8192, 500000.0)
TINY = Shape("tiny-shape", 2048, 256, 512, 2, 4, 2, 2048, 10000.0)

#: ggml type name -> (elements per block, bytes per block, offsets of fp16 scales in a block, scale)
#: The scale makes dequantized weights about N(0, 0.02): random quants times a fixed block scale.
BLOCKS: dict[str, tuple[int, int, tuple[tuple[int, float], ...]]] = {
    "Q8_0": (32, 34, ((0, 0.02 / 73.0),)),  # d, qs[32] int8 (std ~73)
    "Q4_K": (256, 144, ((0, 0.02 / (31.5 * 4.6)), (2, 7.5 * 0.02 / (31.5 * 4.6)))),  # d, dmin
    "Q6_K": (256, 210, ((208, 0.02 / (73.0 * 18.5)),)),  # ql, qh, scales int8, d
}
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's choice of the layers that get Q6_K in Q4_K_M (attn_v, ffn_down)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class TensorPlan:
    name: str
    rows: int  # ggml ne[1]
    cols: int  # ggml ne[0] (the row length, multiple of the block size)
    qtype: str  # "F32" for norms

    @property
    def nbytes(self) -> int:
        if self.qtype == "F32":
            return 4 * self.rows * self.cols
        per, size, _ = BLOCKS[self.qtype]
        return self.rows * (self.cols // per) * size


def plan(shape: Shape, quant: str) -> list[TensorPlan]:
    """Tensors of a Llama GGUF in file order, with llama-quantize's types for ``quant``."""

    def q(kind: str, layer: int = -1) -> str:
        if quant == "q8_0":
            return "Q8_0"
        if kind == "output":
            return "Q6_K"
        if kind in ("attn_v", "ffn_down") and use_more_bits(layer, shape.layers):
            return "Q6_K"
        return "Q4_K"

    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out = [TensorPlan("token_embd.weight", shape.vocab, h, q("token_embd"))]
    for i in range(shape.layers):
        b = f"blk.{i}."
        out += [
            TensorPlan(b + "attn_norm.weight", 1, h, "F32"),
            TensorPlan(b + "attn_q.weight", h, h, q("attn_q", i)),
            TensorPlan(b + "attn_k.weight", kv, h, q("attn_k", i)),
            TensorPlan(b + "attn_v.weight", kv, h, q("attn_v", i)),
            TensorPlan(b + "attn_output.weight", h, h, q("attn_output", i)),
            TensorPlan(b + "ffn_norm.weight", 1, h, "F32"),
            TensorPlan(b + "ffn_gate.weight", shape.ffn, h, q("ffn_gate", i)),
            TensorPlan(b + "ffn_up.weight", shape.ffn, h, q("ffn_up", i)),
            TensorPlan(b + "ffn_down.weight", h, shape.ffn, q("ffn_down", i)),
        ]
    out += [
        TensorPlan("output_norm.weight", 1, h, "F32"),
        TensorPlan("output.weight", shape.vocab, h, q("output")),
    ]
    return out


def bytes_per_token(tensors: list[TensorPlan]) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row of it)."""
    return sum(t.nbytes for t in tensors if t.name != "token_embd.weight")


# ------------------------------------------------------------------------------------- vocabulary


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    by_byte = dict(zip(bs, cs, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


def vocabulary(size: int) -> tuple[list[str], list[str], set[int]]:
    """(tokens, merges, ids never to sample): 256 byte tokens, the Llama-3 specials, then letter
    strings with and without a leading space (byte-level 'Ġ'), each reachable by one merge."""
    chars = byte_chars()
    tokens = chars + list(SPECIAL_TOKENS)
    seen = set(tokens)
    merges: list[str] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    space = chars[ord(" ")]
    frontier = [""]
    while len(tokens) < size:
        longer = []
        for stem in frontier:
            for c in letters:
                longer.append(stem + c)
        for word in longer:
            for tok, (a, b) in (
                (word, (word[:-1], word[-1])),
                (space + word, (space + word[:-1] if word[:-1] else space, word[-1])),
            ):
                if len(tokens) >= size or tok in seen or len(tok) < 2:
                    continue
                tokens.append(tok)
                seen.add(tok)
                merges.append(f"{a} {b}")
        frontier = longer
    never = {i for i in range(256) if i < 0x20 or i >= 0x7F}
    never |= set(range(256, 256 + len(SPECIAL_TOKENS)))
    return tokens, merges, never


# ------------------------------------------------------------------------------------ GGUF writer


def random_blocks(rng: np.random.Generator, t: TensorPlan) -> np.ndarray:
    if t.qtype == "F32":
        return np.ones((t.rows, t.cols), np.float32)
    per, size, scales = BLOCKS[t.qtype]
    n_blocks = t.rows * (t.cols // per)
    data = rng.integers(0, 256, size=n_blocks * size, dtype=np.uint8)
    halves = data.view(np.uint16).reshape(n_blocks, size // 2)  # every block size is even
    for offset, value in scales:
        halves[:, offset // 2] = np.float16(value).view(np.uint16)
    return data.reshape(t.rows, (t.cols // per) * size)


def make_gguf(shape: Shape, quant: str, path: Path, seed: int = 0) -> dict[str, Any]:
    """Write a random-weight Llama GGUF of ``shape`` with ``quant``'s tensor types; return facts."""
    import gguf

    started = time.monotonic()
    tensors = plan(shape, quant)
    tokens, merges, never = vocabulary(shape.vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"{shape.name}-{quant}")
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.vocab)
    w.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(LLAMA3_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in tensors:
        if t.qtype == "F32":
            w.add_tensor_info(t.name, (t.rows, t.cols), np.dtype(np.float32), t.nbytes)
        else:
            nb = t.nbytes // t.rows
            w.add_tensor_info(
                t.name,
                (t.rows, nb),
                np.dtype(np.uint8),
                t.nbytes,
                raw_dtype=gguf.GGMLQuantizationType[t.qtype],
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    pool: dict[tuple[str, int, int], np.ndarray] = {}
    for t in tensors:
        # one random tensor per (type, shape), reused by every layer: the same bytes move per
        # token as with 32 different ones, and the file is written at disk speed
        key = (t.qtype, t.rows, t.cols)
        if key not in pool:
            pool[key] = random_blocks(rng, t)
        data = pool[key]
        if t.name == "output.weight":
            data = data.copy()
            data[sorted(never)] = 0  # logit 0 for these tokens: never the argmax
        w.write_tensor_data(data.squeeze(0) if t.qtype == "F32" else data)
    w.close()
    tmp.replace(path)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.qtype] = types.get(t.qtype, 0) + 1
    return {
        "path": str(path),
        "quant": quant,
        "shape": asdict(shape),
        "file_bytes": path.stat().st_size,
        "tensor_bytes": sum(t.nbytes for t in tensors),
        "bytes_per_token": bytes_per_token(tensors),
        "tensor_types": types,
        "eog_ids": [tokens.index("<|end_of_text|>"), tokens.index("<|eot_id|>")],
        "seconds": round(time.monotonic() - started, 1),
        "how": f"gguf {gguf_version()} GGUFWriter, random {quant.upper()} blocks written directly "
        "(one random tensor per type and shape, shared by the layers)",
    }


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------- engine profiler


def serve_profiled(profile_path: str, gateway_argv: list[str]) -> None:
    """Run ``gateway <argv>`` in this process with timers around the llama.cpp engine's step.

    Totals go to ``profile_path`` (JSON) twice a second while they change; the bench diffs two
    snapshots taken around a load. ``llama_synchronize`` after ``llama_decode`` moves the wait
    for the GPU, which the first sampler call would pay anyway, into the decode bucket.
    """
    sys.path.insert(0, str(REPO))
    from backends.llamacpp import engine as engine_mod
    from backends.llamacpp import sampling as sampling_mod

    totals: dict[str, float] = {
        "steps": 0,
        "rows": 0,
        "step_s": 0.0,
        "decode_s": 0.0,
        "sample_s": 0.0,
        "samples": 0,
        "build_s": 0.0,
        "deliver_s": 0.0,
        "admit_s": 0.0,
    }
    lock = threading.Lock()
    perf = time.perf_counter
    engine_cls: Any = engine_mod.Engine
    sampler_cls: Any = sampling_mod.SamplerChain

    def timed(cls: Any, name: str, key: str, count: str | None = None) -> None:
        orig: Callable[..., Any] = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            t = perf()
            try:
                return orig(self, *args, **kwargs)
            finally:
                totals[key] += perf() - t
                if count:
                    totals[count] += 1

        setattr(cls, name, wrapper)

    orig_decode: Callable[..., bool] = engine_cls.decode

    def decode(self: Any, rows: list[Any]) -> bool:
        t = perf()
        ok = orig_decode(self, rows)
        if ok:
            self.model.llama.llama_synchronize(self.model.ctx)
        totals["decode_s"] += perf() - t
        return ok

    orig_step: Callable[..., None] = engine_cls._generate_step

    def generate_step(self: Any, jobs: list[Any]) -> None:
        t = perf()
        orig_step(self, jobs)
        totals["step_s"] += perf() - t
        totals["steps"] += 1
        totals["rows"] += len(jobs)

    engine_cls.decode = decode
    engine_cls._generate_step = generate_step
    timed(engine_cls, "_build", "build_s")
    timed(engine_cls, "deliver", "deliver_s")
    timed(engine_cls, "_admit", "admit_s")
    timed(sampler_cls, "sample", "sample_s", "samples")

    def dump() -> None:
        last = ""
        while True:
            time.sleep(0.5)
            with lock:
                text = json.dumps(totals)
            if text != last:
                tmp = profile_path + ".tmp"
                Path(tmp).write_text(text)
                os.replace(tmp, profile_path)
                last = text

    threading.Thread(target=dump, name="engine-profile", daemon=True).start()
    from gateway.cli import main as gateway_main

    sys.argv = ["gateway", *gateway_argv]
    gateway_main()


def read_profile(path: Path) -> dict[str, float]:
    try:
        data: dict[str, float] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def profile_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = d.get("steps", 0.0)
    if not steps:
        return {"steps": 0}
    step = d["step_s"]
    python = step - d["decode_s"] - d["sample_s"]
    return {
        "steps": int(steps),
        "rows_per_step": d["rows"] / steps,
        "step_ms": 1000 * step / steps,
        "decode_ms": 1000 * d["decode_s"] / steps,
        "sample_ms": 1000 * d["sample_s"] / steps,
        "python_ms": 1000 * python / steps,
        "of_which_build_ms": 1000 * d["build_s"] / steps,
        "of_which_deliver_ms": 1000 * d["deliver_s"] / steps,
        "admit_ms": 1000 * d["admit_s"] / steps,
        "decode_share": d["decode_s"] / step if step else math.nan,
        "sample_share": d["sample_s"] / step if step else math.nan,
        "python_share": python / step if step else math.nan,
    }


# ----------------------------------------------------------------------------------- the client


@dataclass
class Load:
    streams: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def ttft(self, q: float) -> float:
        from bench_serving import _quantile

        return float(_quantile(self.ttft_s, q))


class Client:
    def __init__(self, base_url: str, model: str, max_tokens: int, ban: list[int]) -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(
            base_url=base_url,
            api_key="bench",
            max_retries=0,
            timeout=600.0,
        )
        self.model = model
        self.max_tokens = max_tokens
        self.logit_bias = {str(t): -100 for t in ban}

    async def one(self, prompt: str, max_tokens: int) -> tuple[float, int, float]:
        """One streamed chat completion: (TTFT s, tokens, total s). With EOS banned a request
        that ends with "length" generated ``max_tokens``; otherwise count the content chunks."""
        started = time.perf_counter()
        ttft = math.nan
        chunks = 0
        finish = None
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": prompt},
            ],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            logit_bias=self.logit_bias or None,
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    if not chunks:
                        ttft = time.perf_counter() - started
                    chunks += 1
                if choice.finish_reason:
                    finish = choice.finish_reason
        total = time.perf_counter() - started
        return ttft, max_tokens if finish == "length" else chunks, total

    async def load(self, streams: int) -> Load:
        result = Load(streams)

        async def worker(w: int) -> None:
            try:
                prompt = f"Write a long essay about topic number {w}."
                ttft, n, _ = await self.one(prompt, self.max_tokens)
            except Exception as err:  # one failed request is reported, not fatal
                result.errors.append(f"{type(err).__name__}: {err}"[:200])
                return
            result.ttft_s.append(ttft)
            result.tokens += n
            result.requests += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(streams)))
        result.seconds = time.perf_counter() - started
        return result

    async def batch1_decode(self, tries: int = 2) -> float:
        """Decode tok/s at batch 1: best (tokens - 1) / (total - TTFT) of ``tries`` requests."""
        best = 0.0
        for i in range(tries):
            ttft, n, total = await self.one(f"Tell me about the number {i}.", self.max_tokens)
            if n > 1 and total > ttft:
                best = max(best, (n - 1) / (total - ttft))
        return best

    async def aclose(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------------------------- the servers


def gateway_server(args: argparse.Namespace, gguf: Path, work: Path, profile: Path) -> Any:
    from bench_serving import Server, _env, _free_port, _toml

    port = _free_port()
    config = {
        "models": {
            "bench": {
                "backend": "llamacpp",
                "model_path": str(gguf),
                "n_gpu_layers": args.n_gpu_layers,
                "batching": {
                    "max_concurrent": max(args.streams),
                    "max_queue": 1024,
                    "queue_timeout_s": 600.0,
                    "n_threads": args.threads,
                    "n_threads_batch": args.threads,
                },
                "kv_cache": {"n_ctx_per_slot": args.n_ctx},
            }
        }
    }
    path = work / "gateway.toml"
    path.write_text(_toml(config))
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-profiled", str(profile)]
    command += ["--", "serve", "--config", str(path), "--port", str(port)]
    return Server("gateway", "bench", command, f"http://127.0.0.1:{port}/v1", _env())


def llama_server(args: argparse.Namespace, gguf: Path, binary: str) -> Any:
    from bench_serving import Server, _env, _free_port

    port = _free_port()
    slots = max(args.streams)
    command = [
        binary, "-m", str(gguf), "--alias", "peer",
        "-np", str(slots), "-c", str(slots * args.n_ctx),
        "-ngl", str(999 if args.n_gpu_layers < 0 else args.n_gpu_layers),
        "-t", str(args.threads), "-tb", str(args.threads),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    return Server("llama-server", "peer", command, f"http://127.0.0.1:{port}/v1", _env())


def llama_cpp_server(args: argparse.Namespace, gguf: Path) -> Any:
    from bench_serving import peer_server

    ns = argparse.Namespace(
        gguf=gguf, n_ctx=args.n_ctx, threads=args.threads, n_gpu_layers=args.n_gpu_layers
    )
    return peer_server(ns)


def find_llama_server(given: str | None) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else None
    for cand in (os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if cand and os.access(cand, os.X_OK):
            return cand
    found = sorted(REPO.glob(".peers/llama-server-*/bin/llama-server"))
    return str(found[-1]) if found else None


# ----------------------------------------------------------------------------------------- steps


def card_info(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"gpu": None, "driver": None, "memory": None}
    if shutil.which("nvidia-smi"):
        q = "--query-gpu=name,driver_version,memory.total"
        out = subprocess.run(
            ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out:
            name, driver, memory = (s.strip() for s in out.splitlines()[0].split(",")[:3])
            info.update(gpu=name, driver=driver, memory=memory)
    info["bandwidth_spec_gbs"] = spec_bandwidth(info["gpu"]) if info["gpu"] else None
    if args.bandwidth_gbs:
        info["bandwidth_gbs"], info["bandwidth_from"] = args.bandwidth_gbs, "--bandwidth-gbs"
    elif info["bandwidth_spec_gbs"]:
        info["bandwidth_gbs"], info["bandwidth_from"] = info["bandwidth_spec_gbs"], "spec table"
    else:
        info["bandwidth_gbs"], info["bandwidth_from"] = None, "unknown: no GPU, or not in the table"
    info["copy_gbs"] = measured_copy_bandwidth() if info["gpu"] else None
    info["cpu"] = platform.processor() or platform.machine()
    info["cores"] = os.cpu_count()
    return info


def measured_copy_bandwidth() -> float | None:
    """Device-to-device copy rate (read + write bytes / s) with torch, in a child process."""
    code = """
import time, torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); print(2 * 20 * x.numel() / (time.perf_counter() - t) / 1e9)
"""
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        return round(float(out.stdout.strip().splitlines()[-1]), 1)
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def build_info(server_bin: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
        info["llama_cpp_path"] = str(Path(llama_cpp.__file__).parent)
        info["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception as err:
        info["llama_cpp_python"] = f"unavailable: {type(err).__name__}: {err}"
    if server_bin:
        out = subprocess.run(
            [server_bin, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        info["llama_server"] = server_bin
        info["llama_server_version"] = (out.stdout + out.stderr).strip()[-400:]
    git = ["git", "-C", str(REPO)]
    info["commit"] = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain"], capture_output=True, text=True, check=False
    ).stdout
    info["changed_files"] = len(dirty.splitlines())
    info["build_flags"] = os.environ.get(
        "GPU_CHECK_BUILD_FLAGS",
        "see system_info (the flags compiled in); kit wheel: GGML_CUDA=on "
        "CMAKE_CUDA_ARCHITECTURES=90-real GGML_NATIVE=OFF (scripts/gpu-kit/build.sh)",
    )
    return info


def llama_cpp_server_importable() -> str | None:
    out = subprocess.run(
        [sys.executable, "-c", "import llama_cpp.server.app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1]


def run_server(
    server: Any,
    log_path: Path,
    streams: list[int],
    args: argparse.Namespace,
    ban: list[int],
    profile: Path | None,
) -> dict[str, Any]:
    from bench_serving import running

    result: dict[str, Any] = {"server": server.name, "loads": [], "log": log_path.name}
    started = time.monotonic()
    with running(server, log_path, timeout_s=args.start_timeout_s):
        result["start_s"] = round(time.monotonic() - started, 1)
        log(f"  {server.name} up in {result['start_s']}s")
        result.update(asyncio.run(drive(server, streams, args, ban, profile)))
    return result


async def drive(
    server: Any, streams: list[int], args: argparse.Namespace, ban: list[int], profile: Path | None
) -> dict[str, Any]:
    client = Client(server.base_url, server.model, args.max_tokens, ban)
    out: dict[str, Any] = {"loads": []}
    try:
        await client.one("Warm up.", 4)
        out["batch1_decode_tok_s"] = await client.batch1_decode()
        log(f"  {server.name}: batch-1 decode {out['batch1_decode_tok_s']:.1f} tok/s")
        for c in streams:
            if time_left(args) < 20:
                out["loads"].append({"streams": c, "skipped": "deadline"})
                log(f"  {server.name}: {c} streams skipped (deadline)")
                continue
            before = await settled_profile(profile) if profile and c == max(streams) else None
            load = await client.load(c)
            row: dict[str, Any] = {
                "streams": c,
                "requests": load.requests,
                "tokens": load.tokens,
                "seconds": round(load.seconds, 3),
                "tok_s": round(load.tok_s, 1),
                "ttft_p50_s": round(load.ttft(0.5), 4),
                "ttft_p95_s": round(load.ttft(0.95), 4),
                "errors": load.errors[:3],
            }
            if before is not None and profile is not None:
                row["profile"] = profile_summary(before, await settled_profile(profile))
            out["loads"].append(row)
            log(
                f"  {server.name}: {c} streams: {row['tok_s']} tok/s, TTFT p50 "
                f"{row['ttft_p50_s']:.3f} s p95 {row['ttft_p95_s']:.3f} s"
                + (f", {len(load.errors)} errors" if load.errors else "")
            )
            if "profile" in row:
                log(f"  {server.name}: engine profile, {c} streams: {fmt_profile(row['profile'])}")
    finally:
        await client.aclose()
    return out


async def settled_profile(path: Path) -> dict[str, float]:
    """The profiler's totals once they stop changing (it writes twice a second)."""
    last = read_profile(path)
    for _ in range(10):
        await asyncio.sleep(0.6)
        now = read_profile(path)
        if now == last:
            return now
        last = now
    return last


def fmt_profile(p: dict[str, Any]) -> str:
    if not p.get("steps"):
        return "no steps recorded"
    return (
        f"{p['steps']} steps of {p['rows_per_step']:.1f} rows, {p['step_ms']:.2f} ms/step: "
        f"decode {p['decode_ms']:.2f} ms ({100 * p['decode_share']:.0f}%), sampling "
        f"{p['sample_ms']:.2f} ms ({100 * p['sample_share']:.0f}%), Python {p['python_ms']:.2f} ms "
        f"({100 * p['python_share']:.0f}%; batch build {p['of_which_build_ms']:.2f}, hand-off "
        f"{p['of_which_deliver_ms']:.2f}); admission {p['admit_ms']:.2f} ms/step"
    )


def time_left(args: argparse.Namespace) -> float:
    return float(args.deadline_s - (time.monotonic() - T0))


# ---------------------------------------------------------------------------------------- report


def roofline(model: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    bw = card.get("bandwidth_gbs")
    gb = model["bytes_per_token"] / 1e9
    r: dict[str, Any] = {"bytes_per_token_gb": round(gb, 3), "bandwidth_gbs": bw}
    r["tok_s"] = round(bw / gb, 1) if bw else None
    if card.get("copy_gbs"):
        r["tok_s_at_copy_rate"] = round(card["copy_gbs"] / gb, 1)
    return r


def write_report(state: dict[str, Any], path: Path) -> None:
    card, build, a = state["card"], state["build"], state["args"]
    lines = [
        f"# Real sizes: llama.cpp backend vs llama-server and llama_cpp.server ({state['mode']})",
        "",
        f"- date: {state['date']}; elapsed {time.monotonic() - T0:.0f} s; host {platform.node()}",
        f"- card: {card.get('gpu') or 'no GPU (CPU run)'}; driver {card.get('driver') or '-'}; "
        f"memory {card.get('memory') or '-'}; CPU cores {card.get('cores')}",
        f"- memory bandwidth: {fmt(card.get('bandwidth_gbs'))} GB/s ({card.get('bandwidth_from')});"
        " "
        f"measured device copy: {fmt(card.get('copy_gbs'))} GB/s",
        f"- commit {build.get('commit', '?')[:12]} ({build.get('changed_files', '?')} changed)",
        f"- llama-cpp-python {build.get('llama_cpp_python')}; flags: {build.get('build_flags')}",
        f"- system info: `{build.get('system_info', '-')}`",
        f"- llama-server: {build.get('llama_server_version', state.get('llama_server_note'))}",
        f"- requests: {a['max_tokens']} output tokens each (EOS banned), temperature 0, "
        f"context {a['n_ctx']} per slot, {max(a['streams'])} slots on every server that "
        f"batches; engine profile in the gateway at {max(a['streams'])} streams",
        "",
    ]
    for m in state["models"]:
        rf = m.get("roofline", {})
        lines += [
            f"## {m['quant'].upper()} ({m['shape']['name']}, {m['file_bytes'] / 1e9:.3f} GB file)",
            "",
            f"- made in {m['seconds']} s: {m['how']}; tensor types {m['tensor_types']}",
            f"- bytes read per decoded token (all weights but token_embd): "
            f"{rf.get('bytes_per_token_gb')} GB; roofline at {fmt(rf.get('bandwidth_gbs'))} GB/s: "
            f"{fmt(rf.get('tok_s'))} tok/s"
            + (
                f" ({rf['tok_s_at_copy_rate']} tok/s at the measured copy rate)"
                if rf.get("tok_s_at_copy_rate")
                else ""
            ),
            "",
            "| server | batch-1 decode tok/s | of roofline | start s |",
            "| --- | ---: | ---: | ---: |",
        ]
        for s in m.get("servers", []):
            if "skipped" in s:
                lines.append(f"| {s['server']} | skipped: {s['skipped']} | | |")
                continue
            d = s.get("batch1_decode_tok_s")
            frac = f"{d / rf['tok_s']:.1%}" if d and rf.get("tok_s") else "n/a"
            lines.append(f"| {s['server']} | {fmt(d)} | {frac} | {s.get('start_s', '-')} |")
        lines += [
            "",
            "| server | streams | tok/s | TTFT p50 s | TTFT p95 s | requests | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for s in m.get("servers", []):
            for ld in s.get("loads", []):
                if "skipped" in ld:
                    skipped = f"skipped ({ld['skipped']})"
                    lines.append(f"| {s['server']} | {ld['streams']} | {skipped} |||||")
                    continue
                lines.append(
                    f"| {s['server']} | {ld['streams']} | {ld['tok_s']} | {ld['ttft_p50_s']} | "
                    f"{ld['ttft_p95_s']} | {ld['requests']} | {'; '.join(ld['errors']) or '-'} |"
                )
        gw = next((s for s in m.get("servers", []) if s["server"] == "gateway"), None)
        peer = next((s for s in m.get("servers", []) if s["server"] == "llama-server"), None)
        if gw and peer:
            lines += ["", "gateway / llama-server tok/s: " + ratios(gw, peer)]
        for s in m.get("servers", []):
            for ld in s.get("loads", []):
                if "profile" in ld:
                    lines += [
                        "",
                        f"Engine profile ({s['server']}, {ld['streams']} streams): "
                        + fmt_profile(ld["profile"]),
                    ]
        lines.append("")
    for note in state.get("notes", []):
        lines.append(f"- {note}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def ratios(gw: dict[str, Any], peer: dict[str, Any]) -> str:
    by_streams = {ld["streams"]: ld for ld in peer.get("loads", []) if "tok_s" in ld}
    parts = []
    for ld in gw.get("loads", []):
        p = by_streams.get(ld["streams"])
        if "tok_s" in ld and p and p["tok_s"]:
            parts.append(f"{ld['streams']}: {ld['tok_s'] / p['tok_s']:.2f}x")
    return ", ".join(parts) or "-"


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.1f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, nargs="?")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny models, 1/2 streams")
    ap.add_argument("--plan", action="store_true", help="print the 8B GGUF sizes and exit")
    ap.add_argument("--quants", nargs="+", default=["q4_k_m", "q8_0"], choices=["q4_k_m", "q8_0"])
    ap.add_argument("--streams", nargs="+", type=int)
    ap.add_argument("--peer-streams", nargs="+", type=int, default=[1])
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--n-ctx", type=int, default=512, help="context per slot")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--n-gpu-layers", type=int)
    ap.add_argument("--llama-server", help="binary (default: $LLAMA_SERVER, PATH, .peers)")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(SERVERS))
    ap.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the roofline")
    ap.add_argument("--models", type=Path, help="where the GGUFs go (default OUTDIR/../models)")
    ap.add_argument("--report", type=Path, help="markdown report (default OUTDIR/real-sizes.md)")
    ap.add_argument("--deadline-s", type=float, default=330.0)
    ap.add_argument("--start-timeout-s", type=float, default=120.0)
    a = ap.parse_args(argv)
    a.streams = a.streams or ([1, 2] if a.tiny else [1, 8, 32, 64])
    a.max_tokens = a.max_tokens or (16 if a.tiny else 256)
    if a.n_gpu_layers is None:
        a.n_gpu_layers = 0 if a.tiny else -1
    if a.tiny:
        a.threads = min(a.threads, 2)
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve-profiled"]:
        rest = argv[2:]
        serve_profiled(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    args = parse_args(argv)
    shape = TINY if args.tiny else LLAMA3_8B
    if args.plan:
        for quant in args.quants:
            ts = plan(shape, quant)
            total = sum(t.nbytes for t in ts)
            print(f"{shape.name} {quant}: {total:,} tensor bytes ({total / 1e9:.3f} GB), "
                  f"{bytes_per_token(ts) / 1e9:.3f} GB read per token")  # fmt: skip
        return 0
    if args.outdir is None:
        print("usage: real_sizes.py OUTDIR [--tiny] ... (or --plan)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO))

    out: Path = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models_dir = (args.models or out.parent / "real-size-models").resolve()
    report = args.report or out / "real-sizes.md"
    work = Path(tempfile.mkdtemp(prefix="real-sizes-"))
    state: dict[str, Any] = {
        "mode": "tiny CPU dry run" if args.tiny else "8B shapes",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": [],
        "notes": [],
    }

    def save() -> None:
        write_report(state, report)
        (out / "real-sizes.json").write_text(json.dumps(state, indent=1, default=str) + "\n")

    log("step card")
    state["card"] = card = card_info(args)
    log(
        f"  card {card['gpu'] or 'none (CPU)'}; driver {card['driver'] or '-'}; bandwidth "
        f"{fmt(card['bandwidth_gbs'])} GB/s ({card['bandwidth_from']}); measured copy "
        f"{fmt(card['copy_gbs'])} GB/s"
    )
    log("step build")
    server_bin = None if "llama-server" in args.skip else find_llama_server(args.llama_server)
    state["build"] = build = build_info(server_bin)
    log(f"  llama-cpp-python {build.get('llama_cpp_python')}: {build.get('system_info', '')[:150]}")
    if server_bin:
        log(f"  llama-server {server_bin}: {build['llama_server_version'].splitlines()[-1:]}")
    else:
        state["llama_server_note"] = "skipped: no llama-server binary"
        log("  skipped: no llama-server binary (scripts/build_llama_server.sh, or carry one)")
    peer_error = None if "llama_cpp.server" in args.skip else llama_cpp_server_importable()
    if peer_error:
        log(f"  llama_cpp.server cannot start here: {peer_error}")
    save()
    rc = 0
    for quant in args.quants:
        log(f"step model {quant}")
        path = models_dir / f"{shape.name}-{quant}.gguf"
        try:
            model = make_gguf(shape, quant, path)
        except Exception as err:
            log(f"  FAILED to make {path}: {type(err).__name__}: {err}")
            state["notes"].append(f"{quant}: model not made: {type(err).__name__}: {err}")
            rc = 1
            continue
        model["roofline"] = rf = roofline(model, card)
        state["models"].append(model)
        log(
            f"  {path.name}: {model['file_bytes'] / 1e9:.3f} GB in {model['seconds']} s; "
            f"{rf['bytes_per_token_gb']} GB/token -> roofline {fmt(rf['tok_s'])} tok/s "
            f"at {fmt(rf['bandwidth_gbs'])} GB/s"
        )
        ban: list[int] = model["eog_ids"]
        model["servers"] = servers = []
        save()
        plans: list[tuple[str, Callable[[Path], Any], list[int], Path | None, str | None]] = [
            (
                "gateway",
                lambda p: gateway_server(args, p, work, work / "profile.json"),
                args.streams,
                work / "profile.json",
                None,
            ),
            (
                "llama-server",
                lambda p: llama_server(args, p, server_bin or ""),
                args.streams,
                None,
                None if server_bin else "no llama-server binary",
            ),
            (
                "llama_cpp.server",
                lambda p: llama_cpp_server(args, p),
                [s for s in args.peer_streams if s <= max(args.streams)],
                None,
                f"cannot import: {peer_error}" if peer_error else None,
            ),
        ]
        for name, make, streams, profile, why_not in plans:
            if name in args.skip:
                why_not = "--skip"
            elif time_left(args) < 30:
                why_not = "deadline"
            if why_not:
                servers.append({"server": name, "skipped": why_not})
                log(f"  {name}: skipped: {why_not}")
                save()
                continue
            log(f"step serve {name} on {path.name} ({', '.join(map(str, streams))} streams)")
            if profile:
                profile.unlink(missing_ok=True)
            server = make(path)
            log_path = out / f"{quant}-{name}.log"
            try:
                servers.append(run_server(server, log_path, streams, args, ban, profile))
            except Exception as err:
                log(f"  {name} FAILED: {type(err).__name__}: {err}")
                tail = log_path.read_text()[-1500:] if log_path.exists() else ""
                servers.append({"server": name, "skipped": f"FAILED: {err}", "log_tail": tail})
                rc = 1
            save()
        if not args.tiny:
            path.unlink(missing_ok=True)  # tens of GB of disk otherwise; made again in ~a minute
    state["notes"].append(
        "Weights are random quantized blocks (not a trained model): speed depends on the tensor "
        "types and sizes only; the text is meaningless."
    )
    state["notes"].append(
        "llama_cpp.server serves one sequence at a time, so it runs at --peer-streams only."
    )
    save()
    shutil.rmtree(work, ignore_errors=True)
    log(f"step report: {report} ({'ok' if rc == 0 else 'with failures'})")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
