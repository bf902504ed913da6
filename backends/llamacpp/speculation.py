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

import bisect
import heapq
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from backends.llamacpp.config import LlamaCppSpeculative
from backends.llamacpp.drafting import ContextDrafter, NgramPool

log = logging.getLogger("backends.llamacpp.speculation")


class Acceptance:
    """How likely a draft token is to be taken: a Beta estimate over the drafts seen, around a
    prior it drifts back to while nothing is drafted (so drafting is tried again later)."""

    WEIGHT = 4.0
    FORGET = 0.98

    def __init__(self, prior: float = 0.6) -> None:
        self.prior = prior
        self.taken = 0.0
        self.missed = 0.0

    def p(self, prior: float | None = None) -> float:
        w, p0 = self.WEIGHT, self.prior if prior is None else prior
        return (self.taken + w * p0) / (self.taken + self.missed + w)

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            self.taken *= self.FORGET
            self.missed *= self.FORGET
            return
        self.taken += accepted
        self.missed += accepted < drafted


class StepCost:
    """Seconds a generating step of ``n`` tokens takes (every token with its logits), from
    the steps this engine ran: a running average per size, read between sizes seen along a
    straight line. Past the largest size seen it assumes each token adds 5% (a memory-bound
    step's cost: optimistic, so larger drafts get tried and measured). A size not seen again
    for ``MAX_AGE`` steps is forgotten (checked every ``PRUNE`` steps), so one slow step never
    rules a size out for good."""

    SMOOTH = 0.2
    PRIOR_SLOPE = 0.05
    MAX_AGE = 256
    PRUNE = 32

    def __init__(self) -> None:
        #: size -> (average seconds, the step it was last seen at)
        self._seen: dict[int, tuple[float, int]] = {}
        self._step = 0
        #: The sizes seen lately, by size (rebuilt as steps are recorded).
        self.table: dict[int, float] = {}
        self._sizes: list[int] = []

    def record(self, n: int, seconds: float) -> None:
        self._step += 1
        old = self.table.get(n)
        average = seconds if old is None else old + self.SMOOTH * (seconds - old)
        self._seen[n] = (average, self._step)
        self.table[n] = average
        if old is None:
            bisect.insort(self._sizes, n)
        if self._step % self.PRUNE == 0:  # sizes not seen lately go (not every step: hot path)
            step = self._step
            self._seen = {k: v for k, v in self._seen.items() if step - v[1] <= self.MAX_AGE}
            self._sizes = sorted(self._seen)
            self.table = {k: self._seen[k][0] for k in self._sizes}

    def pass_seconds(self) -> float:
        """What one more micro-batch costs (a pass over the weights): the cost of a step of
        one token, as seen or read off the smallest step seen."""
        return self.seconds(1)

    def seconds(self, n: int) -> float:
        table, sizes = self.table, self._sizes
        if n in table:
            return table[n]
        if not sizes:
            return 1.0 + self.PRIOR_SLOPE * n
        i = bisect.bisect_left(sizes, n)
        if 0 < i < len(sizes):
            lo, hi = sizes[i - 1], sizes[i]
            return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)
        if i == 0:
            return table[sizes[0]] * n / sizes[0]
        lo = sizes[-1]
        return table[lo] * (1 + self.PRIOR_SLOPE * (n - lo))


class Drafts:
    """One sequence's drafting state: its tokens so far, indexed; how its drafts fare."""

    def __init__(self, speculation: Speculation, salt: str) -> None:
        spec = speculation.spec
        # a draft model needs the tokens only; n-grams index them
        self.context = ContextDrafter(spec.ngram_min, spec.ngram_max, index=spec.mode == "ngram")
        self.acceptance = Acceptance()
        self._speculation = speculation
        self._salt = salt
        #: The source of the draft being verified (its acceptance is learned per source).
        self._source = MODEL if spec.mode == "draft" else POOL

    def begin(self, prompt: Sequence[int]) -> None:
        self.context.extend(prompt)
        if self._speculation.uses_pool:
            self._speculation.pool.add(self._salt, prompt)

    def propose(self, most: int) -> tuple[list[int], float]:
        """A draft of at most ``most`` tokens, and how likely each of its tokens is taken."""
        if most <= 0:
            return [], 0.0
        draft, n = self.context.propose(most)
        if not draft and self._speculation.uses_pool:
            pool = self._speculation.pool
            draft, n = pool.propose(self._salt, self.context.tokens, most), POOL
        self._source = n if draft else 0
        return draft, self.p(n)

    def p(self, source: int) -> float:
        """Acceptance: this sequence's own, around what drafts of this source do model-wide."""
        return self.acceptance.p(self._speculation.source(source).p())

    def record(
        self, drawn: Sequence[int], drafted: int, accepted: int, *, ended: bool = False
    ) -> None:
        """The step drew ``drawn`` (confirming ``accepted`` of ``drafted`` draft tokens); a
        sequence that ``ended`` in it stopped drawing without rejecting anything."""
        if ended:
            drafted = accepted
        start = len(self.context.tokens)
        self.context.extend(drawn)
        spec = self._speculation
        if spec.uses_pool:
            spec.pool.add(self._salt, self.context.tokens, start)
        self.acceptance.record(drafted, accepted)
        if drafted:
            spec.source(self._source).record(drafted, accepted)


