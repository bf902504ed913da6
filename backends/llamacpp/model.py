"""Loading a GGUF into a llama.cpp model + one multi-sequence context, and freeing them."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from backends.llamacpp import native
from backends.llamacpp.config import GGML_TYPE_IDS, LlamaCppConfig
from backends.llamacpp.embeddings import GGUF_POOLING, Pooling
from backends.llamacpp.gguf_file import ModelFileError, check_model_file
from backends.llamacpp.grammar import grammars
from backends.llamacpp.prompt import CHATML, PromptBuilder
from backends.llamacpp.tokenizer import Tokenizer
from gateway.chat_template import ChatTemplate
from gateway.output.formats import ChatFormat, chat_format

log = logging.getLogger("backends.llamacpp")


class LlamaMemory:
    """:class:`backends.llamacpp.slots.KVOps` over a context's memory (``streams``: one KV
    stream per sequence, else one unified pool)."""

    def __init__(self, llama: ModuleType, ctx: Any, *, streams: bool = False) -> None:
        self._llama = llama
        self._ctx = ctx
        self._mem = llama.llama_get_memory(ctx)
        self.streams = streams

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return bool(self._llama.llama_memory_seq_rm(self._mem, seq_id, p0, p1))

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """``src``'s first ``n`` tokens into the empty ``dst``: in one pool the cells are shared;
        across streams the state is copied now (llama.cpp's own cross-stream ``seq_cp`` copies
        the whole stream at the next decode, after a save or restore could have read or
        replaced it)."""
        if not self.streams:
            self._llama.llama_memory_seq_cp(self._mem, src, dst, 0, n)
            return True
        if self.load(dst, self.save(src)) and self.seq_rm(dst, n, -1):
            return True
        self.seq_rm(dst, -1, -1)  # not loaded, or a tail this memory cannot drop (recurrent)
        return False

    def seq_pos_min(self, seq_id: int) -> int:
        return int(self._llama.llama_memory_seq_pos_min(self._mem, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        """The sequence's last position in the cells (-1: it holds none)."""
        return int(self._llama.llama_memory_seq_pos_max(self._mem, seq_id))

    def save(self, seq_id: int) -> bytes:
        llama, flags = self._llama, 0  # LLAMA_STATE_SEQ_FLAGS_NONE: the whole sequence
        size = llama.llama_state_seq_get_size_ext(self._ctx, seq_id, flags)
        buf = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data_ext(self._ctx, buf, size, seq_id, flags)
        return bytes(memoryview(buf)[:written])

    def load(self, seq_id: int, data: bytes) -> bool:
        # the bytes object's own buffer, read in place (llama.cpp takes a const pointer)
        src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        read = self._llama.llama_state_seq_set_data_ext(self._ctx, src, len(data), seq_id, 0)
        return bool(read)


