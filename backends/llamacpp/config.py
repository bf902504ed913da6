"""The ``[models.<name>]`` table of a llama.cpp model, validated by pydantic.

Every error names its key (``models.<name>.kv_cache.type_k: ...``); cross-field rules are
checked here, before any model file is opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from gateway.config import BatchingConfig, FilePath, KVCacheConfig, ModelConfig, StrictModel
from gateway.hub import HubError, HubSource
from gateway.hub.spec import parse_spec
from gateway.output.formats import ToolFormatName

KVType = Literal["f16", "q8_0", "q4_0"]
KVLayout = Literal["unified", "per_sequence"]

#: llama.cpp's LLAMA_MAX_SEQ (llama_max_parallel_sequences()).
MAX_SEQUENCES = 256

#: ggml_type ids of the K/V cache types this backend offers (ggml.h).
GGML_TYPE_IDS: dict[str, int] = {"f16": 1, "q4_0": 2, "q8_0": 8}


def default_threads() -> int:
    """Decode threads: the cores this process may use, at most 4.

    Token generation on a small model is memory-bound; past ~4 threads it gains little and on a
    shared machine extra threads only contend (OpenMP spin-waits). Set ``n_threads`` to override.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class LlamaCppKVCache(KVCacheConfig):
    """KV cache policy: sizes, K/V types, prefix reuse and the LRU of finished prefixes."""

    #: Tokens one sequence may hold (prompt + completion): the model's context length as
    #: clients see it. Capped by the model's training context at load time.
    n_ctx_per_slot: int = Field(2048, ge=16)
    #: ``unified``: one pool of cells for every sequence; sequences continuing one cached
    #: prefix share its cells, but each token's attention spans the whole pool.
    #: ``per_sequence``: one stream of ``n_ctx_per_slot`` cells per sequence id (llama-server's
    #: layout): attention spans the sequence's own cells only, a shared prefix is copied, and
    #: a finished sequence stays cached in its slot until the slot is needed.
    layout: KVLayout = "per_sequence"
    #: Total KV cells shared by all sequences (live and cached), ``unified`` layout only.
    #: Default: slots x per-slot, so live sequences can always grow to their limit (cached
    #: prefixes are evicted first).
    n_ctx: int | None = Field(None, ge=16)
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    #: Place a new request on the cached sequence sharing its longest prompt prefix and
    #: prefill only the rest.
    prefix_reuse: bool = True
    #: Finished sequences kept in the cache (beyond the live slots) for later reuse, LRU.
    #: Default: 8 with the ``unified`` layout; 0 with ``per_sequence``, where each one costs a
    #: stream of ``n_ctx_per_slot`` cells (the idle slots hold the cached prefixes).
    cached_prefixes: int | None = Field(None, ge=0, le=240)

    @property
    def n_cached(self) -> int:
        """Sequence ids for cached prefixes beyond the live slots."""
        if not self.prefix_reuse:
            return 0
        if self.cached_prefixes is not None:
            return self.cached_prefixes
        return 8 if self.layout == "unified" else 0

    #: Shortest shared prefix (tokens) worth reusing.
    min_prefix_tokens: int = Field(16, ge=1)
    #: Host memory (bytes) for cached prefixes evicted from the KV cells; what it evicts in
    #: turn goes to the disk tier. 0: no host tier.
    host_cache_bytes: int = Field(0, ge=0)
    #: Disk space (bytes) for cached prefixes, kept across restarts; 0: no disk tier.
    disk_cache_bytes: int = Field(0, ge=0)
    #: Where the disk tier keeps its files (one folder per model fingerprint); default:
    #: ``$XDG_CACHE_HOME/gateway/kv`` (``~/.cache/gateway/kv``).
    disk_cache_dir: FilePath | None = None

    def disk_dir(self) -> Path:
        if self.disk_cache_dir is not None:
            return self.disk_cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "gateway" / "kv"


class LlamaCppBatching(BatchingConfig):
    """Admission limits (core) plus the engine's step budget and threads.

    ``max_concurrent`` is also the number of live slots in the engine.
    """

    #: Prompt tokens processed per decode step, across all sequences in prefill: bounds
    #: how long running streams wait for one step while a long prompt is read. 512 fills one
    #: llama.cpp micro-batch: 8 streams with 1,500-token prompts and 150-token answers took
    #: 116 s with 256, 99 s with 512, 92 s with 1,024 on a 2-core CPU (README, speculative).
    prefill_chunk_tokens: int = Field(512, ge=16, le=8192)
    n_threads: int = Field(default_factory=default_threads, ge=1, le=512)
    #: Threads for prompt processing (batches of many tokens); default: ``n_threads``.
    n_threads_batch: int | None = Field(None, ge=1, le=512)


