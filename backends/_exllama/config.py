"""Config shared by the ExLlamaV2 and ExLlamaV3 backends, and the engine plan derived from it.

Both libraries page their KV cache in pages of 256 tokens, so cache sizes and prefill chunks
are multiples of 256. ``batching.max_concurrent`` is also the generator's ``max_batch_size``:
the sequences it decodes together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from gateway.config import BatchingConfig, FilePath, KVCacheConfig, ModelConfig, StrictModel
from gateway.hub import HubError, HubSource, parse_spec
from gateway.output.formats import ToolFormatName

PAGE_SIZE = 256


def _multiple_of_page(value: int | None) -> int | None:
    if value is not None and value % PAGE_SIZE:
        raise ValueError(f"must be a multiple of {PAGE_SIZE} (the cache page size), got {value}")
    return value


class ExllamaBatching(BatchingConfig):
    """Admission limits (core) plus the generator's prefill chunk.

    ``max_concurrent`` is the generator's ``max_batch_size``.
    """

    #: Prompt tokens ingested per forward pass: bounds how long running streams wait while a
    #: long prompt is read. A multiple of 256.
    prefill_chunk_tokens: int = Field(2048, ge=PAGE_SIZE, le=65536)

    _page = field_validator("prefill_chunk_tokens")(_multiple_of_page)


class ExllamaKVCache(KVCacheConfig):
    """Cache sizes; the version-specific tables add the cache's number format."""

    #: Tokens one sequence may hold (prompt + completion): the context length clients see.
    #: Default: the model's (``max_position_embeddings`` in config.json).
    max_seq_len: int | None = Field(None, ge=PAGE_SIZE)
    #: Tokens the whole cache holds, shared by all sequences, live and cached (prefix reuse).
    #: A multiple of 256. Default: ``max_seq_len`` rounded up to a page. A job reserves pages
    #: for its prompt and its ``max_tokens`` when it starts; jobs that do not fit wait in the
    #: generator's queue.
    size_tokens: int | None = Field(None, ge=PAGE_SIZE)

    _page = field_validator("size_tokens")(_multiple_of_page)

    @model_validator(mode="after")
    def _check_sizes(self) -> Self:
        if (
            self.size_tokens is not None
            and self.max_seq_len is not None
            and self.size_tokens < self.max_seq_len
        ):
            raise ValueError(
                f"size_tokens = {self.size_tokens} is less than max_seq_len = "
                f"{self.max_seq_len}: one sequence could never reach its context length"
            )
        return self