#: The source of a pool draft (context drafts are told apart by their match size, 1..32) and
#: of a draft model's.
POOL, MODEL = 0, -1
_BANDS = (8, 12, 16, 24, 32)
#: Draft lengths past 8 a per-stream plan weighs (besides a draft's whole length).
_LENGTHS = frozenset((12, 16, 24, 32, 48, 64, 96, 128))


def micro_batches(seq_ids: Sequence[int], lengths: Sequence[int]) -> int:
    """The micro-batches llama.cpp splits a step into when each sequence has a KV stream of
    its own (``llama_batch_allocr::split_equal``, sequential): the rows (``seq_ids`` with
    ``lengths`` tokens each) in id order; each micro-batch takes the run of consecutive ids
    that starts at the first row with tokens left, the same number of tokens from each."""
    left = dict(sorted(zip(seq_ids, lengths, strict=True)))
    count = 0
    while left:
        run = [next(iter(left))]
        while run[-1] + 1 in left:
            run.append(run[-1] + 1)
        n = min(left[s] for s in run)
        for s in run:
            left[s] -= n
            if not left[s]:
                del left[s]
        count += 1
    return count


def extra_passes(seq_ids: Sequence[int], drafted: Sequence[int]) -> int:
    """The micro-batches a generating step whose sequences (``seq_ids``) verify ``drafted``
    draft tokens each takes beyond the same step without drafts."""
    base = [1] * len(seq_ids)
    return micro_batches(seq_ids, [1 + k for k in drafted]) - micro_batches(seq_ids, base)


def _in_runs(seq_ids: Sequence[int]) -> list[int]:
    """1 for a sequence id with a neighbour among ``seq_ids`` (its draft needs a micro-batch
    of its own), 0 for one alone (its whole row is a micro-batch already)."""
    ids = set(seq_ids)
    return [int(s - 1 in ids or s + 1 in ids) for s in seq_ids]


#: Draft lengths a plan of one length for every sequence weighs (besides the drafts' own).
_LEVELS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class _Step:
    """A generating step of ``tokens`` tokens (one per sequence, ``seq_ids``, each with a KV
    stream of its own) and the drafts it may verify: what a plan is expected to give."""

    def __init__(
        self,
        cost: StepCost,
        candidates: list[tuple[float, int]],
        tokens: int,
        seq_ids: Sequence[int],
    ) -> None:
        self.cost, self.candidates, self.tokens, self.seq_ids = cost, candidates, tokens, seq_ids
        self.per_pass = cost.pass_seconds()

    def rate(self, take: Sequence[int]) -> float:
        """Tokens a step verifying ``take`` draft tokens of each sequence is expected to
        write, per second (its micro-batches beyond a step without drafts cost a pass each)."""
        expected = float(len(take))
        for (p, _), k in zip(self.candidates, take, strict=True):
            expected += k if p >= 1.0 else p * (1 - p**k) / (1 - p)
        extra = extra_passes(self.seq_ids, take)
        return expected / (self.cost.seconds(self.tokens + sum(take)) + extra * self.per_pass)