class LlamaCppSpeculative(StrictModel):
    """``[models.<name>.speculative]``: draft several tokens per step and verify them in one
    decode (:mod:`backends.llamacpp.drafting`). Verification goes through the sequence's own
    sampler chain (:mod:`backends.llamacpp.decoding`): every token is drawn as without drafts,
    from logits that are bitwise the same on a CPU with ``flash_attn = "off"``."""

    #: ``ngram``: drafts from the sequence's own prompt and output, and from a pool of n-grams
    #: shared by the sequences of one cache salt (API key); ``draft``: a small GGUF model with
    #: the same vocabulary (``draft_model_path``) drafts; ``off``: one token per step.
    mode: Literal["off", "ngram", "draft"] = "ngram"
    #: Most tokens drafted for one sequence in one step (the length adapts to acceptance).
    #: 64, as llama-server's ngram-mod: a likely copy may be drafted long (llama.cpp's CPU flash
    #: attention switches to a tiled kernel from 64 queries a step).
    draft_max: int = Field(64, ge=1, le=256)
    #: Shortest n-gram matched in the context; longer matches (up to ``ngram_max``) win.
    ngram_min: int = Field(2, ge=1, le=16)
    ngram_max: int = Field(6, ge=1, le=32)
    #: ``measured``: verify the draft tokens expected to pay for the time they add to a step
    #: (from each sequence's acceptance so far and this machine's measured step times);
    #: ``always``: verify every drafted token (within ``draft_max`` and ``max_step_draft``).
    policy: Literal["measured", "always"] = "measured"
    #: Draft tokens one step may verify across all sequences.
    max_step_draft: int = Field(128, ge=1, le=4096)
    #: The draft model (``mode = "draft"``): a GGUF sharing the main model's vocabulary.
    draft_model_path: FilePath | None = None
    #: Layers of the draft model offloaded to the GPU: -1 = all.
    draft_n_gpu_layers: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _check(self) -> LlamaCppSpeculative:
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must be <= ngram_max")
        if (self.mode == "draft") != (self.draft_model_path is not None):
            raise ValueError('draft_model_path goes with mode = "draft" (and it needs one)')
        return self


class NotFetched(ValueError):
    """A Hub model's path was asked for before its files were fetched."""


