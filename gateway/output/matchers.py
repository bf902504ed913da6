"""Grammars compiled for one model's vocabulary, and one sequence's grammar as the engines use
it: llguidance only, no inference library (each backend builds the tokenizer its own way).

:class:`Grammars` is one model's grammar engine: its llguidance tokenizer (built on the first
constrained request, from a factory the backend supplies) and a bounded cache of compiled
grammars (a pristine matcher per distinct grammar text; each sequence gets a copy). Compiling
runs in the request's worker thread, never on an engine thread.

:class:`Constraint` is one sequence's matcher behind the three operations every engine needs
(the mask for the next token, accepting the sampled token, the state). A token the matcher
rejects puts it in an error state, never an exception on the engine thread: the mask then
allows only the stop tokens and the engine fails that sequence alone.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import llguidance

from gateway.errors import InvalidRequest
from gateway.output.finish.steering import Budget, Steering, steering_for
from gateway.output.panics import EnginePanic, no_panics
from gateway.types import GenerationRequest

#: Resource limits per grammar: llguidance's defaults bound each mask step (~15 ms at worst).
LIMITS = llguidance.LLParserLimits()

TokenizerFactory = Callable[[], llguidance.LLTokenizer]


def request_grammar(request: GenerationRequest) -> tuple[str, str] | None:
    """The grammar a generation must follow and the field it comes from (named in the 400 if
    it cannot compile); the variant for a prompt that opened the reasoning where it did."""
    plan = request.output
    if plan is None:
        return None
    opened = request.tokenized is not None and request.tokenized.reasoning_open
    grammar = plan.grammar_open if opened and plan.grammar_open is not None else plan.grammar
    if grammar is None:
        return None
    param = "response_format" if request.response_format is not None else "tools"
    return grammar, param


class Grammars:
    def __init__(self, make_tokenizer: TokenizerFactory, cache_size: int = 64) -> None:
        self._make_tokenizer = make_tokenizer
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.cache_size = cache_size

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
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
        try:
            with no_panics():
                pristine = self._build(grammar, param)
        except EnginePanic as err:
            raise InvalidRequest(f"'{param}' cannot be enforced: {err}", param=param) from None
        if pristine.is_error():
            raise InvalidRequest(
                f"'{param}' cannot be enforced: {pristine.get_error()}", param=param
            )
        with self._lock:
            self._compiled[grammar] = pristine
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return pristine

    def _build(self, grammar: str, param: str) -> llguidance.LLMatcher:
        tokenizer = self.tokenizer()
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        error = llguidance.LLMatcher.validate_grammar(compiled, tokenizer, limits=LIMITS)
        if error:
            reason = error.splitlines()[0]
            raise InvalidRequest(f"'{param}' cannot be enforced: {reason}", param=param)
        return llguidance.LLMatcher(tokenizer, compiled, log_level=0, limits=LIMITS)

    def narrowed(self, grammar: str) -> llguidance.LLMatcher | None:
        """A matcher for a finisher's narrowed grammar (not cached: each is one sequence's);
        None if it does not compile."""
        try:
            with no_panics():
                matcher = self._build(grammar, "narrowed")
        except (EnginePanic, InvalidRequest):
            return None
        return None if matcher.is_error() else matcher

    def constraint(
        self,
        grammar: str,
        param: str,
        stop_tokens: Sequence[int],
        budget: Budget | None = None,
    ) -> Constraint:
        """One sequence's grammar; with its ``budget``, steered to finish within it."""
        steer = None
        if budget is not None:
            tokenizer = self.tokenizer()
            steer = lambda: steering_for(budget, tokenizer, self.narrowed)  # noqa: E731
        matcher = self.matcher(grammar, param)
        return Constraint(matcher, self.tokenizer().vocab_size, stop_tokens, steer=steer)


