"""What an ExLlama model will hold once loaded, from its directory's headers (nothing loaded).

* weights: the bytes of every tensor in the ``*.safetensors`` headers (EXL2/EXL3 quantized
  tensors are stored as they are loaded). The token embeddings stay in host memory, as both
  libraries keep them; everything else goes to the GPU (``load_autosplit`` fills the first GPU
  first: the estimate puts it all on GPU 0).
* KV cache: the engine plan's cache tokens x layers x K and V (``num_key_value_heads x
  head_dim`` each), at 2 bytes per value in FP16, or ``bits / 8`` plus one FP16 scale per 32
  values when quantized.
* compute: a rough figure, not checked against the libraries' allocations: FP32 logits for the
  batch plus FP16 activations (hidden x 4 + intermediate x 2) for one prefill chunk.
* a draft model (speculative decoding) is counted the same way, from its own directory, with
  a cache of the main cache's tokens and format.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from backends._exllama.config import EnginePlan, ExllamaModelConfig, plan_engine
from gateway.backend import MemoryEstimate, MemoryOption

_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "tok_embeddings.weight")


def safetensors_bytes(path: Path) -> tuple[int, int]:
    """(all tensor bytes, token-embedding bytes) from one file's header."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise ValueError(f"{path}: implausible safetensors header size {size}")
        header = json.loads(f.read(size))
    total = embeddings = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        total += end - start
        if name.endswith(_EMBEDDINGS):
            embeddings += end - start
    return total, embeddings


def _kv_value_bytes(bits: int | None) -> float:
    return 2.0 if bits is None else bits / 8 + 2 / 32


@dataclass(frozen=True, slots=True)
class _ModelShape:
    """What the estimate reads from one model directory."""

    weights: int
    embeddings: int
    layers: int
    kv_width: int  # num_key_value_heads x head_dim
    hidden: int
    intermediate: int
    vocab: int
    max_position_embeddings: int

    @classmethod
    def read(cls, model_dir: Path) -> _ModelShape:
        try:
            hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{model_dir}/config.json: {err}") from None
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{model_dir} has no *.safetensors file")
        weights = embeddings = 0
        for path in files:
            total, embd = safetensors_bytes(path)
            weights, embeddings = weights + total, embeddings + embd
        text = hf.get("text_config", hf)
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        return cls(
            weights=weights,
            embeddings=embeddings,
            layers=int(text["num_hidden_layers"]),
            kv_width=kv_heads * head_dim,
            hidden=hidden,
            intermediate=int(text.get("intermediate_size", 4 * hidden)),
            vocab=int(text["vocab_size"]),
            max_position_embeddings=int(text.get("max_position_embeddings", 2048)),
        )

    def kv_bytes(self, tokens: int, k_bits: int | None, v_bits: int | None) -> int:
        per_token = (
            self.layers * self.kv_width * (_kv_value_bytes(k_bits) + _kv_value_bytes(v_bits))
        )
        return int(tokens * per_token)

    def compute_bytes(self, plan: EnginePlan) -> int:
        return 4 * self.vocab * plan.max_batch_size + 2 * plan.chunk_tokens * (
            4 * self.hidden + 2 * self.intermediate
        )


def estimate(
    config: ExllamaModelConfig,
    gpu_devices: int,
    *,
    k_bits: int | None,
    v_bits: int | None,
    paged: bool,
    spare_tokens: int = 0,
) -> MemoryEstimate:
    """``k_bits``/``v_bits``: the cache's bits per value (None: FP16).

    A draft model (``speculative.mode = "draft"``) adds its own weights, its cache (the main
    cache's tokens and format, its own layers and heads) and its compute buffers.
    """
    main = _ModelShape.read(config.model_dir)
    spec = config.speculative
    shapes = [main]
    if spec.mode == "draft" and spec.draft_model_dir is not None:
        shapes.append(_ModelShape.read(spec.draft_model_dir))
    plan = plan_engine(config, main.max_position_embeddings, paged=paged, spare_tokens=spare_tokens)
    weights = sum(m.weights for m in shapes)
    embeddings = sum(m.embeddings for m in shapes)
    kv = sum(m.kv_bytes(plan.cache_tokens, k_bits, v_bits) for m in shapes)
    compute = sum(m.compute_bytes(plan) for m in shapes)
    total = weights + kv + compute
    on_gpu = total - embeddings
    gpu = (on_gpu,) + (0,) * (gpu_devices - 1) if gpu_devices else ()
    options = []
    if k_bits is None:
        saved = kv - sum(m.kv_bytes(plan.cache_tokens, 8, 8) for m in shapes)
        options.append(MemoryOption("kv_cache (8-bit cache)", "q8 / k_bits = v_bits = 8", saved))
    if plan.cache_tokens >= 2 * 256:
        options.append(
            MemoryOption("kv_cache.size_tokens", str(plan.cache_tokens // 2 // 256 * 256), kv // 2)
        )
    return MemoryEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv,
        compute_bytes=compute,
        gpu_bytes=gpu,
        # exllamav3's pinned host tier for evicted pages, at its budget
        host_bytes=(embeddings if gpu_devices else total)
        + getattr(config.kv_cache, "host_cache_bytes", 0),
        kv_cache_shape=(
            f"{plan.cache_tokens} tokens shared by {plan.max_batch_size} sequence(s), "
            f"{'fp16' if k_bits is None else f'K {k_bits}-bit, V {v_bits}-bit'}"
            + (", with the draft model's cache" if len(shapes) > 1 else "")
        ),
        options=tuple(options),
    )
