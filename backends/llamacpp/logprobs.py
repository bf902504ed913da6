"""Log probabilities of a sampled token from the model's raw logits (before the sampler chain
and any grammar touched them: the chain works on a copy)."""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

import numpy as np

from backends.llamacpp.tokenizer import Tokenizer
from gateway.types import TokenLogprob, TopLogprob


def _entry(tokenizer: Tokenizer, token: int, logprob: float) -> TopLogprob:
    piece = tokenizer.piece(token)
    return TopLogprob(piece.decode("utf-8", errors="replace"), logprob, tuple(piece))


def token_logprob(
    llama: ModuleType, ctx: Any, row: int, tokenizer: Tokenizer, token: int, top: int
) -> TokenLogprob:
    pointer = llama.llama_get_logits_ith(ctx, row)
    array = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))
    logits = np.ctypeslib.as_array(array, shape=(tokenizer.n_vocab,))
    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    chosen = _entry(tokenizer, token, float(logits[token]) - lse)
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(logits, -top)[-top:]
        best = best[np.argsort(logits[best])[::-1]]
        alternatives = tuple(_entry(tokenizer, int(t), float(logits[t]) - lse) for t in best)
    return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)
