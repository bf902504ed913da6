"""What a llama.cpp model will hold once loaded, from its GGUF header alone (nothing loaded).

Three terms, sized the way llama.cpp sizes its buffers for the context this backend creates
(``LlamaCppBackend.start`` and ``LoadedModel._context_params``: ``n_ctx_total`` KV cells in one
unified pool padded to 256, or in one stream per sequence each padded to 256; ``n_seq``
sequences; ``n_ubatch = min(n_batch, 512)``):

* weights: the tensors' bytes. On a GPU, llama.cpp keeps the token embeddings on the host and
  puts the layers it offloads (and the output layer, when all are) on the GPUs; a model whose
  output matrix is tied to its embeddings gets a second copy of it on the GPU.
* KV cache: cells x layers x (K row + V row), each row ``head_count_kv x head size`` elements of
  ``type_k`` / ``type_v`` (quantized types in blocks of 32).
* compute: the graph's scratch buffer, the larger of the logits (``n_vocab`` floats for each of
  ``n_ubatch`` tokens) and, without flash attention, the attention scores (``n_head`` x cells
  floats per token); plus the output buffer (``n_vocab`` floats per sequence). With a GPU, the
  graph's inputs (embeddings, attention mask) get a host buffer of their own.

``tests/backends/llamacpp/test_memory.py`` checks them against the sizes llama.cpp logs (``-s``
prints the table); ``scripts/llamacpp_buffers.py`` does the same with CUDA (on an H200: every
term within 2.3%, each device's total within 0.4%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backends.llamacpp.config import LlamaCppConfig
from backends.llamacpp.gguf_file import Header, read_header, row_bytes
from gateway.backend import MemoryEstimate, MemoryOption

KV_TYPES: dict[str, int] = {"f16": 1, "q4_0": 2, "q8_0": 8}
_CTX_PAD = 256
_MAX_UBATCH = 512
_F32 = 4


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that size the KV cache and the compute graph."""

    n_layer: int
    n_embd: int
    n_head: int
    #: Per layer (some architectures vary it).
    n_head_kv: tuple[int, ...]
    head_k: int
    head_v: int
    n_vocab: int

    @classmethod
    def of(cls, header: Header) -> ModelShape:
        arch = header.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError("GGUF has no general.architecture")
        n_layer = header.integer(f"{arch}.block_count")
        n_embd = header.integer(f"{arch}.embedding_length")
        n_head = max(_per_layer(header.metadata.get(f"{arch}.attention.head_count"), n_layer))
        kv = header.metadata.get(f"{arch}.attention.head_count_kv", n_head)
        n_head_kv = _per_layer(kv, n_layer)
        head = n_embd // n_head if n_head else 0
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_k=header.integer(f"{arch}.attention.key_length", head),
            head_v=header.integer(f"{arch}.attention.value_length", head),
            n_vocab=_vocab(header),
        )

    def kv_bytes(self, cells: int, type_k: str, type_v: str, layers: Sequence[int]) -> int:
        k, v = KV_TYPES[type_k], KV_TYPES[type_v]
        per_cell = sum(
            row_bytes(k, self.head_k * self.n_head_kv[i])
            + row_bytes(v, self.head_v * self.n_head_kv[i])
            for i in layers
        )
        return cells * per_cell

    def compute_bytes(self, n_ubatch: int, cells: int, flash_attn: bool) -> int:
        """The graph's scratch buffer: the logits, or the attention scores without FA."""
        logits = _F32 * n_ubatch * (self.n_vocab + 2 * self.n_embd)
        if flash_attn:
            return logits
        scores = _F32 * n_ubatch * (cells * (self.n_head + 1) + 4 * self.n_embd)
        return max(logits, scores)


