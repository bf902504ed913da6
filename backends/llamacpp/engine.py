"""The engine thread: one per loaded model, continuous batching over a unified KV cache.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.llamacpp.detokenize import Detokenizer
from backends.llamacpp.embeddings import EmbedSpec, Pooler, token_vector
from backends.llamacpp.grammar import GrammarStage
from backends.llamacpp.kv_tiers import KVTiers
from backends.llamacpp.logprobs import token_logprob
from backends.llamacpp.model import LoadedModel
from backends.llamacpp.sampling import SamplerChain
from backends.llamacpp.slots import SlotManager
from gateway.backend import EngineStats
from gateway.errors import EngineError, ModelUnavailable
from gateway.output.matchers import Constraint
from gateway.stops import StopMatcher
from gateway.types import (
    Delta,
    EmbeddingDelta,
    Finish,
    FinishReason,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Usage,
)

log = logging.getLogger("backends.llamacpp.engine")

Item = Delta | BaseException
Deliver = Callable[[list[Item]], None]


@dataclass(eq=False)
class Job:
    """One sequence to generate, from submission to its last delta."""

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
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: Set from the event loop when the client is gone.
    cancel_requested: bool = False
    seq_id: int = -1
    n_past: int = 0
    cached: int = 0
    generated: int = 0
    unreported: int = 0
    next_token: int | None = None
    done: bool = False
    sampler: SamplerChain | None = None
    pooler: Pooler | None = None
    detok: Detokenizer = field(default_factory=Detokenizer)
    stops: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.stop)

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


@dataclass
class Counters:
    decode_steps: int = 0
    tokens_generated: int = 0
    tokens_after_cancel: int = 0
    cancelled: int = 0
    max_batch_sequences: int = 0
    cached_prompt_tokens: int = 0
    prompt_tokens_processed: int = 0


@dataclass
class _Row:
    """A job's part of one batch: how many tokens, and the output row if logits were asked."""

    job: Job
    tokens: list[int]
    output: int | None


