"""Grammars in the ExLlama generators: the core's matcher (:mod:`gateway.output.matchers`) as
each library's sampling filter.

llguidance's tokenizer comes from the model directory's ``tokenizer.json`` (the Hugging Face
tokenizer both libraries load; its added tokens never match text), sized to the model's
vocabulary so a mask covers every logit.

Both libraries compute a filter's mask on a worker thread while the model runs the step.

- exllamav3 (``Filter``): ``get_next_logit_mask`` returns the packed int32 bitmask as is;
  ``is_completed`` at the grammar's end (or its error) ends the job (``eos_after_completed``).
- exllamav2 (``ExLlamaV2Filter``): ``prepare_logit_mask`` computes the mask, ``mask_logits``
  sets the forbidden logits to -inf; ``next`` (the library's other path) lists the allowed ids.

A matcher error never raises on the engine thread: the mask then allows only the stop tokens,
the job ends, and the engine fails that request alone (:attr:`Constraint.failed`).

The filter classes subclass the library's base class at load time
(:func:`v3_filter_class`, :func:`v2_filter_class`); tensors are made by the ``from_numpy``
the loader passes (``torch.from_numpy``), so the logic runs on a CPU without the libraries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import llguidance
import numpy as np
import numpy.typing as npt

from backends._grammar import unpack, words
from gateway.errors import InvalidRequest
from gateway.output.matchers import Constraint, Grammars

FromNumpy = Callable[[npt.NDArray[Any]], Any]


def grammars(model_dir: Path, n_vocab: int, stop_tokens: Sequence[int]) -> Grammars:
    def make() -> llguidance.LLTokenizer:
        try:
            text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
        except OSError as err:
            raise InvalidRequest(
                f"this model cannot enforce a grammar: {model_dir}/tokenizer.json cannot be "
                f"read ({err.strerror})",
                param="response_format",
            ) from err
        try:
            return llguidance.LLTokenizer(text, n_vocab=n_vocab, eos_token=list(stop_tokens))
        except ValueError as err:
            raise InvalidRequest(
                f"this model cannot enforce a grammar: its tokenizer.json: {err}",
                param="response_format",
            ) from err

    return Grammars(make)


def added_tokens(model_dir: Path) -> dict[str, int]:
    """``tokenizer.json``'s added tokens (special or not: llguidance treats them all as control
    tokens, which text never matches, so a grammar names them by id)."""
    try:
        doc = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    added = doc.get("added_tokens") if isinstance(doc, dict) else None
    out: dict[str, int] = {}
    for entry in added if isinstance(added, list) else []:
        if isinstance(entry, dict):
            content, token = entry.get("content"), entry.get("id")
            if isinstance(content, str) and isinstance(token, int):
                out[content] = token
    return out


class V3Grammar:
    """exllamav3's ``Filter`` methods over a :class:`Constraint`."""

    def __init__(self, tokenizer: Any, constraint: Constraint, from_numpy: FromNumpy) -> None:
        # trigger_token, prefix_str, eos_after_completed: active at once, ends the job
        cast(Any, super()).__init__(tokenizer, None, None, True)
        self.constraint = constraint
        self._mask = from_numpy(words(constraint.mask))[None]

    def reset(self) -> None:
        self.constraint.reset()

    def accept_token(self, token: int) -> None:
        self.constraint.accept(token)

    def rollback_tokens(self, num_tokens: int) -> bool:
        return self.constraint.rollback(num_tokens)

    def get_next_logit_mask(self) -> Any:
        self.constraint.compute_mask()  # into the buffer the tensor shares
        return self._mask

    def is_completed(self) -> bool:
        return self.constraint.complete or self.constraint.failed is not None

    def use_background_worker(self) -> bool:
        return True


class V2Grammar:
    """exllamav2's ``ExLlamaV2Filter`` methods over a :class:`Constraint`."""

    def __init__(
        self, model: Any, tokenizer: Any, constraint: Constraint, from_numpy: FromNumpy
    ) -> None:
        cast(Any, super()).__init__(model, tokenizer)
        self.constraint = constraint
        self._from_numpy = from_numpy
        self._allowed: npt.NDArray[np.bool_] | None = None

    def begin(self, prefix_str: str) -> None:
        self.constraint.reset()

    def feed(self, token: Any) -> None:
        self.constraint.accept(int(token))

    def use_background_worker(self) -> bool:
        return True

    def can_mask_logits(self) -> bool:
        return True

    def prepare_logit_mask(self) -> bool:
        c = self.constraint
        self._allowed = unpack(c.compute_mask(), c.n_vocab)
        return True

    def mask_logits(self, logits: Any) -> Any:
        allowed = self._allowed
        if allowed is None:
            self.prepare_logit_mask()
            allowed = self._allowed
        assert allowed is not None
        n = int(logits.shape[-1])
        if allowed.shape[0] < n:  # the model's logits are padded past the vocabulary
            allowed = np.concatenate([allowed, np.zeros(n - allowed.shape[0], dtype=bool)])
        logits[self._from_numpy(~allowed[:n])] = float("-inf")
        self._allowed = None
        return logits

    def next(self) -> tuple[set[int], set[int]]:
        c = self.constraint
        allowed = unpack(c.compute_mask(), c.n_vocab)
        return {int(t) for t in np.flatnonzero(allowed)}, set()


def v3_filter_class(base: type) -> type[V3Grammar]:
    """A filter class for exllamav3 (``base``: ``exllamav3.generator.filter.Filter``)."""
    return cast(type[V3Grammar], type("GatewayGrammarFilter", (V3Grammar, base), {}))


def v2_filter_class(base: type) -> type[V2Grammar]:
    """A filter class for exllamav2 (``base``: ``ExLlamaV2Filter``)."""
    return cast(type[V2Grammar], type("GatewayGrammarFilter", (V2Grammar, base), {}))