def _per_layer(value: object, n_layer: int) -> tuple[int, ...]:
    """A per-layer count given as one number or as one per layer."""
    if isinstance(value, list) and len(value) == n_layer:
        return tuple(int(x) for x in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n_layer
    raise ValueError(f"GGUF attention head count {value!r} is not a number or one per layer")


def _vocab(header: Header) -> int:
    for t in header.tensors:
        if t.name in ("token_embd.weight", "output.weight") and len(t.dims) == 2:
            return t.dims[1]
    raise ValueError("GGUF has no token_embd.weight tensor")


@dataclass(frozen=True)
class Context:
    """The context this backend creates for a config (mirrors ``LlamaCppBackend.start``)."""

    cells: int
    #: The cells one token's attention spans: all of them, or its sequence's stream.
    span: int
    n_seq: int
    n_ubatch: int
    flash_attn: bool

    @classmethod
    def of(cls, config: LlamaCppConfig) -> Context:
        n_batch = config.n_batch
        streams = config.n_seq if config.kv_cache.layout == "per_sequence" else 1
        per_stream = -(-config.n_ctx_total // streams // _CTX_PAD) * _CTX_PAD
        return cls(
            cells=per_stream * streams,
            span=per_stream,
            n_seq=config.n_seq,
            n_ubatch=min(n_batch, _MAX_UBATCH),
            flash_attn=config.flash_attention() != "off",
        )


def _layer(name: str) -> int | None:
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return None


def estimate(config: LlamaCppConfig, gpu_devices: int) -> MemoryEstimate:
    """The footprint of ``config``'s model on ``gpu_devices`` GPUs (0: on the host), with its
    draft model if it has one."""
    main = _estimate(config, gpu_devices)
    draft = draft_config(config)
    if draft is None:
        return main
    extra = _estimate(draft, gpu_devices)
    return MemoryEstimate(
        main.weights_bytes + extra.weights_bytes,
        main.kv_cache_bytes + extra.kv_cache_bytes,
        main.compute_bytes + extra.compute_bytes,
        tuple(a + b for a, b in zip(main.gpu_bytes, extra.gpu_bytes, strict=True)),
        main.host_bytes + extra.host_bytes,
        f"{main.kv_cache_shape}; draft model {draft.model_path.name}",
        main.options,
    )


def draft_config(config: LlamaCppConfig) -> LlamaCppConfig | None:
    """The draft model as :class:`backends.llamacpp.draft_model.DraftModel` loads it: the
    same cells (in one pool), sequences and batch, f16 K/V, its own GPU layers."""
    spec = config.speculative
    if spec.mode != "draft" or spec.draft_model_path is None:
        return None
    kv = config.kv_cache.model_copy(
        update={
            "type_k": "f16",
            "type_v": "f16",
            "host_cache_bytes": 0,
            "layout": "unified",
            "n_ctx": config.n_ctx_total,
            "cached_prefixes": config.kv_cache.n_cached,
        }
    )
    return config.model_copy(
        update={
            "local_path": spec.draft_model_path,
            "n_gpu_layers": spec.draft_n_gpu_layers,
            "kv_cache": kv,
            "speculative": spec.model_copy(update={"mode": "off", "draft_model_path": None}),
        }
    )


def _estimate(config: LlamaCppConfig, gpu_devices: int) -> MemoryEstimate:
    header = read_header(config.model_path)
    shape = ModelShape.of(header)
    ctx = Context.of(config)
    kv_cfg = config.kv_cache
    weights = sum(t.nbytes for t in header.tensors)
    kv = shape.kv_bytes(ctx.cells, kv_cfg.type_k, kv_cfg.type_v, range(shape.n_layer))
    graph = shape.compute_bytes(ctx.n_ubatch, ctx.span, ctx.flash_attn)
    outputs = _F32 * shape.n_vocab * ctx.n_seq
    compute = graph + outputs
    shape_text = (
        f"{config.batching.max_concurrent} slots x {kv_cfg.n_ctx_per_slot} tokens "
        f"({ctx.cells} cells, {kv_cfg.layout}), K {kv_cfg.type_k}, V {kv_cfg.type_v}"
    )
    options = _options(config, shape, ctx, kv)
    tier = kv_cfg.host_cache_bytes  # the host KV tier, at its budget
    if tier:
        shape_text += f", host KV tier {tier / (1 << 20):.0f} MiB"
    if gpu_devices == 0 or config.n_gpu_layers == 0:
        host = weights + kv + compute + tier
        return MemoryEstimate(weights, kv, compute, (0,) * gpu_devices, host, shape_text, options)
    gpu, host, weights = _place(config, header, shape, ctx, gpu_devices, graph)
    # the graph's inputs stay in host memory: the token embeddings and the attention mask
    mask = ctx.span * ctx.n_ubatch * (2 if ctx.flash_attn else _F32)
    inputs = 2 * _F32 * ctx.n_ubatch * shape.n_embd + mask
    host += outputs + inputs + tier
    return MemoryEstimate(weights, kv, compute + inputs, gpu, host, shape_text, options)


def _place(
    config: LlamaCppConfig,
    header: Header,
    shape: ModelShape,
    ctx: Context,
    devices: int,
    graph: int,
) -> tuple[tuple[int, ...], int, int]:
    """Bytes per GPU and on the host for weights, KV and the graph; and the weights' total
    (a tied output matrix is copied to the GPU)."""
    n_gpu = shape.n_layer + 1 if config.n_gpu_layers < 0 else config.n_gpu_layers
    first_gpu_layer = max(0, shape.n_layer - n_gpu)
    output_on_gpu = n_gpu > shape.n_layer
    fractions = _fractions(config.tensor_split, devices)
    offloaded = range(first_gpu_layer, shape.n_layer)
    layer_device = {il: _device(i, len(offloaded), fractions) for i, il in enumerate(offloaded)}
    gpu = [0] * devices
    host = 0
    kv_cfg = config.kv_cache
    for il in range(shape.n_layer):
        kv = shape.kv_bytes(ctx.cells, kv_cfg.type_k, kv_cfg.type_v, [il])
        if il in layer_device:
            gpu[layer_device[il]] += kv
        else:
            host += kv
    out_device = devices - 1
    names = {t.name for t in header.tensors}
    weights = 0
    for t in header.tensors:
        layer = _layer(t.name)
        weights += t.nbytes
        if t.name == "token_embd.weight":
            host += t.nbytes
            if "output.weight" not in names and output_on_gpu:  # tied: a copy on the GPU
                gpu[out_device] += t.nbytes
                weights += t.nbytes
        elif layer is not None and layer in layer_device:
            gpu[layer_device[layer]] += t.nbytes
        elif layer is None and output_on_gpu:
            gpu[out_device] += t.nbytes
        else:
            host += t.nbytes
    if output_on_gpu:
        gpu[out_device] += graph
    else:
        host += graph
    return tuple(gpu), host, weights


def _fractions(split: tuple[float, ...], devices: int) -> list[float]:
    parts = list(split[:devices]) + [0.0] * (devices - len(split)) if split else [1.0] * devices
    total = sum(parts) or 1.0
    return [p / total for p in parts]


def _device(i: int, n: int, fractions: list[float]) -> int:
    """The device of the ``i``-th of ``n`` offloaded layers under a layer split."""
    position, edge = (i + 0.5) / n, 0.0
    for device, fraction in enumerate(fractions):
        edge += fraction
        if position < edge:
            return device
    return len(fractions) - 1


def _options(
    config: LlamaCppConfig, shape: ModelShape, ctx: Context, kv: int
) -> tuple[MemoryOption, ...]:
    kv_cfg, b = config.kv_cache, config.batching
    options = []
    if "f16" in (kv_cfg.type_k, kv_cfg.type_v):
        q8 = shape.kv_bytes(ctx.cells, "q8_0", "q8_0", range(shape.n_layer))
        options.append(MemoryOption("kv_cache.type_k and type_v", '"q8_0"', kv - q8))
    if kv_cfg.n_ctx_per_slot >= 1024 and kv_cfg.n_ctx is None:
        options.append(
            MemoryOption("kv_cache.n_ctx_per_slot", str(kv_cfg.n_ctx_per_slot // 2), kv // 2)
        )
    if b.max_concurrent > 1 and kv_cfg.n_ctx is None:
        options.append(MemoryOption("batching.max_concurrent", str(b.max_concurrent // 2), kv // 2))
    if ctx.n_ubatch > 128:
        smaller = shape.compute_bytes(128, ctx.span, ctx.flash_attn)
        saved = shape.compute_bytes(ctx.n_ubatch, ctx.span, ctx.flash_attn) - smaller
        options.append(MemoryOption("batching.prefill_chunk_tokens", "128", saved))
    return tuple(o for o in options if o.saves_bytes > 0)