class LoadedModel:
    """A model, its context (KV cells for ``n_seq`` sequences, as ``kv_cache.layout`` says)
    and its tokenizer.

    ``n_ctx_slot`` is the per-sequence limit after capping by the model's training context.
    """

    def __init__(self, config: LlamaCppConfig, n_seq: int, n_batch: int) -> None:
        path = config.model_path
        check_model_file(path)
        self.llama = llama = native.load_llama_cpp()
        self.config = config
        mp = llama.llama_model_default_params()
        mp.n_gpu_layers = config.n_gpu_layers if config.n_gpu_layers >= 0 else 1_000_000
        mp.main_gpu = config.main_gpu
        self._split: Any = None
        if config.tensor_split:
            self._split = (ctypes.c_float * len(config.tensor_split))(*config.tensor_split)
            mp.tensor_split = self._split
        native.recent_errors.clear()
        self.model = llama.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ModelFileError(f"llama.cpp could not load model file {path}: {_why()}")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_ctx_train: int = llama.llama_model_n_ctx_train(self.model)
        self.n_ctx_slot = min(config.kv_cache.n_ctx_per_slot, self.n_ctx_train or 1 << 30)
        self.n_seq = n_seq
        #: One pool of cells for all sequences, else one stream per sequence.
        self.unified = config.kv_cache.layout == "unified"
        self.ctx = llama.llama_init_from_model(self.model, self._context_params(n_seq, n_batch))
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise ModelFileError(f"llama.cpp could not create a context for {path}: {_why()}")
        self.n_embd: int = llama.llama_model_n_embd_out(self.model)
        self.pooling: Pooling = config.pooling or self._gguf_pooling()
        self.batch = llama.llama_batch_init(n_batch, 0, 1)
        self.memory = LlamaMemory(llama, self.ctx, streams=not self.unified)
        self.tokenizer = Tokenizer(llama, self.vocab)
        self.template = self._template()
        self.chat_format = self._chat_format()
        self.tokenizer.visible = frozenset(self.chat_format.special.values())
        self.grammars = grammars(llama, self.vocab)
        self.prompt_builder = PromptBuilder(
            self.tokenizer, self.template, self.n_ctx_slot, self.chat_format
        )

    def _context_params(self, n_seq: int, n_batch: int) -> Any:
        cfg = self.config
        cp = self.llama.llama_context_default_params()
        cp.n_ctx = cfg.n_ctx_total
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_batch, 512)
        cp.n_seq_max = n_seq
        cp.n_threads = cfg.batching.n_threads
        cp.n_threads_batch = cfg.n_threads_batch
        cp.kv_unified = self.unified
        cp.type_k = GGML_TYPE_IDS[cfg.kv_cache.type_k]
        cp.type_v = GGML_TYPE_IDS[cfg.kv_cache.type_v]
        cp.flash_attn_type = cfg.flash_attn_type
        cp.no_perf = True
        cp.embeddings = cfg.embeddings
        cp.pooling_type = 0  # LLAMA_POOLING_TYPE_NONE: the engine pools token vectors itself
        if cfg.embeddings:  # an encoder reads its whole input in one micro-batch
            cp.n_ubatch = n_batch
        return cp

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (None if the file has no such key)."""
        buf = ctypes.create_string_buffer(256)
        n = self.llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _gguf_pooling(self) -> Pooling:
        arch = self.meta("general.architecture") or ""
        value = self.meta(f"{arch}.pooling_type")
        return GGUF_POOLING.get(int(value), "mean") if value and value.isdigit() else "mean"

    def _template(self) -> ChatTemplate:
        cfg = self.config
        if cfg.chat_template_file is not None:
            try:
                source = cfg.chat_template_file.read_text(encoding="utf-8")
            except OSError as err:
                raise ModelFileError(
                    f"chat template file {cfg.chat_template_file} cannot be read: {err.strerror}"
                ) from err
        else:
            raw = self.llama.llama_model_chat_template(self.model, None)
            if raw is None:
                log.warning("%s has no chat template: using ChatML", cfg.model_path)
            source = raw.decode("utf-8") if raw is not None else CHATML
        tok = self.tokenizer
        try:
            return ChatTemplate(
                source,
                bos_token=tok.text_of(tok.bos) if tok.bos >= 0 else "",
                eos_token=tok.text_of(tok.eos) if tok.eos >= 0 else "",
                timeout_s=cfg.template_render_timeout_s,
                max_output_chars=cfg.template_max_output_bytes,
            )
        except ValueError as err:
            raise ModelFileError(f"{cfg.chat_template_file or cfg.model_path}: {err}") from err

    def _chat_format(self) -> ChatFormat:
        fmt = chat_format(self.template.source, self.config.tool_format)
        special = {}
        for marker in fmt.markers:
            token = self.tokenizer.special_token(marker)
            if token is not None:
                special[marker] = token
        return replace(fmt, special=special)

    def close(self) -> None:
        free_native(self)


class Native(Protocol):
    """A llama.cpp model with its context and batch (each freed once, then None)."""

    llama: ModuleType
    batch: Any
    ctx: Any
    model: Any


def free_native(owner: Native) -> None:
    """Free ``owner``'s batch, context and model (what is already freed is skipped)."""
    llama = owner.llama
    if owner.batch is not None:
        llama.llama_batch_free(owner.batch)
        owner.batch = None
    if owner.ctx:
        llama.llama_free(owner.ctx)
        owner.ctx = None
    if owner.model:
        llama.llama_model_free(owner.model)
        owner.model = None


def _why() -> str:
    return "; ".join(native.recent_errors) or "see the llama.cpp log"


def describe(path: Path) -> str:
    size = path.stat().st_size if path.exists() else 0
    return f"{path} ({size / 1e6:.0f} MB)"