class ExllamaSpeculative(StrictModel):
    """``[models.<name>.speculative]``: the generator drafts tokens and verifies them with the
    model in one forward pass (the libraries' own speculative decoding). A drafted token is kept
    only where the model's sampling gives that token, so the text is what decoding without
    drafts gives. Drafting pays off with few concurrent sequences; with many, a step is
    compute-bound and the drafts cost more than they save.

    The version tables add their n-gram knob (ExLlamaV2: ``ngram_max``, ExLlamaV3: ``ngram_min``).
    """

    #: ``ngram``: drafts from n-grams of the sequence's own prompt and output; ``draft``: a small
    #: EXL2/EXL3 model sharing the main model's vocabulary (``draft_model_dir``) drafts;
    #: ``off``: one token per step.
    mode: Literal["off", "ngram", "draft"] = "off"
    #: Tokens drafted per sequence per step (the generator's ``num_draft_tokens``, fixed). Each
    #: job reserves this many cache positions past its completion for the drafts.
    num_draft_tokens: int = Field(4, ge=1, le=32)
    #: The draft model (``mode = "draft"``): a model directory like ``model_dir``, loaded with
    #: its own cache of the main cache's size and format.
    draft_model_dir: FilePath | None = None

    @model_validator(mode="after")
    def _check_draft(self) -> Self:
        if (self.mode == "draft") != (self.draft_model_dir is not None):
            raise ValueError('draft_model_dir goes with mode = "draft" (and it needs one)')
        return self

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per step: 0 when off."""
        return 0 if self.mode == "off" else self.num_draft_tokens


class ExllamaModelConfig(ModelConfig):
    #: A model directory: config.json, *.safetensors, tokenizer.json, tokenizer_config.json
    #: (``model_dir`` in config.toml; exactly one of it and ``hf``).
    local_dir: FilePath | None = Field(None, alias="model_dir")
    #: A Hugging Face Hub repo (``org/repo``) holding such a folder (an EXL2/EXL3 quant),
    #: fetched whole into the HF cache; ``revision`` picks its branch (EXL2 repos keep one
    #: bitrate per branch, e.g. ``4.0bpw``).
    hf: str | None = None
    revision: str = "main"
    #: A Jinja chat template file overriding tokenizer_config.json's ``chat_template``.
    chat_template_file: FilePath | None = None
    #: How the model writes tool calls (default: detected from the chat template).
    tool_format: ToolFormatName | None = None
    #: Steer constrained answers (JSON, forced tool calls) to finish within ``max_tokens``
    #: (:mod:`gateway.output.finish`); off: they may be cut off (``length``), as elsewhere.
    budget_steering: bool = True
    #: Limits for rendering the chat template (it is untrusted code, run in a sandbox).
    template_render_timeout_s: float = Field(1.0, gt=0, le=60)
    template_max_output_bytes: int = Field(4_000_000, ge=1024)
    kv_cache: ExllamaKVCache = ExllamaKVCache()
    batching: ExllamaBatching = ExllamaBatching()
    speculative: ExllamaSpeculative = ExllamaSpeculative()

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.local_dir is None) == (self.hf is None):
            raise ValueError("give exactly one of model_dir (a folder) and hf (org/repo)")
        if self.hf is None and self.revision != "main":
            raise ValueError("revision goes with hf (a Hub repo)")
        if self.hf is not None:
            try:
                self.hub_source()
            except HubError as err:
                raise ValueError(f"hf: {err}") from None
        return self

    @property
    def model_dir(self) -> Path:
        """The model folder (for ``hf``: once fetched, see :meth:`with_local_files`)."""
        if self.local_dir is None:
            raise ValueError(f"{self.hf}: not downloaded from the Hub yet")
        return self.local_dir

    def hub_source(self) -> HubSource | None:
        if self.hf is None or self.local_dir is not None:
            return None
        spec = parse_spec(self.hf, revision=self.revision, kind="folder")
        if spec.file or spec.quant:
            raise HubError(f"{self.hf}: an ExLlama model is a whole repo (org/repo), not a file")
        return spec

    def with_local_files(self, path: Path) -> Self:
        return self.model_copy(update={"local_dir": path})


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """What the engine is built with, once the model's own context length is known."""

    max_seq_len: int
    cache_tokens: int
    max_batch_size: int
    chunk_tokens: int
    paged: bool
    #: Tokens the generator drafts per sequence per step (0: no speculative decoding). A job is
    #: made with this many more ``max_new_tokens`` than asked: both libraries end a drafting
    #: job that many tokens early, keeping the room for its last drafts.
    draft_tokens: int = 0

    @property
    def max_concurrent(self) -> int:
        return self.max_batch_size


def round_up_to_page(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE) * PAGE_SIZE


def plan_engine(
    config: ExllamaModelConfig, model_max_seq_len: int, *, paged: bool, spare_tokens: int = 0
) -> EnginePlan:
    """Sizes for the cache and generator.

    Unpaged (ExLlamaV2 without flash-attn), the cache is one page holding one sequence: its size
    is the context length and the batch is 1. ``spare_tokens``: cache positions a job needs
    beyond its prompt and completion (exllamav3 keeps one free past the last token); the
    speculative table's drafted tokens are added to them.
    """
    kv = config.kv_cache
    draft_tokens = config.speculative.draft_tokens
    spare_tokens += draft_tokens
    seq_len = kv.max_seq_len or model_max_seq_len
    if seq_len < PAGE_SIZE:
        raise ValueError(
            f"the context length ({seq_len} tokens) is shorter than one cache page ({PAGE_SIZE})"
        )
    if paged:
        cache = kv.size_tokens or round_up_to_page(seq_len + spare_tokens)
        batch = config.batching.max_concurrent
    else:  # the one page holds one sequence: more would never be used
        cache = round_up_to_page(min(seq_len, kv.size_tokens or seq_len) + spare_tokens)
        batch = 1
    seq_len = min(seq_len, cache - spare_tokens)
    chunk = min(
        config.batching.prefill_chunk_tokens, max(PAGE_SIZE, seq_len // PAGE_SIZE * PAGE_SIZE)
    )
    return EnginePlan(
        max_seq_len=seq_len,
        cache_tokens=cache,
        max_batch_size=batch,
        chunk_tokens=chunk,
        paged=paged,
        draft_tokens=draft_tokens,
    )