class Speculation:
    """One model's drafting policy."""

    def __init__(self, spec: LlamaCppSpeculative, *, enabled: bool) -> None:
        self.spec = spec
        self.enabled = enabled and spec.mode != "off"
        self.uses_pool = self.enabled and spec.mode == "ngram"
        self.pool = NgramPool(spec.ngram_max, size=1 << 20 if self.uses_pool else 1 << 4)
        self.cost = StepCost()
        self._sources: dict[int, Acceptance] = {}

    @classmethod
    def for_model(cls, llama: ModuleType, model: Any, spec: LlamaCppSpeculative) -> Speculation:
        can = not (llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model))
        if spec.mode != "off" and not can:
            log.warning("speculative decoding is off: this model's memory cannot drop cells")
        return cls(spec, enabled=can)

    def source(self, n: int) -> Acceptance:
        """Model-wide acceptance of drafts from one source: a longer context match is the
        likelier copy (its prior grows with the match; matches past 8 tokens are learned in
        bands: 8-11, 12-15, 16-23, 24-31, 32)."""
        if n > 8:
            n = max(b for b in _BANDS if b <= n)
        found = self._sources.get(n)
        if found is None:
            prior = 0.5 if n <= 0 else min(0.9, 0.45 + 0.1 * n)
            found = self._sources[n] = Acceptance(prior)
        return found

    def drafts(self, salt: str) -> Drafts | None:
        return Drafts(self, salt) if self.enabled else None

    def plan(
        self,
        candidates: list[tuple[float, int]],
        tokens: int,
        seq_ids: Sequence[int] | None = None,
    ) -> list[int]:
        """How many tokens of each candidate draft (its tokens' acceptance ``p``, its length)
        to verify in a generating step of ``tokens`` tokens, one per candidate: the total
        that makes the most tokens per second, taking draft tokens best first (the ``j``-th
        token of a draft pays ``p ** j``). ``seq_ids`` (the candidates' sequence ids) says
        each sequence has a KV stream of its own: see :meth:`_plan_per_stream`."""
        if self.spec.policy == "always":
            return self._everything(candidates)
        if seq_ids is not None and len(candidates) > 1:
            return self._plan_per_stream(candidates, tokens, seq_ids)
        order: list[int] = []
        gains: list[float] = []
        heap = [(-p, i, 1) for i, (p, n) in enumerate(candidates) if n > 0 and p > 0]
        heapq.heapify(heap)
        while heap and len(order) < self.spec.max_step_draft:
            neg, i, j = heapq.heappop(heap)
            order.append(i)
            gains.append(-neg)
            p, n = candidates[i]
            if j < n:
                heapq.heappush(heap, (neg * p, i, j + 1))
        expected = float(len(candidates))
        best, best_rate = 0, expected / self.cost.seconds(tokens)
        for d, gain in enumerate(gains, 1):
            expected += gain
            rate = expected / self.cost.seconds(tokens + d)
            if rate > best_rate:
                best, best_rate = d, rate
        take = [0] * len(candidates)
        for i in order[:best]:
            take[i] += 1
        return take

    def _plan_per_stream(
        self, candidates: list[tuple[float, int]], tokens: int, seq_ids: Sequence[int]
    ) -> list[int]:
        """With a KV stream per sequence llama.cpp splits a step into micro-batches of
        consecutive sequence ids, the same number of tokens from each (:func:`micro_batches`),
        and every micro-batch is one more pass over the weights (:meth:`StepCost.pass_seconds`).
        Two kinds of plan keep the passes few: drafts of one length for every sequence with
        one (the step stays one micro-batch: a copy task on every stream), or a few sequences'
        whole drafts, each in a pass of its own (:meth:`_plan_whole_drafts`). The plan whose
        step is expected to write the most tokens per second, counting its passes, is taken."""
        step = _Step(self.cost, candidates, tokens, seq_ids)
        best = self._plan_whole_drafts(step)
        best_rate = step.rate(best)
        for take in self._levels(candidates):
            rate = step.rate(take)
            if rate > best_rate:
                best, best_rate = take, rate
        return best

    def _levels(self, candidates: list[tuple[float, int]]) -> list[list[int]]:
        """Plans drafting up to ``k`` tokens for every sequence with a draft, one per ``k``
        (the lengths the drafts have, and a few between), within ``max_step_draft``."""
        longest = max((n for p, n in candidates if p > 0), default=0)
        ks = sorted(
            {n for p, n in candidates if p > 0 and n > 0} | {k for k in _LEVELS if k < longest}
        )
        plans = []
        for k in ks:
            take = [min(k, n) if p > 0 else 0 for p, n in candidates]
            if sum(take) > self.spec.max_step_draft:
                break
            plans.append(take)
        return plans

    def _plan_whole_drafts(self, step: _Step) -> list[int]:
        """A sequence's draft in a micro-batch of its own: drafts are taken a whole sequence
        at a time, the one that raises the step's rate most first, and only a draft worth its
        own pass (a long likely copy) is verified."""
        candidates, cost, room = step.candidates, self.cost, self.spec.max_step_draft
        per_pass = step.per_pass
        shared = _in_runs(step.seq_ids)  # alone in its run of ids: its draft rides its pass
        take = [0] * len(candidates)
        expected, drafted, passes = float(len(candidates)), 0, 0
        rate = expected / cost.seconds(step.tokens)
        while room > drafted:
            best: tuple[float, int, int, float] | None = None
            for i, (p, n) in enumerate(candidates):
                if take[i] or n <= 0 or p <= 0:
                    continue
                extra = passes + shared[i]
                gain, pj = 0.0, 1.0
                for k in range(1, min(n, room - drafted) + 1):
                    pj *= p
                    gain += pj
                    if k > 8 and k not in _LENGTHS and k != n:
                        continue  # long drafts are weighed at a few lengths only
                    seconds = cost.seconds(step.tokens + drafted + k) + extra * per_pass
                    r = (expected + gain) / seconds
                    if r > rate and (best is None or r > best[0]):
                        best = (r, i, k, gain)
            if best is None:
                break
            rate, i, k, gain = best
            take[i] = k
            expected += gain
            drafted += k
            passes += shared[i]
        return take

    def _everything(self, candidates: list[tuple[float, int]]) -> list[int]:
        room = self.spec.max_step_draft
        take = []
        for _, n in candidates:
            take.append(min(n, room))
            room -= take[-1]
        return take

    def limits(self, rows: Sequence[tuple[Drafts | None, int]]) -> list[tuple[float, int]]:
        """Plan candidates for a draft model: each sequence's acceptance, and how many tokens
        it may draft (its tokens left before ``max_tokens``, at most ``draft_max``)."""
        most = self.spec.draft_max
        return [(d.p(MODEL) if d else 0.0, min(left, most) if d else 0) for d, left in rows]
