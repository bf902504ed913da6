"""Embeddings in the engine: token vectors pooled into one per input, on the engine thread.

The context runs with llama.cpp's pooling off; a step that carries embedding inputs turns
``llama_set_embeddings`` on for its own decode call (every token of it is then an output) and
:class:`Pooler` folds each token's vector into its input's embedding: the mean, the first
token's (``cls``) or the last token's. A long input is read over several steps (its KV cells
hold what came before), so it never holds up running streams longer than a prefill chunk.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Pooling = Literal["mean", "cls", "last"]

#: llama.cpp's LLAMA_POOLING_TYPE_* values as GGUF files store them (llama.h).
GGUF_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls", 3: "last"}


@dataclass(frozen=True, slots=True)
class EmbedSpec:
    """How one input's embedding is made."""

    pooling: Pooling
    dimensions: int | None = None
    normalize: bool = True


@dataclass
class Pooler:
    """One input's running pool of token vectors (float64 sums: order-independent enough)."""

    spec: EmbedSpec
    n_embd: int
    tokens_seen: int = 0
    _acc: npt.NDArray[np.float64] | None = field(default=None, repr=False)

    def add(self, vector: npt.NDArray[np.float32], position: int, last: bool) -> None:
        self.tokens_seen += 1
        pooling = self.spec.pooling
        if pooling == "mean":
            if self._acc is None:
                self._acc = np.zeros(self.n_embd, dtype=np.float64)
            self._acc += vector
        elif (pooling == "cls" and position == 0) or (pooling == "last" and last):
            self._acc = vector.astype(np.float64)

    def result(self) -> tuple[float, ...]:
        assert self._acc is not None and self.tokens_seen, "no token was pooled"
        vec = self._acc / self.tokens_seen if self.spec.pooling == "mean" else self._acc
        if self.spec.dimensions is not None:
            vec = vec[: self.spec.dimensions]
        if self.spec.normalize:
            norm = float(np.linalg.norm(vec))
            if norm > 0.0:
                vec = vec / norm
        return tuple(float(x) for x in vec)


def token_vector(llama: Any, ctx: Any, batch_index: int, n_embd: int) -> npt.NDArray[np.float32]:
    """The output vector of one batch position (a view: copy before the next decode)."""
    ptr = llama.llama_get_embeddings_ith(ctx, batch_index)
    if not ptr:
        raise RuntimeError(f"llama.cpp returned no embedding for batch position {batch_index}")
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_embd,))
