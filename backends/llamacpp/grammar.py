"""Grammars in the llama.cpp engine: llguidance as the first stage of a sequence's sampler chain.

:class:`Grammars` is one model's grammar engine: its llguidance tokenizer (built from the
loaded vocabulary once, on the first constrained request: ~0.5 s for 49k tokens) and a
bounded cache of compiled grammars (a fresh matcher per distinct grammar text; each sequence
gets a copy). Compiling runs in the request's worker thread, never on the engine thread.

:class:`GrammarStage` is a custom ``llama_sampler``: ``apply`` sets the logits of every token
the grammar forbids to -inf (at the head of the chain the candidates are the whole vocabulary),
``accept`` advances the matcher. A token the matcher rejects puts it in an error state (no
abort): the engine fails that sequence only.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from types import ModuleType
from typing import Any

import llguidance
import numpy as np

from gateway.errors import InvalidRequest

#: llama_token_data: id, logit, p
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
#: Resource limits per grammar: llguidance's defaults bound each mask step (~15 ms at worst).
LIMITS = llguidance.LLParserLimits()


class Grammars:
    def __init__(self, llama: ModuleType, vocab: Any, cache_size: int = 64) -> None:
        self._llama = llama
        self._vocab = vocab
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.cache_size = cache_size

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _tokenizer(self._llama, self._vocab)
            return self._tokenizer

    def matcher(self, grammar: str, param: str) -> llguidance.LLMatcher:
        """A fresh matcher for ``grammar`` (a 400 naming ``param`` if it does not compile)."""
        return self.compile(grammar, param).deep_copy()

    def compile(self, grammar: str, param: str) -> llguidance.LLMatcher:
        """The cached pristine matcher for ``grammar`` (compiled now if new); never consume
        tokens with it: :meth:`matcher` copies it."""
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is not None:
                self._compiled.move_to_end(grammar)
                return pristine
        tokenizer = self.tokenizer()
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        error = llguidance.LLMatcher.validate_grammar(compiled, tokenizer, limits=LIMITS)
        if error:
            reason = error.splitlines()[0]
            raise InvalidRequest(f"'{param}' cannot be enforced: {reason}", param=param)
        pristine = llguidance.LLMatcher(tokenizer, compiled, log_level=0, limits=LIMITS)
        if pristine.is_error():
            raise InvalidRequest(
                f"'{param}' cannot be enforced: {pristine.get_error()}", param=param
            )
        with self._lock:
            self._compiled[grammar] = pristine
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return pristine


def _tokenizer(llama: ModuleType, vocab: Any) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over the loaded vocabulary: each token's bytes, control tokens
    (and user-defined ``<...>`` ones) marked with a 0xFF prefix so text never matches them."""
    buf = ctypes.create_string_buffer(16 * 1024)
    control = llama.LLAMA_TOKEN_ATTR_CONTROL
    user = llama.LLAMA_TOKEN_ATTR_USER_DEFINED
    tokens: list[bytes] = []
    for token in range(llama.llama_vocab_n_tokens(vocab)):
        n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        piece = buf.raw[: max(n, 0)]
        attr = llama.llama_vocab_get_attr(vocab, token)
        if attr & control or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(llama.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    made: llguidance.LLTokenizer = llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens,
        vocab_ptr=vocab,
        tokenize_fptr=tokenize,
        eos_token=llama.llama_vocab_eos(vocab),
    )
    return made


class GrammarStage:
    """One sequence's grammar as a ``llama_sampler`` (keep it alive as long as its chain)."""

    def __init__(self, llama: ModuleType, matcher: llguidance.LLMatcher, n_vocab: int) -> None:
        self.matcher = matcher
        self._bitmask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

        def apply(_smpl: Any, cur_p: Any) -> None:
            self._apply(cur_p.contents)

        def accept(_smpl: Any, token: int) -> None:
            if not matcher.is_stopped():
                matcher.consume_token(int(token))

        self._callbacks = (llama.llama_sampler_i_apply(apply), llama.llama_sampler_i_accept(accept))
        self._iface = llama.llama_sampler_i()
        self._iface.apply, self._iface.accept = self._callbacks
        #: Owned by the chain it is added to (the chain frees it).
        self.sampler = llama.llama_sampler_init(ctypes.pointer(self._iface), None)

    def _apply(self, arr: Any) -> None:
        matcher = self.matcher
        if matcher.is_error() or matcher.is_stopped():
            return
        matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        raw = ctypes.cast(arr.data, ctypes.POINTER(ctypes.c_uint8))
        data = np.ctypeslib.as_array(raw, shape=(arr.size * TOKEN_DATA.itemsize,))
        rows = data.view(TOKEN_DATA)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").view(bool)
        rows["logit"][~allowed[rows["id"]]] = -np.inf

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    @property
    def complete(self) -> bool:
        return bool(self.matcher.is_stopped())
