"""Loading a model with exllamav3: config, cache (FP16 or quantized K/V), load, generator.

exllamav3 and torch are imported inside :func:`load` only (see
:mod:`backends._exllama.runtime`). Its generator is always paged (its attention needs no
flash-attn), so up to ``max_concurrent`` sequences decode together.

Speculative decoding (``[models.<name>.speculative]``) is the generator's own: n-gram drafting
(``ngram_match_min``, ``mode = "ngram"``) or ``draft_model``/``draft_cache`` (``mode = "draft"``:
the draft is loaded first, with a cache of the same format and size), ``num_draft_tokens`` each
step.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from backends._exllama.config import PAGE_SIZE, EnginePlan, ExllamaModelConfig, plan_engine
from backends._exllama.drafting import check_draft_vocab, speculation_label
from backends._exllama.engine import JobSpec
from backends._exllama.grammar import V3Grammar, v3_filter_class
from backends._exllama.modeldir import eos_token_ids
from backends._exllama.runtime import LoadProgress, require_library, version
from backends.exllamav3.config import ExLlamaV3KVCache, ExLlamaV3ModelConfig, ExLlamaV3Speculative
from backends.exllamav3.sampling import combo_sampler_args

log = logging.getLogger("backends.exllamav3")

#: Cache positions a job needs past its last token (see exllamav3's Job.prepare_for_queue).
SPARE_TOKENS = 1


@dataclass
class ExLlamaV3Model:
    """A loaded exllamav3 model with its cache, tokenizer and generator."""

    plan: EnginePlan
    model: Any
    cache: Any
    tokenizer: Any
    generator: Any
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    special_pieces: frozenset[str]
    cache_label: str
    version: str
    _torch: Any
    _job_class: Any
    _sampler_class: Any
    _filter_class: type[V3Grammar]
    #: The draft model (speculative ``mode = "draft"``), unloaded with the model.
    draft_model: Any = None
    speculation: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.tokenizer.bos_token_id
        return bos if isinstance(bos, int) else None

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text``; ``special=False`` keeps control-token text plain.

        exllamav3 switches its tokenizer's split-special-tokens mode per call (shared state),
        hence the lock: prompts are tokenized on worker threads.
        """
        with self._lock:
            ids = self.tokenizer.encode(text, add_bos=False, encode_special_tokens=special)
        return [int(i) for i in ids[0].tolist()]

    def make_job(self, spec: JobSpec, identifier: int) -> Any:
        torch = self._torch
        filters = []
        if spec.constraint is not None:
            filters.append(self._filter_class(self.tokenizer, spec.constraint, torch.from_numpy))
        return self._job_class(
            input_ids=torch.tensor([spec.input_ids], dtype=torch.long),
            max_new_tokens=spec.max_new_tokens + self.plan.draft_tokens,
            sampler=self._sampler_class(**combo_sampler_args(spec.sampling)),
            seed=spec.sampling.seed,
            stop_conditions=list(spec.stop_token_ids),
            identifier=identifier,
            filters=filters,
            decode_special_tokens=spec.decode_special,
        )

    def cached_tokens(self, job: Any) -> int:
        return int(job.cached_pages) * PAGE_SIZE + int(job.cached_tokens)

    def kv_usage(self) -> tuple[int, int]:
        gen = self.generator
        return len(gen.pagetable.referenced_pages) * PAGE_SIZE, int(gen.max_total_tokens)

    def describe(self) -> str:
        return (
            f"exllamav3 {self.version}, {self.cache_label} cache, paged (continuous batching)"
            f"{self.speculation}"
        )

    def unload(self) -> None:
        self.generator.close()
        self.model.unload()
        if self.draft_model is not None:
            self.draft_model.unload()
        self.generator = self.cache = self.model = self.draft_model = None
        self._torch.cuda.empty_cache()


def host_tier(generator: object, host_bytes: int) -> dict[str, int]:
    """The generator's host-memory page tier (``cpu_cache_size``), if asked for; an
    exllamav3 too old to have one is an error, not a silent cache without it."""
    if not host_bytes:
        return {}
    if "cpu_cache_size" not in inspect.signature(generator).parameters:  # type: ignore[arg-type]
        raise RuntimeError(
            "kv_cache.host_cache_bytes needs an exllamav3 whose Generator takes cpu_cache_size "
            f"(installed: {version('exllamav3')})"
        )
    return {"cpu_cache_size": host_bytes}