class Engine:
    def __init__(
        self, name: str, model: LoadedModel, *, n_live: int, tiers: KVTiers | None = None
    ) -> None:
        cfg = model.config
        self.name = name
        self.model = model
        self.n_live = n_live
        self.chunk = cfg.batching.prefill_chunk_tokens
        #: An embedding model reads each input whole, in one batch (encoders need it).
        self.whole_inputs = cfg.embeddings
        self.embed_chunk = model.n_ctx_slot if cfg.embeddings else self.chunk
        self.slots = SlotManager(
            model.memory,
            n_live=n_live,
            n_cached=model.n_seq - n_live,
            n_cells=cfg.n_ctx_total,
            prefix_reuse=cfg.kv_cache.prefix_reuse,
            min_prefix=cfg.kv_cache.min_prefix_tokens,
            tiers=tiers,
        )
        self.counters = Counters()
        self.failure: BaseException | None = None
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
            self.model.close()

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
        job.done = True
        self.counters.cancelled += 1
        if job in self._waiting:
            self._waiting.remove(job)
        if job in self._running:
            self._running.remove(job)
            self.slots.release(job.seq_id, keep=False)
        self._close(job)

    def _close(self, job: Job) -> None:
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None

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
            if job.embed is None:
                n_vocab = model.tokenizer.n_vocab
                stage = (
                    GrammarStage(model.llama, job.constraint, n_vocab)
                    if job.constraint is not None
                    else None
                )
                job.sampler = SamplerChain(
                    model.llama, n_vocab, job.params, model.n_ctx_slot, grammar=stage
                )
            else:
                job.pooler = Pooler(job.embed, model.n_embd)
            self._running.append(job)

    def _build(self, jobs: list[Job]) -> list[_Row]:
        rows = [_Row(j, [j.next_token], None) for j in jobs if j.next_token is not None]
        budget = self.chunk
        for job in jobs:
            if budget <= 0:
                break
            if job.prefilling:
                take = job.prompt[job.n_past : job.n_past + budget]
                rows.append(_Row(job, take, None))
                budget -= len(take)
        self._fill(rows, every_output=False)
        return rows

    def _fill(self, rows: list[_Row], *, every_output: bool) -> None:
        """Write ``rows`` into the batch; logits for the last prompt token (or every token)."""
        batch = self.model.batch
        n = 0
        for row in rows:
            job = row.job
            last = len(row.tokens) - 1
            for i, token in enumerate(row.tokens):
                batch.token[n] = token
                batch.pos[n] = job.n_past + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = job.seq_id
                wants = i == last and job.n_past + len(row.tokens) >= len(job.prompt)
                batch.logits[n] = wants or every_output
                if wants:
                    row.output = n
                n += 1
        batch.n_tokens = n

    def _step(self) -> None:
        generating = [j for j in self._running if j.embed is None]
        embedding = [j for j in self._running if j.embed is not None]
        if generating:
            self._generate_step(generating)
        if embedding:
            self._embed_step(embedding)

    def _decode(self, rows: list[_Row]) -> bool:
        """One ``llama_decode`` of the filled batch (room made first); False if it failed."""
        n_tokens = sum(len(r.tokens) for r in rows)
        if not self.slots.make_room(n_tokens):
            log.warning("model %s: KV cache full with live sequences only", self.name)
        llama, model = self.model.llama, self.model
        rc = llama.llama_decode(model.ctx, model.batch)
        if rc == 1 and self.slots.evict_all_cached():
            rc = llama.llama_decode(model.ctx, model.batch)
        if rc != 0:
            self._fail_rows(rows, rc)
            return False
        c = self.counters
        c.decode_steps += 1
        c.max_batch_sequences = max(c.max_batch_sequences, len(rows))
        return True

    def _generate_step(self, jobs: list[Job]) -> None:
        rows = self._build(jobs)
        if not rows or not self._decode(rows):
            return
        c = self.counters
        for row in rows:
            job = row.job
            self.slots.extend(job.seq_id, row.tokens)
            if job.next_token is None:
                c.prompt_tokens_processed += len(row.tokens)
            job.n_past += len(row.tokens)
            job.next_token = None
            if job.cancel_requested:  # gone while this step ran: wasted work, counted
                c.tokens_after_cancel += len(row.tokens)
                continue
            if row.output is not None:
                self._deliver(job, self._sample(job, row.output))

    def _embed_rows(self, jobs: list[Job]) -> list[_Row]:
        rows: list[_Row] = []
        budget = self.embed_chunk
        for job in jobs:
            rest = job.prompt[job.n_past :]
            if budget <= 0 or (self.whole_inputs and len(rest) > budget):
                break
            take = rest[:budget]
            rows.append(_Row(job, take, None))
            budget -= len(take)
        return rows

    def _embed_step(self, jobs: list[Job]) -> None:
        """Read the next chunk of each input to embed, in a decode call of their own with
        embeddings on (every token is an output), and pool each token's vector."""
        rows = self._embed_rows(jobs)
        if not rows:
            return
        self._fill(rows, every_output=True)
        llama, model = self.model.llama, self.model
        llama.llama_set_embeddings(model.ctx, True)
        try:
            if not self._decode(rows):
                return
        finally:
            llama.llama_set_embeddings(model.ctx, model.config.embeddings)
        n = 0
        for row in rows:
            job = row.job
            assert job.pooler is not None
            self.slots.extend(job.seq_id, row.tokens)
            last = len(job.prompt) - 1
            for i in range(len(row.tokens)):
                position = job.n_past + i
                vector = token_vector(llama, model.ctx, n, model.n_embd)
                job.pooler.add(vector, position, last=position == last)
                n += 1
            job.n_past += len(row.tokens)
            self.counters.prompt_tokens_processed += len(row.tokens)
            if not job.cancel_requested and not job.prefilling:
                self._deliver(job, self._finish_embedding(job))

    def _finish_embedding(self, job: Job) -> list[Item]:
        assert job.pooler is not None
        vector = job.pooler.result()
        job.done = True
        self._running.remove(job)
        self.slots.release(job.seq_id, keep=False)
        return [EmbeddingDelta(vector), Finish("stop", Usage(prompt_tokens=len(job.prompt)))]

    def _sample(self, job: Job, output: int) -> list[Item]:
        assert job.sampler is not None
        model = self.model
        token = job.sampler.sample(model.ctx, output)
        job.generated += 1
        job.unreported += 1
        self.counters.tokens_generated += 1
        tok = model.tokenizer
        if job.logprobs is not None:
            entry = token_logprob(model.llama, model.ctx, output, tok, token, job.logprobs)
            job.pending_logprobs.append(entry)
        grammar = job.sampler.grammar
        if grammar is not None and grammar.failed:
            return self._fail_job(job, f"the output grammar failed: {grammar.failed}")
        if tok.is_eog(token):
            return self._finish(job, "stop", "")
        text = job.stops.feed(job.detok.feed(tok.piece(token)))
        if job.stops.stopped or (grammar is not None and grammar.complete):
            return self._finish(job, "stop", text)
        if job.generated >= job.max_new:
            return self._finish(job, "length", text)
        job.next_token = token
        return [self._text(job, text)] if text else []

    def _text(self, job: Job, text: str) -> TextDelta:
        logprobs, job.pending_logprobs = tuple(job.pending_logprobs), []
        delta = TextDelta(text, tokens=job.unreported, logprobs=logprobs)
        job.unreported = 0
        return delta

    def _fail_job(self, job: Job, reason: str) -> list[Item]:
        """This sequence cannot go on (its grammar failed): it alone ends, with an error."""
        log.error("model %s: request %s: %s", self.name, job.request_id, reason)
        job.done = True
        self._running.remove(job)
        self.slots.release(job.seq_id, keep=False)
        self._close(job)
        return [EngineError(reason)]

    def _finish(self, job: Job, reason: FinishReason, text: str) -> list[Item]:
        if not job.stops.stopped:
            text += job.stops.feed(job.detok.flush())
            text += job.stops.flush()
        items: list[Item] = [self._text(job, text)] if text else []
        usage = Usage(prompt_tokens=len(job.prompt), completion_tokens=job.generated,
                      cached_tokens=job.cached)  # fmt: skip
        items.append(Finish(reason, usage, job.stops.matched))
        job.done = True
        self._running.remove(job)
        self.slots.release(job.seq_id, keep=True)
        self._close(job)
        return items

    def _deliver(self, job: Job, items: list[Item]) -> None:
        if not items:
            return
        try:
            job.deliver(items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            if not job.done:
                self._drop(job)

    def _fail_rows(self, rows: list[_Row], rc: int) -> None:
        reason = "the KV cache is full" if rc == 1 else f"llama_decode returned {rc}"
        err = EngineError(f"the llama.cpp engine failed a step: {reason}")
        log.error("model %s: %s", self.name, err.message)
        for row in rows:
            job = row.job
            if not job.done:
                job.done = True
                self._running.remove(job)
                self.slots.release(job.seq_id, keep=False)
                self._close(job)
                self._deliver(job, [err])

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
                self._deliver(job, [err])
