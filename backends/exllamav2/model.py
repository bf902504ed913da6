"""Loading a model with ExLlamaV2 0.3.x: config, cache class, autosplit load, dynamic generator.

exllamav2 and torch are imported inside :func:`load` only (see
:mod:`backends._exllama.runtime`). ExLlamaV2's paged mode (continuous batching) needs
flash-attn with paged attention; without it the generator is unpaged and runs one job at a time,
which this backend logs at startup and reports as ``max_concurrent = 1``.

Speculative decoding (``[models.<name>.speculative]``) is the generator's own: ``use_ngram_draft``
(``mode = "ngram"``) or ``draft_model``/``draft_cache`` (``mode = "draft"``: the draft is loaded
first, configured like the model, with a cache of the same class and size), ``num_draft_tokens``
each step.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from backends._exllama.config import EnginePlan, ExllamaModelConfig, plan_engine
from backends._exllama.drafting import check_draft_vocab, speculation_label
from backends._exllama.engine import JobSpec
from backends._exllama.grammar import V2Grammar, v2_filter_class
from backends._exllama.modeldir import eos_token_ids
from backends._exllama.runtime import LoadProgress, require_library, version
from backends.exllamav2.config import CacheMode, ExLlamaV2ModelConfig, ExLlamaV2Speculative
from backends.exllamav2.sampling import padded_vocab, settings_fields
from gateway.errors import EngineError

log = logging.getLogger("backends.exllamav2")

#: Tokens the generator evaluates per sequence per decode step (its ``max_q_size`` default).
MAX_Q_SIZE = 8

_CACHE_CLASSES: dict[CacheMode, str] = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}


def decide_paged(setting: Literal["auto", "on", "off"], flash_attn_paged: bool) -> bool:
    """Paged mode from ``batching.paged`` and whether flash-attn's paged attention is usable."""
    if setting == "off":
        return False
    if setting == "on" and not flash_attn_paged:
        raise EngineError(
            "batching.paged = 'on' needs flash-attn >= 2.5.7 (paged attention), which is not "
            "installed or is disabled for this model (or its draft model); set paged = 'auto' "
            "to run unpaged"
        )
    return flash_attn_paged


def q_size(plan: EnginePlan) -> int:
    """The generator's ``max_q_size``: a drafting step evaluates the last token and its drafts
    (the library only asserts ``num_draft_tokens <= max_q_size``, one short)."""
    return max(MAX_Q_SIZE, plan.draft_tokens + 1)


def model_batch_size(plan: EnginePlan) -> int:
    """``ExLlamaV2Config.max_batch_size`` for the generator's check
    ``max_batch_size * max_input_len >= generator batch * max_q_size``."""
    return max(1, math.ceil(plan.max_batch_size * q_size(plan) / plan.chunk_tokens))


def configure(lib_cfg: Any, plan: EnginePlan, *, paged: bool) -> None:
    """Size an ``ExLlamaV2Config`` (the model's or its draft's) for ``plan``.

    ``max_seq_len`` covers the positions a job's last drafts take past its context.
    """
    if not paged:
        lib_cfg.no_flash_attn = True
    lib_cfg.max_seq_len = plan.max_seq_len + plan.draft_tokens
    lib_cfg.max_input_len = plan.chunk_tokens
    lib_cfg.max_attention_size = plan.chunk_tokens**2
    lib_cfg.max_batch_size = model_batch_size(plan)


def speculative_args(
    spec: ExLlamaV2Speculative, plan: EnginePlan, draft: tuple[Any, Any] | None
) -> dict[str, Any]:
    """``ExLlamaV2DynamicGenerator`` arguments for ``spec``; ``draft``: (model, cache)."""
    args: dict[str, Any] = {"max_q_size": q_size(plan)}
    if spec.mode == "ngram":
        args.update(use_ngram_draft=True, max_ngram=spec.ngram_max)
    elif spec.mode == "draft":
        if draft is None:
            raise EngineError('speculative.mode = "draft" without a loaded draft model')
        args.update(draft_model=draft[0], draft_cache=draft[1])
    if spec.mode != "off":
        args["num_draft_tokens"] = plan.draft_tokens
    return args


