"""The engine thread: one per loaded model, continuous batching over its sequences' KV cells.

Each step, between two ``llama_decode`` calls, the engine takes in new requests and
cancellations, places new sequences (prefix reuse, :mod:`backends.llamacpp.slots`), and builds
one batch: the next token of every decoding sequence plus up to ``prefill_chunk_tokens`` prompt
tokens of sequences still in prefill. After the decode it samples each sequence that has
logits, detokenizes, applies stop strings, and delivers the step's deltas to each request
through the callback it came with (which hands them to the event loop). The event loop never
waits on this thread; this thread never touches asyncio.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.llamacpp.decoding import Decoding, Item, Verdict
from backends.llamacpp.draft_model import DraftFailed, DraftModel
from backends.llamacpp.embed_step import EmbedStep
from backends.llamacpp.embeddings import EmbedSpec, Pooler
from backends.llamacpp.kv_tiers import KVTiers
from backends.llamacpp.model import LoadedModel
from backends.llamacpp.slots import SlotManager
from backends.llamacpp.speculation import Drafts, Speculation, extra_passes
from gateway.backend import EngineStats
from gateway.errors import EngineError, ModelUnavailable
from gateway.kv_events.ledger import BlockLedger
from gateway.output.matchers import Constraint
from gateway.types import PromptProgress, SamplingParams, Usage

log = logging.getLogger("backends.llamacpp.engine")

Deliver = Callable[[list[Item]], None]


@dataclass(eq=False)
class Job:
    """One sequence to generate (or input to embed), from submission to its last delta."""

    request_id: str
    prompt: list[int]
    #: Tokens to generate at most (the request's max_tokens, or up to the slot's context).
    max_new: int
    params: SamplingParams
    stop: tuple[str, ...]
    #: Called on the engine thread with the deltas of one step (thread-safe hand-off).
    deliver: Deliver
    #: Set for an input to embed (no tokens are generated).
    embed: EmbedSpec | None = None
    #: The grammar of a constrained sequence (its own matcher).
    constraint: Constraint | None = None
    #: Report each token's logprob and this many alternatives (None: no logprobs).
    logprobs: int | None = None
    #: The prefix-cache partition it may reuse and leaves its prefix in (a salt digest).
    salt: str = ""
    #: Report the prompt's progress (:class:`PromptProgress`) while it is read.
    progress: bool = False
    #: ``time.perf_counter()`` when the engine took it.
    admitted_at: float = 0.0
    #: Set from the event loop when the client is gone.
    cancel_requested: bool = False
    seq_id: int = -1
    n_past: int = 0
    cached: int = 0
    #: The last token drawn, to decode in the next step (None: nothing drawn yet).
    next_token: int | None = None
    done: bool = False
    #: Its decoding state, once admitted (None for an input to embed).
    decoding: Decoding | None = None
    #: What it drafts from, with speculative decoding on.
    drafts: Drafts | None = None
    #: An input to embed: its token vectors pooled so far.
    pooler: Pooler | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    @property
    def generated(self) -> int:
        return self.decoding.generated if self.decoding is not None else 0


@dataclass
class Counters:
    decode_steps: int = 0
    tokens_generated: int = 0
    tokens_after_cancel: int = 0
    cancelled: int = 0
    max_batch_sequences: int = 0
    cached_prompt_tokens: int = 0
    prompt_tokens_processed: int = 0
    draft_tokens: int = 0
    draft_accepted: int = 0


@dataclass
class Row:
    """A job's part of one batch: its tokens, and the batch rows whose logits it asked for
    (none; the last prompt token's; or, for a generating sequence, every token's: the last
    token drawn and each drafted one)."""

    job: Job
    tokens: list[int]
    outputs: list[int] = field(default_factory=list)
    #: Drafted tokens at the end of ``tokens`` (speculative decoding).
    drafted: int = 0


class Engine:
    def __init__(
        self,
        name: str,
        model: LoadedModel,
        *,
        n_live: int,
        tiers: KVTiers | None = None,
        draft: DraftModel | None = None,
        blocks: BlockLedger | None = None,
    ) -> None:
        cfg = model.config
        self.name = name
        self.model = model
        self.n_live = n_live
        self.chunk = cfg.batching.prefill_chunk_tokens
        self.slots = SlotManager(
            model.memory,
            n_live=n_live,
            n_cached=model.n_seq - n_live,
            n_cells=cfg.n_ctx_total,
            prefix_reuse=cfg.kv_cache.prefix_reuse,
            min_prefix=cfg.kv_cache.min_prefix_tokens,
            tiers=tiers,
            blocks=blocks,
        )
        self.speculation = Speculation.for_model(model.llama, model.model, cfg.speculative)
        #: The draft model (``mode = "draft"``), drafting in this thread.
        self.draft_model = draft if self.speculation.enabled else None
        if draft is not None and self.draft_model is None:
            draft.close()  # this model cannot speculate: the draft model is not needed
        self.counters = Counters()
        self.embedder = EmbedStep(self)
        self.failure: BaseException | None = None
        #: How long the last ``llama_decode`` took, and the draft model's drafting before it.
        self.decode_seconds = 0.0
        self.draft_seconds = 0.0
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._cancels: list[Job] = []
        self._stopping = False
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._run, name=f"llamacpp {name}", daemon=True)

    # --- called from the event loop (any thread) -------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or self.failure is not None:
                raise ModelUnavailable(f"model {self.name!r} is shutting down")
            self._inbox.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the sequence and free its cells before the next step."""
        job.cancel_requested = True
        with self._cond:
            self._cancels.append(job)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stats(self) -> EngineStats:
        c = self.counters
        return EngineStats(
            active_sequences=len(self._running),
            queued_sequences=len(self._waiting) + len(self._inbox),
            decode_steps=c.decode_steps,
            tokens_generated=c.tokens_generated,
            tokens_after_cancel=c.tokens_after_cancel,
            cancelled=c.cancelled,
            kv_cells_used=self.slots.cells_used,
            kv_cells_total=self.slots.n_cells,
            max_batch_sequences=c.max_batch_sequences,
            cached_prompt_tokens=c.cached_prompt_tokens,
            prompt_tokens_processed=c.prompt_tokens_processed,
            draft_tokens=c.draft_tokens,
            draft_accepted=c.draft_accepted,
        )

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_commands():
                self._admit()
                if self._running:
                    self._step()
        except Exception as err:  # a bug or a fatal llama.cpp error: fail everything, stop
            log.exception("engine of model %s failed", self.name)
            self.failure = err
            self._fail_all(EngineError("the llama.cpp engine failed (the server log has why)"))
        else:
            self._fail_all(ModelUnavailable(f"model {self.name!r} was unloaded"))
            self._spill()
        finally:
            if self.draft_model is not None:
                self.draft_model.close()
            self.model.close()
            if self.slots.blocks is not None:
                self.slots.blocks.clear()  # the cells are gone

    def _spill(self) -> None:
        """The model unloads: its cached prefixes go to the tiers, and the host tier's to
        disk (written before the backend reports the unload done)."""
        tiers = self.slots.tiers
        if tiers is None:
            return
        n = self.slots.spill_all()
        tiers.persist()
        log.info("model %s: %d cached prefixes saved to the KV tiers", self.name, n)

    def _take_commands(self) -> bool:
        """Move new jobs and cancellations in (waiting while idle); False once stopping."""
        with self._cond:
            while not (self._inbox or self._cancels or self._stopping or self._has_work()):
                self._cond.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        self._waiting.extend(inbox)
        for job in cancels:
            self._drop(job)
        for job in [*self._running, *self._waiting]:
            if job.cancel_requested:  # its cancel command is on its way: drop it now
                self._drop(job)
        return True

    def _has_work(self) -> bool:
        return bool(self._running) or (bool(self._waiting) and self.slots.can_admit())

    def _drop(self, job: Job) -> None:
        if job.done:
            return
        self.counters.cancelled += 1
        if job in self._waiting:
            self._waiting.remove(job)
            job.done = True
            self._close(job)
        elif job in self._running:
            self.end(job, keep=False)
        else:
            job.done = True

    def _close(self, job: Job) -> None:
        if job.decoding is not None:
            job.decoding.close()

    def end(self, job: Job, *, keep: bool) -> None:
        """A running sequence is done: its slot released (its cells kept as a cached prefix,
        or freed), its sampler freed; it leaves the running list last, so a reader of
        :meth:`stats` that sees it gone sees its cells settled too."""
        job.done = True
        self.slots.release(job.seq_id, keep=keep)
        if self.draft_model is not None:
            self.draft_model.forget(job.seq_id)
        self._close(job)
        self._running.remove(job)

    def _admit(self) -> None:
        model = self.model
        while self._waiting and self.slots.can_admit():
            job = self._waiting.popleft()
            # an embedding needs every token's vector: nothing of it may come from the cache
            placement = self.slots.acquire(job.prompt, reuse=job.embed is None, salt=job.salt)
            job.seq_id, job.n_past, job.cached = (
                placement.seq_id,
                placement.reused,
                placement.reused,
            )
            self.counters.cached_prompt_tokens += placement.reused
            job.admitted_at = time.perf_counter()
            if job.embed is None:
                job.decoding = Decoding(
                    model,
                    job.params,
                    stop=job.stop,
                    max_new=job.max_new,
                    constraint=job.constraint,
                    logprobs=job.logprobs,
                )
                job.drafts = self.speculation.drafts(job.salt)
                if job.drafts is not None:
                    job.drafts.begin(job.prompt)
            else:
                self.embedder.admit(job)
            self._running.append(job)
            self._progress(job)  # what the cache gave it

    def _build(self, jobs: list[Job]) -> list[Row]:
        """This step's rows: each generating sequence's last token (and its draft), then up to
        a prefill chunk of the prompts still being read, shortest remainder first."""
        decoding = [Row(j, [j.next_token]) for j in jobs if j.next_token is not None]
        prefill: list[Row] = []
        budget = self.chunk
        # the prompts with the least left to read first: a prompt found in the cache gets its
        # first token at once, not after every prompt admitted before it was read
        reading = sorted((j for j in jobs if j.prefilling), key=lambda j: len(j.prompt) - j.n_past)
        for job in reading:
            if budget <= 0:
                break
            take = job.prompt[job.n_past : job.n_past + budget]
            prefill.append(Row(job, take))
            budget -= len(take)
        if not prefill:  # a step reading a prompt is compute-bound already: no drafts
            self._add_drafts(decoding)
        # in seq id order: with a stream per sequence, llama.cpp puts consecutive ids in one
        # micro-batch
        rows = sorted(decoding + prefill, key=lambda r: r.job.seq_id)
        self.fill(rows, every_output=False)
        return rows

    def _add_drafts(self, rows: list[Row]) -> None:
        """Each generating row's draft, as much of it as pays (:meth:`Speculation.plan`)."""
        spec = self.speculation
        self.draft_seconds = 0.0
        if not spec.enabled or not rows:
            return
        if self.draft_model is not None:
            started = time.perf_counter()
            self._add_model_drafts(rows)
            spent = time.perf_counter() - started
            self.draft_seconds = max(0.0, spent - self.draft_model.catch_up_seconds)
            return
        drafts: list[list[int]] = []
        candidates: list[tuple[float, int]] = []
        for row in rows:
            job = row.job
            # never past max_tokens: the step draws at most one token more than it drafts
            left = min(job.max_new - job.generated - 1, spec.spec.draft_max)
            draft, p = job.drafts.propose(left) if job.drafts is not None else ([], 0.0)
            drafts.append(draft)
            candidates.append((p, len(draft)))
        plan = spec.plan(candidates, len(rows), self._stream_ids(rows))
        for row, draft, n in zip(rows, drafts, plan, strict=True):
            row.tokens.extend(draft[:n])
            row.drafted = n

    def _stream_ids(self, rows: list[Row]) -> list[int] | None:
        """The rows' sequence ids if each sequence has a KV stream (llama.cpp then splits the
        step by them, see :func:`backends.llamacpp.speculation.micro_batches`)."""
        return [r.job.seq_id for r in rows] if self.model.memory.streams else None

    def _record_cost(self, rows: list[Row]) -> None:
        """A generating step's time, by its tokens; with a stream per sequence, less what
        its drafts' own micro-batches cost beyond the step's first."""
        cost = self.speculation.cost
        seconds = self.decode_seconds + self.draft_seconds
        ids = self._stream_ids(rows)
        if ids is not None:
            extra = extra_passes(ids, [r.drafted for r in rows])
            seconds = max(seconds - extra * cost.pass_seconds(), seconds / (1 + extra))
        cost.record(sum(len(r.tokens) for r in rows), seconds)

    def _add_model_drafts(self, rows: list[Row]) -> None:
        """Plan first (a model's draft costs its decodes), then draft what the plan takes."""
        spec, model = self.speculation, self.draft_model
        assert model is not None
        left = [(r.job.drafts, r.job.max_new - r.job.generated - 1) for r in rows]
        plan = spec.plan(spec.limits(left), len(rows), self._stream_ids(rows))
        wants = [
            (r.job.seq_id, r.job.drafts.context.tokens if r.job.drafts else [], n)
            for r, n in zip(rows, plan, strict=True)
        ]
        try:
            drafts = model.draft(wants, catch_up=self.chunk)
        except DraftFailed as err:
            log.warning("model %s: %s; this step goes on without drafts", self.name, err)
            return
        for row, draft in zip(rows, drafts, strict=True):
            row.tokens.extend(draft)
            row.drafted = len(draft)

    def fill(self, rows: list[Row], *, every_output: bool) -> None:
        """Write ``rows`` into the batch, with logits for a generating row's every token, a
        prompt's last token, or (``every_output``) every token."""
        batch = self.model.batch
        n = 0
        for row in rows:
            job = row.job
            generating = job.next_token is not None
            last = len(row.tokens) - 1
            for i, token in enumerate(row.tokens):
                batch.token[n] = token
                batch.pos[n] = job.n_past + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = job.seq_id
                wants = generating or (
                    i == last and job.n_past + len(row.tokens) >= len(job.prompt)
                )
                batch.logits[n] = wants or every_output
                if wants:
                    row.outputs.append(n)
                n += 1
        batch.n_tokens = n

    def _step(self) -> None:
        generating = [j for j in self._running if j.embed is None]
        embedding = [j for j in self._running if j.embed is not None]
        if generating:
            self._generate_step(generating)
        if embedding:
            self.embedder.step(embedding)

    def decode(self, rows: list[Row]) -> bool:
        """One ``llama_decode`` of the filled batch (room made first); False if it failed."""
        n_tokens = sum(len(r.tokens) for r in rows)
        if not self.slots.make_room(n_tokens):
            log.warning("model %s: KV cache full with live sequences only", self.name)
        llama, model = self.model.llama, self.model
        started = time.perf_counter()
        rc = llama.llama_decode(model.ctx, model.batch)
        if rc == 1 and self.slots.evict_all_cached():
            rc = llama.llama_decode(model.ctx, model.batch)
        if rc != 0:
            self._fail_rows(rows, rc)
            return False
        self.decode_seconds = time.perf_counter() - started
        c = self.counters
        c.decode_steps += 1
        c.max_batch_sequences = max(c.max_batch_sequences, len(rows))
        return True

    def _generate_step(self, jobs: list[Job]) -> None:
        rows = self._build(jobs)
        if not rows or not self.decode(rows):
            return
        if all(r.job.next_token is not None for r in rows):  # a generating step: its cost
            self._record_cost(rows)
        c = self.counters
        for row in rows:
            job = row.job
            if job.next_token is None:
                c.prompt_tokens_processed += len(row.tokens)
            if job.cancel_requested:  # gone while this step ran: wasted work, counted
                self.slots.extend(job.seq_id, row.tokens)
                job.n_past += len(row.tokens)
                c.tokens_after_cancel += len(row.tokens) - row.drafted  # drafts are guesses
                continue
            if not row.outputs:  # a prompt chunk, more to come
                self.slots.extend(job.seq_id, row.tokens)
                job.n_past += len(row.tokens)
                self._progress(job)
                continue
            if job.next_token is None:  # the prompt's last chunk: read, its first token drawn
                self._progress(job, job.n_past + len(row.tokens))
            self.deliver(job, self._verify(row))

    def _verify(self, row: Row) -> list[Item]:
        """Draw the row's tokens; keep the cells of the draft tokens the draws confirmed,
        remove the rest; the sequence's deltas."""
        job = row.job
        assert job.decoding is not None
        draft = row.tokens[len(row.tokens) - row.drafted :] if row.drafted else []
        verdict = job.decoding.verify(row.outputs, draft)
        if self.draft_model is not None and job.drafts is not None:
            known = len(job.drafts.context.tokens)  # the draft cells past these were guesses
            self.draft_model.keep(job.seq_id, known + verdict.accepted)
        keep = len(row.tokens) - row.drafted + verdict.accepted
        if keep < len(row.tokens):
            self.model.memory.seq_rm(job.seq_id, job.n_past + keep, -1)
        self.slots.extend(job.seq_id, row.tokens[:keep])
        job.n_past += keep
        c = self.counters
        c.tokens_generated += len(verdict.tokens)
        c.draft_tokens += row.drafted
        c.draft_accepted += verdict.accepted
        if job.drafts is not None:
            ended = verdict.end is not None or verdict.error is not None
            job.drafts.record(verdict.tokens, row.drafted, verdict.accepted, ended=ended)
        job.next_token = verdict.tokens[-1]
        return self._outcome(job, verdict)

    def _outcome(self, job: Job, verdict: Verdict) -> list[Item]:
        if verdict.error is not None:
            log.error("model %s: request %s: %s", self.name, job.request_id, verdict.error)
            self.end(job, keep=False)
            return [EngineError(verdict.error)]
        if verdict.end is None:
            return verdict.items
        assert job.decoding is not None
        usage = Usage(prompt_tokens=len(job.prompt), completion_tokens=job.decoding.generated,
                      cached_tokens=job.cached)  # fmt: skip
        finish = job.decoding.finish(verdict.end, usage)
        self.end(job, keep=True)
        return [*verdict.items, finish]

    def _progress(self, job: Job, read: int | None = None) -> None:
        """How far ``job``'s prompt is read (``read`` tokens; default: its cells), for a
        request that asked."""
        if job.progress and job.embed is None:
            elapsed = time.perf_counter() - job.admitted_at
            read = job.n_past if read is None else read
            self.deliver(job, [PromptProgress(len(job.prompt), job.cached, read, elapsed)])

    def deliver(self, job: Job, items: list[Item]) -> None:
        if not items:
            return
        try:
            job.deliver(items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            if not job.done:
                self._drop(job)

    def _fail_rows(self, rows: list[Row], rc: int) -> None:
        reason = "the KV cache is full" if rc == 1 else f"llama_decode returned {rc}"
        err = EngineError(f"the llama.cpp engine failed a step: {reason}")
        log.error("model %s: %s", self.name, err.message)
        for row in rows:
            job = row.job
            if not job.done:
                self.end(job, keep=False)
                self.deliver(job, [err])

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            self._stopping = True
            pending = [*self._running, *self._waiting, *self._inbox]
            self._inbox.clear()
        self._running.clear()
        self._waiting.clear()
        for job in pending:
            if not job.done:
                job.done = True
                self._close(job)
                self.deliver(job, [err])