def speculative_args(
    generator: object,
    spec: ExLlamaV3Speculative,
    plan: EnginePlan,
    draft: tuple[Any, Any] | None,
) -> dict[str, Any]:
    """``Generator`` arguments for ``spec``; ``draft``: (model, cache). An exllamav3 whose
    Generator has no n-gram drafting (before 0.0.31) is an error for ``mode = "ngram"``."""
    if spec.mode == "off":
        return {}
    args: dict[str, Any] = {"num_draft_tokens": plan.draft_tokens}
    if spec.mode == "ngram":
        if "ngram_match_min" not in inspect.signature(generator).parameters:  # type: ignore[arg-type]
            raise RuntimeError(
                'speculative.mode = "ngram" needs an exllamav3 whose Generator takes '
                f"ngram_match_min (installed: {version('exllamav3')})"
            )
        args["ngram_match_min"] = spec.ngram_min
    else:
        if draft is None:
            raise RuntimeError('speculative.mode = "draft" without a loaded draft model')
        args.update(draft_model=draft[0], draft_cache=draft[1])
    return args


def _load_model(
    lib: Any, lib_cfg: Any, kv: ExLlamaV3KVCache, plan: EnginePlan, name: str
) -> tuple[Any, Any]:
    """(model, cache) on the GPU; the cache is made first, the model's load allocates it."""
    model = lib.Model.from_config(lib_cfg)
    if kv.k_bits is None:
        cache = lib.Cache(model, max_num_tokens=plan.cache_tokens, layer_type=lib.CacheLayer_fp16)
    else:
        cache = lib.Cache(
            model,
            max_num_tokens=plan.cache_tokens,
            layer_type=lib.CacheLayer_quant,
            k_bits=kv.k_bits,
            v_bits=kv.v_bits,
        )
    model.load(
        progressbar=False,
        callback=LoadProgress(name),
        max_chunk_size=plan.chunk_tokens,
        max_batch_size=plan.max_batch_size,
    )
    return model, cache


def load(name: str, config: ExllamaModelConfig) -> ExLlamaV3Model:
    """Import exllamav3, load ``config.model_dir`` with its cache, build the generator."""
    assert isinstance(config, ExLlamaV3ModelConfig)
    lib = require_library("exllamav3", "exllamav3")
    import torch
    from exllamav3.generator.filter import Filter
    from exllamav3.generator.sampler import ComboSampler

    lib_cfg = lib.Config.from_directory(str(config.model_dir))
    plan = plan_engine(
        config, int(lib_cfg.max_position_embeddings), paged=True, spare_tokens=SPARE_TOKENS
    )
    kv, spec = config.kv_cache, config.speculative
    draft = None
    if spec.mode == "draft":  # first, as the smaller one
        draft_cfg = lib.Config.from_directory(str(spec.draft_model_dir))
        check_draft_vocab(lib_cfg.vocab_size, draft_cfg.vocab_size)
        draft = _load_model(lib, draft_cfg, kv, plan, f"{name} (draft model)")
    try:
        model, cache = _load_model(lib, lib_cfg, kv, plan, name)
    except Exception:
        if draft is not None:
            draft[0].unload()
        raise
    try:
        tokenizer = lib.Tokenizer.from_config(lib_cfg)
        generator = lib.Generator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=plan.max_batch_size,
            max_chunk_size=plan.chunk_tokens,
            **host_tier(lib.Generator, kv.host_cache_bytes),
            **speculative_args(lib.Generator, spec, plan, draft),
        )
    except Exception:
        model.unload()
        if draft is not None:
            draft[0].unload()
        raise
    return ExLlamaV3Model(
        plan=plan,
        model=model,
        cache=cache,
        tokenizer=tokenizer,
        generator=generator,
        vocab_size=int(lib_cfg.vocab_size or tokenizer.actual_vocab_size),
        stop_token_ids=eos_token_ids(config.model_dir, tokenizer.eos_token_id),
        special_pieces=frozenset(tokenizer.extended_piece_to_id),
        cache_label=kv.label,
        version=version("exllamav3"),
        _torch=torch,
        _job_class=lib.Job,
        _sampler_class=ComboSampler,
        _filter_class=v3_filter_class(Filter),
        draft_model=None if draft is None else draft[0],
        speculation=speculation_label(spec),
    )
