"""Speculative decoding in the llama.cpp engine: which sequences draft, and how much.

:class:`Speculation` is one model's policy (``[models.NAME.speculative]``). Each step every
generating sequence proposes a draft from its :class:`Drafts` (its context, then the shared
pool); :meth:`Speculation.plan` then decides how much of each to verify. A draft token is worth
its place in the step when the tokens it is expected to add outweigh what it slows the step
down for every sequence in it: the ``j``-th token of a sequence whose drafts are taken with
probability ``p`` (:class:`Acceptance`) adds ``p**j`` tokens, and :class:`StepCost` (fitted to
this machine's own decode times) says what one more token costs. So a step that is already
compute-bound (many sequences, a prompt being read; a CPU) drafts little or nothing, a GPU's
memory-bound step drafts freely, and a sequence whose drafts keep missing stops drafting
(and tries again now and then). A sequence never drafts past its ``max_tokens``; the whole
step's drafts stay within ``max_step_draft``. Models whose memory cannot drop a tail of cells
(recurrent, hybrid) do not speculate: a rejected draft's cells must go.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from backends.llamacpp.config import LlamaCppSpeculative
from backends.llamacpp.drafting import ContextDrafter, NgramPool

log = logging.getLogger("backends.llamacpp.speculation")


class Acceptance:
    """How likely a sequence's next draft token is to be taken: a Beta estimate over its
    drafts so far, which drifts back to the prior while the sequence does not draft (so a
    sequence that stopped drafting tries again later)."""

    PRIOR = 0.6
    WEIGHT = 2.0
    FORGET = 0.97

    def __init__(self) -> None:
        self.taken = 0.0
        self.missed = 0.0

    @property
    def p(self) -> float:
        w = self.WEIGHT
        return (self.taken + w * self.PRIOR) / (self.taken + self.missed + w)

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            self.taken *= self.FORGET
            self.missed *= self.FORGET
            return
        self.taken += accepted
        self.missed += accepted < drafted


class StepCost:
    """Seconds a decode step takes, fitted to the steps this engine ran: ``a + b * tokens +
    c * outputs`` (least squares over the recent steps, refitted every few)."""

    WINDOW = 256
    REFIT = 16

    def __init__(self) -> None:
        self._steps: deque[tuple[int, int, float]] = deque(maxlen=self.WINDOW)
        self._since = 0
        #: Until fitted: a memory-bound step, where a few more tokens cost little.
        self.a, self.b, self.c = 1.0, 0.01, 0.01

    def record(self, tokens: int, outputs: int, seconds: float) -> None:
        self._steps.append((tokens, outputs, seconds))
        self._since += 1
        if self._since >= self.REFIT and len(self._steps) >= self.REFIT:
            self._since = 0
            self._fit()

    def _fit(self) -> None:
        data = np.array(self._steps, dtype=np.float64)
        x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
        if np.linalg.matrix_rank(x) < 3:
            return  # every step alike so far: nothing tells the terms apart
        (a, b, c), *_ = np.linalg.lstsq(x, data[:, 2], rcond=None)
        self.a, self.b, self.c = max(float(a), 1e-6), max(float(b), 0.0), max(float(c), 0.0)

    def seconds(self, tokens: int, outputs: int) -> float:
        return self.a + self.b * tokens + self.c * outputs

    @property
    def per_draft(self) -> float:
        """What one more draft token adds to a step (a token, with its logits)."""
        return self.b + self.c


class Drafts:
    """One sequence's drafting state: its tokens so far, indexed; how its drafts fare."""

    def __init__(self, spec: LlamaCppSpeculative, pool: NgramPool, salt: str) -> None:
        self.context = ContextDrafter(spec.ngram_min, spec.ngram_max)
        self.acceptance = Acceptance()
        self._pool = pool
        self._salt = salt

    def begin(self, prompt: Sequence[int]) -> None:
        self.context.extend(prompt)
        self._pool.add(self._salt, prompt)

    def propose(self, most: int) -> list[int]:
        if most <= 0:
            return []
        tokens = self.context.tokens
        return self.context.propose(most) or self._pool.propose(self._salt, tokens, most)

    def record(self, drawn: Sequence[int], drafted: int, accepted: int) -> None:
        """The step drew ``drawn`` (confirming ``accepted`` of ``drafted`` draft tokens)."""
        start = len(self.context.tokens)
        self.context.extend(drawn)
        self._pool.add(self._salt, self.context.tokens, start)
        self.acceptance.record(drafted, accepted)


class Speculation:
    """One model's drafting policy."""

    def __init__(self, spec: LlamaCppSpeculative, *, enabled: bool) -> None:
        self.spec = spec
        self.enabled = enabled and spec.mode != "off"
        self.pool = NgramPool(spec.ngram_max)
        self.cost = StepCost()

    def _everything(self, candidates: list[tuple[float, int]]) -> list[int]:
        room = self.spec.max_step_draft
        take = []
        for _, n in candidates:
            take.append(min(n, room))
            room -= take[-1]
        return take

    @classmethod
    def for_model(cls, llama: ModuleType, model: Any, spec: LlamaCppSpeculative) -> Speculation:
        can = not (llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model))
        if spec.mode != "off" and not can:
            log.warning("speculative decoding is off: this model's memory cannot drop cells")
        return cls(spec, enabled=can)

    def drafts(self, salt: str) -> Drafts | None:
        return Drafts(self.spec, self.pool, salt) if self.enabled else None

    def limits(self, rows: Sequence[tuple[Drafts | None, int]]) -> list[tuple[float, int]]:
        """Plan candidates for a draft model: each sequence's acceptance, and how many tokens
        it may draft (its tokens left before ``max_tokens``, at most ``draft_max``)."""
        most = self.spec.draft_max
        return [(d.acceptance.p if d else 0.0, min(left, most) if d else 0) for d, left in rows]

    def plan(self, candidates: list[tuple[float, int]], tokens: int, outputs: int) -> list[int]:
        """How many tokens of each candidate draft (its sequence's acceptance ``p``, its
        length) to verify in a step of ``tokens`` tokens (``outputs`` with logits), one per
        generating sequence among them: the best-paying draft tokens first, while each adds
        more tokens than it costs."""
        if self.spec.policy == "always":
            return self._everything(candidates)
        cost = self.cost
        seconds = cost.seconds(tokens, outputs)
        expected = float(sum(1 for _ in candidates))
        per = cost.per_draft
        take = [0] * len(candidates)
        # the j-th token of draft i pays p_i ** j: best first
        heap = [(-p, i) for i, (p, n) in enumerate(candidates) if n > 0 and p > 0]
        heapq.heapify(heap)
        room = self.spec.max_step_draft
        while heap and room > 0:
            neg, i = heapq.heappop(heap)
            gain = -neg
            if gain * seconds <= per * expected:  # tokens per second would fall
                break
            take[i] += 1
            room -= 1
            expected += gain
            seconds += per
            p, n = candidates[i]
            if take[i] < n:
                heapq.heappush(heap, (-(gain * p), i))
        return take