@dataclass
class ExLlamaV2Model:
    """A loaded ExLlamaV2 model with its cache, tokenizer and dynamic generator."""

    plan: EnginePlan
    model: Any
    cache: Any
    tokenizer: Any
    generator: Any
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    special_pieces: frozenset[str]
    cache_mode: CacheMode
    version: str
    _torch: Any
    _job_class: Any
    _settings_class: Any
    _filter_class: type[V2Grammar]
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

        ExLlamaV2's own ``encode_special_tokens=False`` does not: the Hugging Face tokenizer
        under it matches added tokens anyway unless told to split them
        (``encode_special_tokens`` on the ``tokenizers`` object). That flag is shared state,
        hence the lock. SentencePiece models never parse control-token text.
        """
        with self._lock:
            hf = getattr(self.tokenizer.tokenizer_model, "hf_tokenizer", None)
            if hf is not None and hasattr(hf, "encode_special_tokens"):
                hf.encode_special_tokens = not special
            ids = self.tokenizer.encode(text, add_bos=False, encode_special_tokens=special)
        return [int(i) for i in ids[0].tolist()]

    def make_job(self, spec: JobSpec, identifier: int) -> Any:
        torch = self._torch
        settings = self._settings_class(**settings_fields(spec.sampling))
        if spec.sampling.logit_bias:
            bias = torch.zeros((padded_vocab(self.vocab_size),), dtype=torch.float)
            for token, value in spec.sampling.logit_bias:
                bias[token] = value
            settings.token_bias = bias
        filters = []
        if spec.constraint is not None:
            grammar = self._filter_class(
                self.model, self.tokenizer, spec.constraint, torch.from_numpy
            )
            filters.append(grammar)
        return self._job_class(
            input_ids=torch.tensor([spec.input_ids], dtype=torch.long),
            max_new_tokens=spec.max_new_tokens + self.plan.draft_tokens,
            gen_settings=settings,
            seed=spec.sampling.seed,
            stop_conditions=list(spec.stop_token_ids),
            identifier=identifier,
            filters=filters,
            decode_special_tokens=spec.decode_special,
        )

    def cached_tokens(self, job: Any) -> int:
        return int(job.cached_pages) * int(self.generator.page_size) + int(job.cached_tokens)

    def kv_usage(self) -> tuple[int, int]:
        gen = self.generator
        return len(gen.referenced_pages) * int(gen.page_size), int(gen.max_total_tokens)

    def describe(self) -> str:
        mode = (
            "paged (continuous batching)"
            if self.plan.paged
            else "unpaged: one sequence at a time (flash-attn with paged attention is not in use)"
        )
        return f"exllamav2 {self.version}, {self.cache_mode} cache, {mode}{self.speculation}"

    def unload(self) -> None:
        for pool in ("sampling_pool", "filter_pool"):
            executor = getattr(self.generator, pool, None)
            if executor is not None:
                executor.shutdown(wait=False)
        self.model.unload()
        if self.draft_model is not None:
            self.draft_model.unload()
        self.generator = self.cache = self.model = self.draft_model = None
        self._torch.cuda.empty_cache()


def _load_model(
    lib: Any, lib_cfg: Any, cache_class: Any, plan: EnginePlan, name: str
) -> tuple[Any, Any]:
    """(model, cache) on the GPU, split across devices as ``load_autosplit`` fills them."""
    model = lib.ExLlamaV2(lib_cfg)
    cache = cache_class(model, max_seq_len=plan.cache_tokens, lazy=True)
    model.load_autosplit(cache, progress=False, callback=LoadProgress(name))
    return model, cache


def load(name: str, config: ExllamaModelConfig) -> ExLlamaV2Model:
    """Import exllamav2, load ``config.model_dir`` with its cache, build the generator."""
    assert isinstance(config, ExLlamaV2ModelConfig)
    lib = require_library("exllamav2", "exllamav2")
    import torch
    from exllamav2 import attn as exl2_attn
    from exllamav2.generator import (
        ExLlamaV2DynamicGenerator,
        ExLlamaV2DynamicJob,
        ExLlamaV2Sampler,
    )
    from exllamav2.generator.filters import ExLlamaV2Filter

    lib_cfg = lib.ExLlamaV2Config(str(config.model_dir))
    lib_cfg.arch_compat_overrides()
    spec = config.speculative
    draft_cfg = None
    if spec.mode == "draft":
        draft_cfg = lib.ExLlamaV2Config(str(spec.draft_model_dir))
        draft_cfg.arch_compat_overrides()
        check_draft_vocab(int(lib_cfg.vocab_size), int(draft_cfg.vocab_size))
    configs = [c for c in (lib_cfg, draft_cfg) if c is not None]
    usable = bool(exl2_attn.has_flash_attn_with_paged) and not any(c.no_flash_attn for c in configs)
    paged = decide_paged(config.batching.paged, usable)
    plan = plan_engine(config, int(lib_cfg.max_seq_len), paged=paged)
    if not paged:
        log.warning(
            "model %s: exllamav2 runs unpaged (%s): one sequence at a time, "
            "requests queue in admission (max_concurrent = 1)",
            name,
            "batching.paged = 'off'" if config.batching.paged == "off" else "no flash-attn",
        )
    for c in configs:
        configure(c, plan, paged=paged)

    cache_class = getattr(lib, _CACHE_CLASSES[config.kv_cache.mode])
    draft = None
    if draft_cfg is not None:  # first, as the smaller one, where autosplit starts
        draft = _load_model(lib, draft_cfg, cache_class, plan, f"{name} (draft model)")
    try:
        model, cache = _load_model(lib, lib_cfg, cache_class, plan, name)
    except Exception:
        if draft is not None:
            draft[0].unload()
        raise
    try:
        tokenizer = lib.ExLlamaV2Tokenizer(lib_cfg)
        generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=plan.max_batch_size,
            max_chunk_size=plan.chunk_tokens,
            paged=paged,
            **speculative_args(spec, plan, draft),
        )
    except Exception:
        model.unload()
        if draft is not None:
            draft[0].unload()
        raise
    return ExLlamaV2Model(
        plan=plan,
        model=model,
        cache=cache,
        tokenizer=tokenizer,
        generator=generator,
        vocab_size=int(lib_cfg.vocab_size),
        stop_token_ids=eos_token_ids(config.model_dir, tokenizer.eos_token_id),
        special_pieces=frozenset(tokenizer.extended_piece_to_id),
        cache_mode=config.kv_cache.mode,
        version=version("exllamav2"),
        _torch=torch,
        _job_class=ExLlamaV2DynamicJob,
        _settings_class=ExLlamaV2Sampler.Settings,
        _filter_class=v2_filter_class(ExLlamaV2Filter),
        draft_model=None if draft is None else draft[0],
        speculation=speculation_label(spec),
    )
