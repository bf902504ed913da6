"""Stand-ins for the exllamav2/exllamav3 modules (and torch), to run the real loaders on a CPU.

Only what ``backends.exllamav2.model.load`` and ``backends.exllamav3.model.load`` touch: every
class records what it was made with, so a test can read which model, cache and generator
arguments the loader chose. Nothing computes. :func:`install` puts the modules in
``sys.modules`` and points the loader's ``require_library`` at them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest


@dataclass
class Record:
    """Everything the fake libraries were asked to make, in order."""

    models: list[Any] = field(default_factory=list)
    caches: list[Any] = field(default_factory=list)
    generators: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def generator(self) -> dict[str, Any]:
        (args,) = self.generators
        return args


def _torch() -> ModuleType:
    torch = ModuleType("torch")
    torch.long = "long"  # type: ignore[attr-defined]
    torch.float = "float"  # type: ignore[attr-defined]
    torch.tensor = lambda data, dtype=None: data  # type: ignore[attr-defined]
    torch.from_numpy = lambda a: a  # type: ignore[attr-defined]
    torch.cuda = SimpleNamespace(empty_cache=lambda: None)  # type: ignore[attr-defined]
    return torch


def _module(name: str, **attrs: Any) -> ModuleType:
    mod = ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


class _Model:
    """A model of either library: its config, how it was loaded, whether it was unloaded."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.load_args: dict[str, Any] | None = None
        self.unloaded = False

    def unload(self) -> None:
        self.unloaded = True


# ---- exllamav2 ----


def v2(
    record: Record, configs: dict[str, dict[str, Any]], *, flash_attn: bool = True
) -> ModuleType:
    """exllamav2; ``configs``: the attributes of each model directory's ``ExLlamaV2Config``."""

    class ExLlamaV2Config:
        def __init__(self, model_dir: str) -> None:
            self.model_dir = model_dir
            self.max_seq_len, self.vocab_size, self.no_flash_attn = 4096, 1000, False
            self.max_input_len = self.max_attention_size = self.max_batch_size = 0
            self.__dict__.update(configs.get(model_dir, {}))

        def arch_compat_overrides(self) -> None: ...

    class ExLlamaV2(_Model):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            record.models.append(self)

        def load_autosplit(self, cache: Any, **kw: Any) -> None:
            self.load_args = {"cache": cache, **kw}

    def cache_class(name: str) -> type:
        def init(self: Any, model: Any, max_seq_len: int, lazy: bool) -> None:
            self.model, self.max_seq_len, self.lazy = model, max_seq_len, lazy
            record.caches.append(self)

        return type(name, (), {"__init__": init})

    class ExLlamaV2Tokenizer:
        bos_token_id, eos_token_id = 1, 2
        extended_piece_to_id: ClassVar[dict[str, int]] = {}

        def __init__(self, config: Any) -> None:
            self.config = config

    def generator(**kw: Any) -> SimpleNamespace:
        record.generators.append(kw)
        return SimpleNamespace(**kw)

    def job(**kw: Any) -> dict[str, Any]:
        record.jobs.append(kw)
        return kw

    filters = _module(
        "exllamav2.generator.filters", ExLlamaV2Filter=type("ExLlamaV2Filter", (), {})
    )
    generator_module = _module(
        "exllamav2.generator",
        ExLlamaV2DynamicGenerator=generator,
        ExLlamaV2DynamicJob=job,
        ExLlamaV2Sampler=SimpleNamespace(Settings=lambda **kw: SimpleNamespace(**kw)),
        filters=filters,
    )
    caches = ("ExLlamaV2Cache", *(f"ExLlamaV2Cache_Q{b}" for b in (8, 6, 4)))
    return _module(
        "exllamav2",
        ExLlamaV2Config=ExLlamaV2Config,
        ExLlamaV2=ExLlamaV2,
        ExLlamaV2Tokenizer=ExLlamaV2Tokenizer,
        attn=_module("exllamav2.attn", has_flash_attn_with_paged=flash_attn),
        generator=generator_module,
        **{name: cache_class(name) for name in caches},
    )


# ---- exllamav3 ----


def v3(record: Record, configs: dict[str, dict[str, Any]], *, ngram: bool = True) -> ModuleType:
    """exllamav3; ``ngram=False``: a Generator from before n-gram drafting (0.0.31)."""

    class Config:
        def __init__(self, model_dir: str) -> None:
            self.model_dir = model_dir
            self.max_position_embeddings, self.vocab_size = 4096, 1000
            self.__dict__.update(configs.get(model_dir, {}))

        @classmethod
        def from_directory(cls, model_dir: str) -> Config:
            return cls(model_dir)

    class Model(_Model):
        @classmethod
        def from_config(cls, config: Any) -> Model:
            model = cls(config)
            record.models.append(model)
            return model

        def load(self, **kw: Any) -> None:
            self.load_args = kw

    class Cache:
        def __init__(self, model: Any, max_num_tokens: int, layer_type: str, **bits: int) -> None:
            self.model, self.max_num_tokens, self.layer_type, self.bits = (
                model,
                max_num_tokens,
                layer_type,
                bits,
            )
            record.caches.append(self)

    class Tokenizer:
        bos_token_id, eos_token_id, actual_vocab_size = 1, 2, 1000
        extended_piece_to_id: ClassVar[dict[str, int]] = {}

        @classmethod
        def from_config(cls, config: Any) -> Tokenizer:
            return cls()

    class Generator:
        def __init__(
            self,
            model: Any,
            cache: Any,
            tokenizer: Any,
            max_batch_size: int = 256,
            max_chunk_size: int = 2048,
            draft_model: Any = None,
            draft_cache: Any = None,
            num_draft_tokens: int | None = None,
            cpu_cache_size: int = 0,
            **kwargs: Any,
        ) -> None:
            args = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}
            record.generators.append({**args, **kwargs})

        def close(self) -> None: ...

    class NgramGenerator(Generator):
        def __init__(
            self, model: Any, cache: Any, tokenizer: Any, ngram_match_min: int = 0, **kw: Any
        ) -> None:
            super().__init__(model, cache, tokenizer, ngram_match_min=ngram_match_min, **kw)

    def job(**kw: Any) -> dict[str, Any]:
        record.jobs.append(kw)
        return kw

    generator_module = _module(
        "exllamav3.generator",
        filter=_module("exllamav3.generator.filter", Filter=type("Filter", (), {})),
        sampler=_module(
            "exllamav3.generator.sampler", ComboSampler=lambda **kw: SimpleNamespace(**kw)
        ),
    )
    return _module(
        "exllamav3",
        Config=Config,
        Model=Model,
        Cache=Cache,
        CacheLayer_fp16="fp16",
        CacheLayer_quant="quant",
        Tokenizer=Tokenizer,
        Generator=NgramGenerator if ngram else Generator,
        Job=job,
        generator=generator_module,
    )


def install(monkeypatch: pytest.MonkeyPatch, lib: ModuleType) -> None:
    """``lib`` and its submodules in ``sys.modules``, a fake torch, and the loader's
    ``require_library`` returning ``lib`` (no CUDA check)."""
    import backends.exllamav2.model
    import backends.exllamav3.model

    modules = [_torch(), lib]
    while modules:
        mod = modules.pop()
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        modules += [v for v in vars(mod).values() if isinstance(v, ModuleType)]
    loader = {"exllamav2": backends.exllamav2.model, "exllamav3": backends.exllamav3.model}
    monkeypatch.setattr(loader[lib.__name__], "require_library", lambda backend, module: lib)
