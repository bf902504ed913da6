"""The engine's embedding step: inputs to embed read in decode calls of their own.

A step that carries embedding inputs turns ``llama_set_embeddings`` on for its own decode call
(every token of it is then an output) and folds each token's vector into its input's
:class:`~backends.llamacpp.embeddings.Pooler`. A long input is read over several steps (its
cells hold what came before), so it never holds up running streams longer than a prefill chunk;
an embedding model's input is read whole, in one batch (encoders need it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.llamacpp.embeddings import Pooler, token_vector
from gateway.types import EmbeddingDelta, Finish, Usage

if TYPE_CHECKING:
    from backends.llamacpp.engine import Engine, Job, Row


class EmbedStep:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        model = engine.model
        self.whole_inputs = model.config.embeddings
        self.chunk = model.n_ctx_slot if self.whole_inputs else engine.chunk

    def admit(self, job: Job) -> None:
        assert job.embed is not None
        job.pooler = Pooler(job.embed, self._engine.model.n_embd)

    def _rows(self, jobs: list[Job]) -> list[Row]:
        from backends.llamacpp.engine import Row

        rows: list[Row] = []
        budget = self.chunk
        for job in jobs:
            rest = job.prompt[job.n_past :]
            if budget <= 0 or (self.whole_inputs and len(rest) > budget):
                break
            take = rest[:budget]
            rows.append(Row(job, take))
            budget -= len(take)
        return rows

    def step(self, jobs: list[Job]) -> None:
        """Read the next chunk of each input, pool its tokens' vectors; deliver the inputs
        read whole."""
        engine = self._engine
        rows = self._rows(jobs)
        if not rows:
            return
        engine.fill(rows, every_output=True)
        llama, model = engine.model.llama, engine.model
        llama.llama_set_embeddings(model.ctx, True)
        try:
            if not engine.decode(rows):
                return
        finally:
            llama.llama_set_embeddings(model.ctx, model.config.embeddings)
        n = 0
        for row in rows:
            job = row.job
            pooler = job.pooler
            assert pooler is not None
            engine.slots.extend(job.seq_id, row.tokens)
            last = len(job.prompt) - 1
            for i in range(len(row.tokens)):
                position = job.n_past + i
                vector = token_vector(llama, model.ctx, n, model.n_embd)
                pooler.add(vector, position, last=position == last)
                n += 1
            job.n_past += len(row.tokens)
            engine.counters.prompt_tokens_processed += len(row.tokens)
            if not job.cancel_requested and not job.prefilling:
                engine.end(job, keep=False)
                usage = Usage(prompt_tokens=len(job.prompt))
                engine.deliver(job, [EmbeddingDelta(pooler.result()), Finish("stop", usage)])