class Constraint:
    """One sequence's grammar. Not thread-safe: one engine drives it (a mask may be computed
    on a worker thread while the model runs, never at the same time as :meth:`accept`)."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        n_vocab: int,
        stop_tokens: Sequence[int],
        *,
        steer: Callable[[], Steering | None] | None = None,
    ) -> None:
        self.matcher = self._base = matcher
        self._steer = steer
        #: Watches the budget; its narrowed grammar replaces :attr:`matcher` when due.
        self.steering = steer() if steer is not None else None
        self.n_vocab = n_vocab
        #: The packed mask (little-endian 32-bit words; bit ``i & 31`` of word ``i >> 5`` is
        #: token i), one buffer for the sequence's life: engines view it without a copy.
        self.mask = bytearray(4 * ((n_vocab + 31) // 32))
        #: Held: the buffer stays exported (never resized) while the matcher writes into it.
        self._view = (ctypes.c_char * len(self.mask)).from_buffer(self.mask)
        self._address = ctypes.addressof(self._view)
        self._stops = [t for t in stop_tokens if 0 <= t < n_vocab]
        self.accepted = 0
        #: Set when the engine panicked inside this matcher: it is never called again.
        self.panic: str | None = None

    def compute_mask(self) -> bytearray:
        """The mask of the tokens the grammar allows next (into :attr:`mask`). After an
        error or the end of the grammar: only the stop tokens, so the sequence ends."""
        m, forced = self.matcher, None
        if self.panic is None and not m.is_error() and not m.is_stopped():
            try:
                with no_panics():
                    m = self._steered(m)
                    forced = self._forced(m)
                    if forced is None:
                        m.unsafe_compute_mask_ptr(self._address, len(self.mask))
            except EnginePanic as err:
                self.panic = str(err)
            if self.panic is None and not m.is_error():
                return self.mask if forced is None else self._only((forced,))
        return self._only(self._stops)

    def _only(self, tokens: Sequence[int]) -> bytearray:
        self.mask[:] = bytes(len(self.mask))
        for token in tokens:
            self.mask[token >> 3] |= 1 << (token & 7)  # little-endian words: bytes in order
        return self.mask

    def _forced(self, m: llguidance.LLMatcher) -> int | None:
        """Once steered, text the grammar forces (keys, brackets, markers) is written in its
        usual tokens (the first of llguidance's fast-forward tokens), not spelled out in
        more: what the budget was planned with. The model chooses nothing there."""
        if self.steering is None or not self.steering.steers:
            return None
        tokens = m.compute_ff_tokens()
        return tokens[0] if tokens and 0 <= tokens[0] < self.n_vocab else None

    def accept(self, token: int) -> None:
        """Advance past the sampled ``token`` (a no-op once the grammar ended or failed)."""
        m = self.matcher
        if self.panic is not None or m.is_error() or m.is_stopped():
            return
        try:
            with no_panics():
                if m.consume_token(int(token)):
                    self.accepted += 1
                    if self.steering is not None:
                        self.steering.accepted(int(token))
        except EnginePanic as err:
            self.panic = str(err)

    def _steered(self, m: llguidance.LLMatcher) -> llguidance.LLMatcher:
        """The matcher to follow: the narrowed one once the budget calls for it."""
        if self.steering is None:
            return m
        narrowed = self.steering.next()
        if narrowed is None:
            return m
        self.matcher = narrowed
        return narrowed

    @property
    def steered(self) -> int:
        """How many times this sequence's grammar was narrowed to fit its budget."""
        return self.steering.steers if self.steering is not None else 0

    def reset(self) -> None:
        self.matcher = self._base
        self.matcher.reset()
        self.accepted = 0
        self.steering = self._steer() if self._steer is not None else None

    def rollback(self, n: int) -> bool:
        """Undo the last ``n`` accepted tokens; False if the matcher cannot."""
        if n > self.accepted or self.panic is not None or self.matcher.is_error():
            return False
        if self.steering is not None and n and not self.steering.take_back(n):
            return False  # past the start of the narrowed grammar
        self.matcher.rollback(n)
        self.accepted -= n
        return not self.matcher.is_error()

    @property
    def failed(self) -> str | None:
        if self.panic is not None:
            return self.panic
        return self.matcher.get_error() if self.matcher.is_error() else None

    @property
    def complete(self) -> bool:
        return self.panic is None and bool(self.matcher.is_stopped())
