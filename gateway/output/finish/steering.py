"""One sequence's budget, watched token by token (:class:`Steering`).

Before each mask it compares what is left of ``max_tokens`` with the shortest way to finish
(the :class:`~gateway.output.finish.envelope.Envelope`'s shortest text, tokenized, plus a
margin). While the budget is wide it does nothing. When it comes within a few tokens per open
string of the shortest finish, it compiles the narrowed grammar of the rest, replays the
sequence's last tokens into it (those of the scalar being written), and hands it to the
:class:`~gateway.output.matchers.Constraint` in place of the request's grammar. The strings
and numbers left to write share what remains, at the characters per token the sequence has
written so far. Should the model spend more than that, it narrows again with nothing to
spare. A budget too small for even the shortest answer is left alone (the answer ends with
``length``, as it would without steering).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import llguidance

from gateway.output.finish.calls import Calls, layout_of
from gateway.output.finish.envelope import Answer, Envelope
from gateway.output.finish.schemas import Unsupported, lit
from gateway.output.grammar import MAX_SPACE
from gateway.types import GenerationRequest

#: Characters a bounded string may hold per token of budget it is given.
CHARS_PER_TOKEN = 3
#: Tokens of headroom per string still to write when steering begins.
PER_STRING = 6
#: Narrowings per sequence, at most (the first, then re-narrowings after an overrun).
MAX_STEERS = 8
BASE_RULES = f"WS: /[ \\t\\r\\n]{{1,{MAX_SPACE}}}/\n"

log = logging.getLogger("gateway.output.finish")

Compile = Callable[[str], "llguidance.LLMatcher | None"]


@dataclass(frozen=True)
class Budget:
    """What a constrained sequence may spend: its request (the envelope comes from it) and its
    token limit."""

    request: GenerationRequest
    limit: int


def margin(tokens: int) -> int:
    """Tokens kept in reserve beyond the shortest finish (the model may split its text into
    more tokens than the tokenizer would)."""
    return 3 + tokens // 6


class Steering:
    def __init__(
        self,
        envelope: Envelope,
        limit: int,
        tokenizer: llguidance.LLTokenizer,
        compile_grammar: Compile,
    ) -> None:
        self.envelope = envelope
        self.limit = limit
        self.tokenizer = tokenizer
        self.compile = compile_grammar
        self.tokens: list[int] = []
        self.starts: list[int] = []  # each token's first byte in the output
        self.steers = 0
        self.off: str | None = None
        self._need: tuple[int, int, int, int] | None = None  # (version, need, watch, dearest)
        self._first = 0  # the first token the narrowed grammar took
        self._next_look = 0  # no look at the budget before this many tokens

    def accepted(self, token: int) -> None:
        if self.off is not None and self.steers == 0:
            return  # never steered, never will be: nothing to follow
        self.starts.append(len(self.envelope.text))
        self.tokens.append(token)
        self.envelope.feed(self.tokenizer.decode_bytes([token]))

    def take_back(self, n: int) -> bool:
        """Forget the last ``n`` tokens (the matcher rolls back); steering stops there, its
        narrowed grammar (if any) stays. False if the narrowed grammar began after them."""
        if self.steers == 0:  # the request's own grammar: it takes its tokens back itself
            self.off = self.off or "tokens were taken back"
            return True
        if len(self.tokens) - n < self._first:
            return False
        del self.tokens[len(self.tokens) - n :], self.starts[len(self.starts) - n :]
        self.off = "tokens were taken back"
        return True

    def need(self) -> tuple[int, int] | None:
        """Tokens the shortest finish takes (with the margin), and the budget left below which
        steering begins (that, a few tokens per string still to write, and the dearest step
        the model may take next); None: nothing to steer now."""
        env = self.envelope
        if self._need is not None and self._need[0] == env.version:
            return self._need[1], self._need[2]
        self._need = None
        try:
            text = env.shortest()
        except Unsupported as err:
            self.off = str(err)
            return None
        if text is None:
            return None
        tokens = self._count(text)
        strings = text.count('""') + (1 if env.string is not None else 0)
        # an empty string's quotes tokenize together; with text in between they cannot
        need = tokens + strings + margin(tokens)
        # the model may take its dearest step next (one token may open a new item or key)
        dearest = self._count(env.dearest_step())
        watch = need + PER_STRING * strings + dearest
        self._need = (env.version, need, watch, dearest)
        return need, watch

    def _count(self, text: str) -> int:
        return len(self.tokenizer.tokenize_str(text)) if text else 0

    def next(self) -> llguidance.LLMatcher | None:
        """A narrowed matcher to follow from now on, when the budget calls for one."""
        if self.off is not None or self.steers >= MAX_STEERS:
            return None
        if self.envelope.lost:
            self.off = "the output left the shapes the finisher follows"
            return None
        if self.steers == 0 and len(self.tokens) < self._next_look:
            return None
        needed = self.need()
        if needed is None:
            return None
        need, watch = needed
        left = self.limit - len(self.tokens)
        if self.steers == 0:
            if not self.tokens and need > left:
                self.off = "the budget cannot fit the shortest answer"
                return None
            if left > watch:
                self._rest_a_while(left - watch)
                return None
        elif left >= need:
            return None
        return self._narrow(max(0, left - need))

    def _rest_a_while(self, slack: int) -> None:
        """Look again only when the budget could have come near: each token adds at most the
        dearest step to the shortest finish (one token opens one item or key at most)."""
        dearest = self._need[3] if self._need is not None else 0
        self._next_look = len(self.tokens) + max(1, slack // (dearest + 2))

    def _rate(self) -> float:
        """Characters per token this sequence has written (at most :data:`CHARS_PER_TOKEN`):
        a bound in characters must hold the fewer of them where each costs more tokens."""
        if len(self.tokens) < 8:
            return CHARS_PER_TOKEN
        chars = len(self.envelope.text.decode(errors="replace"))
        return min(CHARS_PER_TOKEN, max(0.25, chars / len(self.tokens)))

    def _narrow(self, room: int) -> llguidance.LLMatcher | None:
        env = self.envelope
        self.steers += 1
        try:
            probe = env.narrowed(0)
            bounded = probe.bounded if probe is not None else 1
            finish = env.narrowed(int(room * self._rate()) // max(1, bounded))
        except Unsupported as err:
            self.off = str(err)
            return None
        if finish is None:
            return None
        back = finish.back if finish.back is not None else len(env.text)
        first = bisect.bisect_right(self.starts, back) - 1 if back < len(env.text) else None
        if first is None:
            first, prefix = len(self.tokens), b""
        else:
            prefix = bytes(env.text[self.starts[first] : back])
        try:
            head = lit(prefix.decode()) + " " if prefix else ""
        except UnicodeDecodeError:
            self.off = "a token splits a character before the value"
            return None
        matcher = self.compile(f"start: {head}{finish.body or lit('')}\n{BASE_RULES}")
        replay = self.tokens[first:]
        if matcher is None or matcher.try_consume_tokens(replay) != len(replay):
            self.off = "the narrowed grammar does not take the tokens written"
            log.debug("not steered: %s (%s)", self.off, finish.body[:200])
            return None
        self._first = first
        log.debug(
            "narrowed at token %d of %d (narrowing %d, room %d): %s",
            len(self.tokens), self.limit, self.steers, room, finish.body[:200],
        )  # fmt: skip
        return matcher


def steering_for(
    budget: Budget, tokenizer: llguidance.LLTokenizer, compile_grammar: Compile
) -> Steering | None:
    try:
        envelope = envelope_for(budget.request)
    except (ValueError, Unsupported):
        return None
    if envelope is None:
        return None
    return Steering(envelope, budget.limit, tokenizer, compile_grammar)


def envelope_for(request: GenerationRequest) -> Envelope | None:
    """The envelope of a constrained generation (None: nothing the finisher can steer)."""
    plan = request.output
    if plan is None or plan.grammar is None:
        return None
    fmt = plan.format
    opened = request.tokenized is not None and request.tokenized.reasoning_open
    offered = request.tools.offered if request.tools is not None else ()
    if offered:
        # a custom tool's raw input follows its own grammar: the finisher steers the others
        tools = tuple(t for t in offered if t.freeform is None)
        layout = layout_of(fmt) if fmt is not None else None
        if fmt is None or layout is None or not tools:
            return None
        assert request.tools is not None
        forced = request.tools.choice in ("required", "named")
        more = request.tools.max_calls > 1
        return Calls(fmt, layout, tools, forced=forced, opened=opened, more=more)
    rf = request.response_format
    if rf is None:
        return None
    return Answer(fmt, rf.schema or '{"type": "object"}', opened=opened)
