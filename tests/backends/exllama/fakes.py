"""A stand-in for the ExLlama dynamic generators, to test the adapter's own logic on a CPU.

:class:`FakeGenerator` keeps the libraries' shape: jobs are enqueued into a pending list,
started when the batch and the free cache pages allow (pages reserved for prompt +
``max_new_tokens``), and every ``iterate()`` returns the same result dicts
(``started``/``prefill``/``streaming`` with ``text``, ``token_ids``, ``eos``, ``eos_reason``,
``new_tokens``, ``cached_tokens``). Each job emits one token per step from a scripted reply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backends._exllama.config import EnginePlan, ExllamaModelConfig
from backends._exllama.engine import JobSpec

PAGE = 256
BOS, EOS = 1, 2
SPECIALS = {"<s>": BOS, "</s>": EOS}


class Ids:
    """Like a (1, n) token tensor: only ``shape`` is read."""

    def __init__(self, n: int) -> None:
        self.shape = (1, n)


@dataclass(eq=False)
class FakeJob:
    identifier: int
    input_ids: tuple[int, ...]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    #: One piece of text per token; ``None`` is a stop (EOS) token.
    script: list[str | None]
    seed: int | None = None
    new_tokens: int = 0
    cached_pages: int = 0
    cached_tokens: int = 0
    pages: int = 0
    started: bool = False
    #: Speculative decoding: the libraries' jobs count their drafts as they are verified.
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0

    @property
    def pages_needed(self) -> int:
        return math.ceil((len(self.input_ids) + self.max_new_tokens) / PAGE)


@dataclass
class FakeGenerator:
    max_batch_size: int = 4
    max_pages: int = 64
    step_delay_s: float = 0.0
    pending: list[FakeJob] = field(default_factory=list)
    active: list[FakeJob] = field(default_factory=list)
    cancelled: list[FakeJob] = field(default_factory=list)
    #: Prompts of earlier jobs, for prefix reuse (whole pages, like the real page table).
    history: list[tuple[int, ...]] = field(default_factory=list)
    fail_next_iterate: Exception | None = None
    fail_enqueue: Exception | None = None
    #: Identifiers for which the next step yields a v3-style "error" result.
    fail_jobs: set[int] = field(default_factory=set)
    iterations: int = 0
    #: (accepted, rejected) draft tokens each job's decode step adds to its counters.
    drafts: tuple[int, int] = (0, 0)

    @property
    def page_size(self) -> int:
        return PAGE

    @property
    def used_pages(self) -> int:
        return sum(j.pages for j in self.active)

    def enqueue(self, job: FakeJob) -> int:
        if self.fail_enqueue is not None:
            raise self.fail_enqueue
        assert job.pages_needed <= self.max_pages, "Job requires more pages than the cache has"
        self.pending.append(job)
        return job.identifier

    def cancel(self, job: FakeJob) -> None:
        if job in self.pending:
            self.pending.remove(job)
        elif job in self.active:
            self.active.remove(job)
            job.pages = 0
        else:
            return
        self.cancelled.append(job)

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def clear_queue(self) -> None:
        for job in self.active:
            job.pages = 0
        self.pending.clear()
        self.active.clear()

    def _prefix_pages(self, ids: tuple[int, ...]) -> int:
        best = 0
        for old in self.history:
            n = 0
            for a, b in zip(old, ids[:-1], strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n // PAGE)
        return best

    def iterate(self) -> list[dict[str, Any]]:
        self.iterations += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_next_iterate is not None:
            err, self.fail_next_iterate = self.fail_next_iterate, None
            raise err
        results: list[dict[str, Any]] = []
        for job in list(self.pending):
            free = self.max_pages - self.used_pages
            if len(self.active) >= self.max_batch_size or job.pages_needed > free:
                continue
            self.pending.remove(job)
            self.active.append(job)
            job.pages = job.pages_needed
            job.cached_pages = self._prefix_pages(job.input_ids)
            self.history.append(job.input_ids)
            base = {"job": job, "serial": job.identifier, "identifier": job.identifier}
            results.append({**base, "stage": "started", "eos": False})
            results.append(
                {**base, "stage": "prefill", "eos": False, "curr_progress": 1, "max_progress": 1}
            )
        for job in list(self.active):
            results.append(self._step(job))
        return results

    def _step(self, job: FakeJob) -> dict[str, Any]:
        base = {"job": job, "serial": job.identifier, "identifier": job.identifier}
        if job.identifier in self.fail_jobs:
            self._retire(job)
            return {**base, "stage": "error", "eos": True, "error": RuntimeError("job exploded")}
        piece = job.script[job.new_tokens % len(job.script)]
        job.new_tokens += 1
        job.accepted_draft_tokens += self.drafts[0]
        job.rejected_draft_tokens += self.drafts[1]
        r: dict[str, Any] = {**base, "stage": "streaming", "eos": False}
        if piece is None:
            self._retire(job)
            r.update(eos=True, eos_reason="stop_token", eos_triggering_token_id=EOS)
        else:
            r.update(text=piece, token_ids=Ids(1))
            if job.new_tokens >= job.max_new_tokens:
                self._retire(job)
                r.update(eos=True, eos_reason="max_new_tokens")
        if r["eos"]:
            r.update(
                new_tokens=job.new_tokens,
                prompt_tokens=len(job.input_ids),
                cached_pages=job.cached_pages,
                cached_tokens=job.cached_pages * PAGE + job.cached_tokens,
                full_completion="",
            )
        return r

    def _retire(self, job: FakeJob) -> None:
        self.active.remove(job)
        job.pages = 0


def char_tokens(text: str, special: bool) -> list[int]:
    """A tokenizer for tests: one token per character; ``<s>``/``</s>`` parsed if ``special``."""
    ids: list[int] = []
    i = 0
    while i < len(text):
        for piece, tid in SPECIALS.items():
            if special and text.startswith(piece, i):
                ids.append(tid)
                i += len(piece)
                break
        else:
            ids.append(ord(text[i]) + 10)
            i += 1
    return ids


Script = Callable[[JobSpec], list[str | None]]


@dataclass
class FakeModel:
    """A loaded model as the backend sees it, around a :class:`FakeGenerator`."""

    plan: EnginePlan
    generator: FakeGenerator
    script: Script
    vocab_size: int = 50_000
    stop_token_ids: tuple[int, ...] = (EOS,)
    special_pieces: frozenset[str] = frozenset(SPECIALS)
    bos_token_id: int | None = BOS
    encoded: list[tuple[str, bool]] = field(default_factory=list)
    jobs: list[FakeJob] = field(default_factory=list)
    #: What each job was made from (its grammar, whether it decodes special tokens).
    specs: list[JobSpec] = field(default_factory=list)
    unloaded: bool = False
    fail_make_job: bool = False

    @property
    def request_jobs(self) -> list[FakeJob]:
        """Jobs after the backend's warm-up job (the first one, when it ran)."""
        warm = (
            bool(self.jobs) and self.jobs[0].max_new_tokens == 2 and not self.jobs[0].stop_token_ids
        )
        return self.jobs[1:] if warm else self.jobs

    def encode(self, text: str, *, special: bool) -> list[int]:
        self.encoded.append((text, special))
        return char_tokens(text, special)

    def make_job(self, spec: JobSpec, identifier: int) -> FakeJob:
        if self.fail_make_job:
            raise ValueError("bad job")
        job = FakeJob(
            identifier,
            spec.input_ids,
            spec.max_new_tokens,
            spec.stop_token_ids,
            self.script(spec),
            seed=spec.sampling.seed,
        )
        self.jobs.append(job)
        self.specs.append(spec)
        return job

    def cached_tokens(self, job: FakeJob) -> int:
        return job.cached_pages * PAGE + job.cached_tokens

    def kv_usage(self) -> tuple[int, int]:
        return self.generator.used_pages * PAGE, self.generator.max_pages * PAGE

    def describe(self) -> str:
        return "fake generator"

    def unload(self) -> None:
        self.unloaded = True


def words(reply: str) -> Script:
    """A script that replies ``reply`` one character per token, then EOS."""
    pieces: list[str | None] = [*reply, None]
    return lambda spec: pieces


def endless(piece: str = "x") -> Script:
    return lambda spec: [piece]


def plan(
    *, max_seq_len: int = 4096, batch: int = 4, paged: bool = True, cache: int | None = None
) -> EnginePlan:
    return EnginePlan(
        max_seq_len=max_seq_len,
        cache_tokens=cache or max_seq_len * batch,
        max_batch_size=batch,
        chunk_tokens=256,
        paged=paged,
    )


@dataclass
class FakeLoader:
    """A version loader that returns a :class:`FakeModel` and remembers it."""

    script: Script = field(default_factory=lambda: words("Hello world"))
    plan: EnginePlan = field(default_factory=plan)
    step_delay_s: float = 0.0
    model: FakeModel | None = None

    def __call__(self, name: str, config: ExllamaModelConfig) -> FakeModel:
        gen = FakeGenerator(
            max_batch_size=self.plan.max_batch_size,
            max_pages=self.plan.cache_tokens // PAGE,
            step_delay_s=self.step_delay_s,
        )
        self.model = FakeModel(self.plan, gen, self.script)
        return self.model
