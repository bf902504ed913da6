"""One sequence's decoding state, and how it verifies a run of drafted tokens.

:class:`Decoding` holds everything that turns logits into a sequence's output: its sampler
chain (the grammar first), detokenizer, stop matcher, logprobs and token budget. The engine
hands it the batch rows holding the logits after the sequence's last token and after each
drafted token; :meth:`Decoding.verify` samples them in order with the real chain, and goes on
to the next row only while the token it drew is the one that was drafted. So every token is
drawn from the distribution decoding one token per step would draw it from, with the same
random stream, and a draft the grammar forbids is simply a draft not taken. The text is the same
as without drafts wherever a token's logits do not depend on how many tokens its step holds: a
CPU build without llamafile's tinyBLAS, with ``flash_attn = "off"``; GPU kernels and CPU flash
attention add up in another order for several tokens than for one, so a near-tie can go the
other way (:meth:`LlamaCppConfig.flash_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.llamacpp.detokenize import Detokenizer
from backends.llamacpp.grammar import GrammarStage
from backends.llamacpp.logprobs import token_logprob
from backends.llamacpp.model import LoadedModel
from backends.llamacpp.sampling import SamplerChain
from gateway.output.matchers import Constraint
from gateway.stops import StopMatcher
from gateway.types import (
    Delta,
    Finish,
    FinishReason,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Usage,
)

Item = Delta | BaseException


@dataclass(slots=True)
class Verdict:
    """What one step's rows gave a sequence."""

    #: The tokens drawn, in order (the last one is in the KV cells only if it was a draft
    #: token the draw confirmed).
    tokens: list[int] = field(default_factory=list)
    #: Drafted tokens the draws confirmed: their cells hold the sequence's own tokens.
    accepted: int = 0
    #: Text and logprobs to deliver (and the finish, or an error).
    items: list[Item] = field(default_factory=list)
    #: Why the sequence ended in this step (None: it goes on).
    end: FinishReason | None = None
    #: Set when the sequence cannot go on (its grammar failed).
    error: str | None = None


class Decoding:
    """A generating sequence's state on the engine thread; :meth:`close` frees its sampler."""

    def __init__(
        self,
        model: LoadedModel,
        params: SamplingParams,
        *,
        stop: tuple[str, ...],
        max_new: int,
        constraint: Constraint | None,
        logprobs: int | None,
    ) -> None:
        self._model = model
        n_vocab = model.tokenizer.n_vocab
        stage = GrammarStage(model.llama, constraint, n_vocab) if constraint else None
        self.sampler: SamplerChain | None = SamplerChain(
            model.llama, n_vocab, params, model.n_ctx_slot, grammar=stage
        )
        self.detok = Detokenizer()
        self.stops = StopMatcher(stop)
        self.max_new = max_new
        self.logprobs = logprobs
        self.generated = 0
        self._unreported = 0
        self._pending: list[TokenLogprob] = []

    @property
    def constrained(self) -> bool:
        return self.sampler is not None and self.sampler.grammar is not None

    def verify(self, outputs: list[int], draft: list[int]) -> Verdict:
        """Draw from ``outputs`` (batch rows: after the last token, then after each of
        ``draft``) while the draws confirm the draft; the text of what was drawn."""
        assert len(outputs) == len(draft) + 1
        verdict = Verdict()
        text = ""
        for i, output in enumerate(outputs):
            token = self._draw(output)
            verdict.tokens.append(token)
            piece, verdict.end, verdict.error = self._take(token)
            text += piece
            confirmed = i < len(draft) and token == draft[i]
            verdict.accepted += confirmed
            if verdict.end is not None or verdict.error is not None or not confirmed:
                break
        if verdict.error is not None:
            verdict.items = []
        elif verdict.end is not None:
            verdict.items = self._finish(text)
        elif text:
            verdict.items = [self._text(text)]
        return verdict

    def _draw(self, output: int) -> int:
        assert self.sampler is not None
        model = self._model
        token = self.sampler.sample(model.ctx, output)
        self.generated += 1
        self._unreported += 1
        if self.logprobs is not None:
            entry = token_logprob(
                model.llama, model.ctx, output, model.tokenizer, token, self.logprobs
            )
            self._pending.append(entry)
        return token

    def _take(self, token: int) -> tuple[str, FinishReason | None, str | None]:
        """The text ``token`` adds, and whether the sequence ends with it."""
        assert self.sampler is not None
        grammar = self.sampler.grammar
        if grammar is not None and grammar.failed:
            return "", None, f"the output grammar failed: {grammar.failed}"
        tok = self._model.tokenizer
        if tok.is_eog(token):
            return "", "stop", None
        text = self.stops.feed(self.detok.feed(tok.piece(token)))
        if self.stops.stopped or (grammar is not None and grammar.complete):
            return text, "stop", None
        if self.generated >= self.max_new:
            return text, "length", None
        return text, None, None

    def _text(self, text: str) -> TextDelta:
        logprobs, self._pending = tuple(self._pending), []
        delta = TextDelta(text, tokens=self._unreported, logprobs=logprobs)
        self._unreported = 0
        return delta

    def _finish(self, text: str) -> list[Item]:
        """The last text: held-back bytes and stop-string prefixes let go (the engine adds the
        :class:`Finish`, with the usage it counted)."""
        if not self.stops.stopped:
            text += self.stops.feed(self.detok.flush())
            text += self.stops.flush()
        return [self._text(text)] if text else []

    def finish(self, reason: FinishReason, usage: Usage) -> Finish:
        return Finish(reason, usage, self.stops.matched)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