class LlamaCppConfig(ModelConfig):
    publishes_kv_events: ClassVar[bool] = True

    backend: str = "llamacpp"
    #: The GGUF file (``model_path`` in config.toml; exactly one of it and ``hf``). For a split
    #: GGUF, its first shard (``-00001-of-0000N.gguf``): llama.cpp loads the rest beside it.
    local_path: FilePath | None = Field(None, alias="model_path")
    #: A Hugging Face Hub repo (``org/repo``) to fetch the GGUF from, into the HF cache.
    hf: str | None = None
    #: The file in ``hf`` (default: picked by ``quant``).
    file: str | None = None
    #: A quant tag (``Q4_K_M``) picking the file in ``hf``, case-insensitively; default: Q4_K_M,
    #: else Q4_0, Q4_1, Q8_0, else the first GGUF.
    quant: str | None = None
    #: Branch, tag or commit of ``hf``.
    revision: str = "main"
    #: A Jinja chat template file overriding the GGUF's ``tokenizer.chat_template``.
    chat_template_file: FilePath | None = None
    #: How the model writes tool calls (default: detected from the chat template).
    tool_format: ToolFormatName | None = None
    #: Steer constrained answers (JSON, forced tool calls) to finish within ``max_tokens``
    #: (:mod:`gateway.output.finish`); off: they may be cut off (``length``), as elsewhere.
    budget_steering: bool = True
    #: Limits for rendering the chat template.
    template_render_timeout_s: float = Field(1.0, gt=0, le=60)
    template_max_output_bytes: int = Field(4_000_000, ge=1024)
    kv_cache: LlamaCppKVCache = LlamaCppKVCache()
    batching: LlamaCppBatching = LlamaCppBatching()
    speculative: LlamaCppSpeculative = LlamaCppSpeculative()
    #: Layers offloaded to the GPU: -1 = all (ignored on a CPU-only build).
    n_gpu_layers: int = Field(-1, ge=-1)
    #: Flash attention: "auto" lets llama.cpp decide; quantized V cache needs it on.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    main_gpu: int = Field(0, ge=0)
    #: Fraction of the model per GPU, e.g. [0.5, 0.5]; empty = llama.cpp's default split.
    tensor_split: tuple[float, ...] = ()
    #: An embedding model: serves ``/v1/embeddings`` only (every model serves it; this one
    #: serves nothing else, and its whole input is run in one batch, as encoders need).
    embeddings: bool = False
    #: How token vectors become one embedding; default: the GGUF's ``<arch>.pooling_type``,
    #: else "mean".
    pooling: Literal["mean", "cls", "last"] | None = None
    #: Scale embeddings to unit length (as OpenAI's are).
    normalize_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self) -> LlamaCppConfig:
        if (self.local_path is None) == (self.hf is None):
            raise ValueError("give exactly one of model_path (a GGUF file) and hf (org/repo)")
        if self.hf is None and (self.file or self.quant or self.revision != "main"):
            raise ValueError("file, quant and revision go with hf (a Hub repo)")
        if self.hf is not None:
            try:
                self.hub_source()
            except HubError as err:
                raise ValueError(f"hf: {err}") from None
        kv = self.kv_cache
        quantized = [k for k in ("type_k", "type_v") if getattr(kv, k) != "f16"]
        if quantized and self.flash_attn == "off":
            raise ValueError(
                f"kv_cache.{quantized[0]} = {getattr(kv, quantized[0])!r} needs flash "
                "attention in llama.cpp: set flash_attn = 'on' (or 'auto')"
            )
        need = kv.n_ctx_per_slot * self.batching.max_concurrent
        if kv.n_ctx is not None and kv.n_ctx < need:
            raise ValueError(
                f"kv_cache.n_ctx = {kv.n_ctx} is less than batching.max_concurrent x "
                f"kv_cache.n_ctx_per_slot = {need}: live sequences could run out of KV cells"
            )
        if kv.n_ctx is not None and kv.layout == "per_sequence":
            raise ValueError(
                "kv_cache.n_ctx sizes the unified pool: with layout = 'per_sequence' every "
                "sequence has kv_cache.n_ctx_per_slot cells"
            )
        if self.n_seq > MAX_SEQUENCES:
            raise ValueError(
                f"batching.max_concurrent + kv_cache.cached_prefixes = {self.n_seq}: llama.cpp "
                f"runs at most {MAX_SEQUENCES} sequences in one context"
            )
        if any(x < 0 for x in self.tensor_split) or (
            self.tensor_split and sum(self.tensor_split) <= 0
        ):
            raise ValueError("tensor_split: fractions must be >= 0 with a positive sum")
        return self

    @property
    def model_path(self) -> Path:
        """The GGUF to load (for ``hf``: once fetched, see :meth:`with_local_files`)."""
        if self.local_path is None:
            raise NotFetched(f"{self.hf}: not fetched from the Hub yet")
        return self.local_path

    def hub_source(self) -> HubSource | None:
        if self.hf is None or self.local_path is not None:
            return None
        spec = parse_spec(self.hf, revision=self.revision)  # "org/repo:QUANT" works too
        return HubSource(spec.repo, self.file or spec.file, self.quant or spec.quant, spec.revision)

    def with_local_files(self, path: Path) -> LlamaCppConfig:
        return self.model_copy(update={"local_path": path})

    @property
    def n_seq(self) -> int:
        """The context's sequence ids: the live slots and the cached prefixes beyond them."""
        return self.batching.max_concurrent + self.kv_cache.n_cached

    @property
    def n_ctx_total(self) -> int:
        """The context's KV cells, all sequences together."""
        kv = self.kv_cache
        if kv.layout == "per_sequence":
            return kv.n_ctx_per_slot * self.n_seq
        return kv.n_ctx or kv.n_ctx_per_slot * self.batching.max_concurrent

    @property
    def n_batch(self) -> int:
        """Tokens one decode step may hold: every live sequence's next token, plus a prefill
        chunk or (speculating) up to ``max_step_draft`` drafts (a step reading a prompt drafts
        nothing)."""
        b = self.batching
        extra = b.prefill_chunk_tokens
        if self.speculative.mode != "off":
            extra = max(extra, self.speculative.max_step_draft)
        return extra + b.max_concurrent

    @property
    def n_threads_batch(self) -> int:
        return self.batching.n_threads_batch or self.batching.n_threads

    def flash_attention(self) -> Literal["auto", "on", "off"]:
        """The flash-attention setting the context gets: quantized K/V need it on; ``auto``
        lets llama.cpp decide (on, on a CPU).

        On a CPU, llama.cpp's flash attention adds up a step's single query in another order
        than several (a kernel split over the cache for one query, from 512 cells), so a token's
        logits can differ slightly between a plain step and a step verifying drafts, and
        speculative decoding can then write another text at a near-tie. With ``flash_attn =
        "off"`` logits are bitwise the same, but turning it off by default costs far more than
        it saves: plain attention reads every cell of the unified cache, cached prefixes of
        other conversations included, while flash attention skips masked cells (8 chat streams
        next to four cached ~1,300-token prefixes, no drafts: 33 vs 69 tok/s)."""
        if self.flash_attn != "auto":
            return self.flash_attn
        if "f16" not in (self.kv_cache.type_k, self.kv_cache.type_v):
            return "on"
        return "auto"

    @property
    def flash_attn_type(self) -> int:
        """llama.cpp's LLAMA_FLASH_ATTN_TYPE_*: auto -1, off 0, on 1."""
        return {"auto": -1, "off": 0, "on": 1}[self.flash_attention()]
