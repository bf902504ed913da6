"""Grammars in the llama.cpp engine: llguidance as the first stage of a sequence's sampler chain.

:func:`grammars` is the model's grammar engine (:class:`gateway.output.matchers.Grammars`) over
llguidance's tokenizer for the loaded vocabulary (built on the first constrained request:
~0.5 s for 49k tokens).

:class:`GrammarStage` is a custom ``llama_sampler`` over a sequence's
:class:`~gateway.output.matchers.Constraint`: ``apply`` sets the logits of every token the
grammar forbids to -inf (at the head of the chain the candidates are the whole vocabulary),
``accept`` advances the matcher. A token the matcher rejects puts it in an error state (no
abort): the engine fails that sequence only.
"""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

import llguidance
import numpy as np

from backends._grammar import unpack
from gateway.output.matchers import Constraint, Grammars

#: llama_token_data: id, logit, p
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def grammars(llama: ModuleType, vocab: Any) -> Grammars:
    return Grammars(lambda: _tokenizer(llama, vocab))


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

    def __init__(self, llama: ModuleType, constraint: Constraint, n_vocab: int) -> None:
        self.constraint = constraint
        self._n_vocab = n_vocab

        def apply(_smpl: Any, cur_p: Any) -> None:
            self._apply(cur_p.contents)

        def accept(_smpl: Any, token: int) -> None:
            constraint.accept(token)

        self._callbacks = (llama.llama_sampler_i_apply(apply), llama.llama_sampler_i_accept(accept))
        self._iface = llama.llama_sampler_i()
        self._iface.apply, self._iface.accept = self._callbacks
        #: Owned by the chain it is added to (the chain frees it).
        self.sampler = llama.llama_sampler_init(ctypes.pointer(self._iface), None)

    def _apply(self, arr: Any) -> None:
        c = self.constraint
        if c.failed or c.complete:
            return  # the engine ends this sequence after the token
        allowed = unpack(c.compute_mask(), self._n_vocab)
        raw = ctypes.cast(arr.data, ctypes.POINTER(ctypes.c_uint8))
        data = np.ctypeslib.as_array(raw, shape=(arr.size * TOKEN_DATA.itemsize,))
        rows = data.view(TOKEN_DATA)
        rows["logit"][~allowed[rows["id"]]] = -np.inf

    @property
    def failed(self) -> str | None:
        return self.constraint.failed

    @property
    def complete(self) -> bool:
        return self.constraint.complete
