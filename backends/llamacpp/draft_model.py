"""A draft model for speculative decoding: a small GGUF sharing the main model's vocabulary,
in the same engine thread, with a context of its own.

Its context holds one sequence per engine sequence id, each a copy of (a prefix of) what that
sequence holds: before drafting, a sequence's draft cells are brought up to its tokens
(the longest common prefix kept, the rest read in chunks of at most ``catch_up`` tokens a step,
so a long new prompt never stalls the step), then every drafting sequence writes its draft
greedily, one batched draft-model decode per draft position. After verification the cells past
what the main model took are removed.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.llamacpp.gguf_file import ModelFileError
from backends.llamacpp.kv_tiers import common_prefix
from backends.llamacpp.model import LoadedModel, free_native
from backends.llamacpp.tokenizer import Tokenizer

log = logging.getLogger("backends.llamacpp.draft_model")

#: A sequence to draft for: its id, its tokens (the last one drawn last), how many to draft.
Want = tuple[int, Sequence[int], int]


class DraftModel:
    def __init__(self, main: LoadedModel, path: Path, *, n_gpu_layers: int, n_batch: int) -> None:
        self.llama = llama = main.llama
        cfg = main.config
        mp = llama.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 1_000_000
        self.model = llama.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ModelFileError(f"llama.cpp could not load the draft model file {path}")
        self.ctx: Any = None
        self.batch: Any = None
        try:
            self._check_vocab(main, path)
            cp = llama.llama_context_default_params()
            cp.n_ctx = cfg.n_ctx_total
            cp.n_batch = n_batch
            cp.n_ubatch = min(n_batch, 512)
            cp.n_seq_max = main.n_seq
            cp.n_threads = cfg.batching.n_threads
            cp.n_threads_batch = cfg.n_threads_batch
            cp.kv_unified = True
            cp.no_perf = True
            self.ctx = llama.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise ModelFileError(f"llama.cpp could not create a context for {path}")
        except BaseException:
            self.close()
            raise
        self.n_batch = n_batch
        self.batch = llama.llama_batch_init(n_batch, 0, 1)
        self._mem = llama.llama_get_memory(self.ctx)
        self.n_vocab = main.tokenizer.n_vocab
        #: Each sequence id's tokens in the draft cells.
        self.cells: dict[int, list[int]] = {}
        self.catch_up_seconds = 0.0

    def _check_vocab(self, main: LoadedModel, path: Path) -> None:
        """Same tokens, same ids: a draft token must mean what the main model reads."""
        llama = self.llama
        mine = Tokenizer(llama, llama.llama_model_get_vocab(self.model))
        theirs = main.tokenizer
        same = mine.n_vocab == theirs.n_vocab and all(
            mine.piece(t) == theirs.piece(t) for t in range(theirs.n_vocab)
        )
        if not same:
            raise ModelFileError(
                f"the draft model {path} does not share the main model's vocabulary "
                f"({mine.n_vocab} tokens vs {theirs.n_vocab}, or different token texts)"
            )

    def forget(self, seq_id: int) -> None:
        if self.cells.pop(seq_id, None):
            self.llama.llama_memory_seq_rm(self._mem, seq_id, -1, -1)

    def keep(self, seq_id: int, n: int) -> None:
        """Only the first ``n`` tokens of the sequence's draft cells stay (the rest were not
        taken)."""
        cells = self.cells.get(seq_id)
        if cells is not None and len(cells) > n:
            self.llama.llama_memory_seq_rm(self._mem, seq_id, n, -1)
            del cells[n:]

    def draft(
        self, wants: Sequence[tuple[int, Sequence[int], int]], catch_up: int
    ) -> list[list[int]]:
        """For each ``(seq_id, tokens, k)``: up to ``k`` greedy tokens after ``tokens``
        (none for a sequence still catching up on its tokens)."""
        drafts: list[list[int]] = [[] for _ in wants]
        self.catch_up_seconds = 0.0
        started = time.perf_counter()
        ready = self._catch_up(wants, catch_up)
        #: Time spent reading sequences' tokens (not drafting): not a cost of the draft.
        self.catch_up_seconds = time.perf_counter() - started
        live = [i for i in ready if wants[i][2] > 0]
        last = {i: wants[i][1][-1] for i in live}
        while live:
            rows = [(wants[i][0], last[i]) for i in live]
            picks = self._decode_greedy(rows)
            for i, token in zip(live, picks, strict=True):
                drafts[i].append(token)
                last[i] = token
            live = [i for i in live if len(drafts[i]) < wants[i][2]]
        return drafts

    def _catch_up(self, wants: Sequence[Want], budget: int) -> list[int]:
        """Bring each sequence's draft cells to all its tokens but the last; which are there."""
        ready: list[int] = []
        feed: list[tuple[int, list[int]]] = []
        for i, (seq_id, tokens, _) in enumerate(wants):
            cells = self.cells.setdefault(seq_id, [])
            shared = common_prefix(cells, tokens[:-1])
            if shared < len(cells):
                self.llama.llama_memory_seq_rm(self._mem, seq_id, shared, -1)
                del cells[shared:]
            missing = list(tokens[shared : len(tokens) - 1])
            if not missing:
                ready.append(i)
                continue
            take = missing[: max(0, min(budget, self.n_batch))]
            if take:
                feed.append((seq_id, take))
                budget -= len(take)
            if len(take) == len(missing):
                ready.append(i)
        if feed:
            self._decode(feed, logits=False)
        return ready

    def _decode(self, rows: list[tuple[int, list[int]]], *, logits: bool) -> None:
        llama, batch = self.llama, self.batch
        n = 0
        for seq_id, tokens in rows:
            cells = self.cells[seq_id]
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = len(cells) + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = logits and j == len(tokens) - 1
                n += 1
            cells.extend(tokens)
        batch.n_tokens = n
        rc = llama.llama_decode(self.ctx, batch)
        if rc != 0:
            for seq_id, _ in rows:  # start these over next time
                self.forget(seq_id)
            raise DraftFailed(f"the draft model's llama_decode returned {rc}")

    def _decode_greedy(self, rows: list[tuple[int, int]]) -> list[int]:
        self._decode([(seq_id, [token]) for seq_id, token in rows], logits=True)
        picks = []
        for n in range(len(rows)):
            pointer = self.llama.llama_get_logits_ith(self.ctx, n)
            array = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))
            picks.append(int(np.ctypeslib.as_array(array, shape=(self.n_vocab,)).argmax()))
        return picks

    def close(self) -> None:
        free_native(self)


class DraftFailed(RuntimeError):
    """The draft model could not decode a step (the step goes on without drafts)."""


def load(main: LoadedModel) -> DraftModel | None:
    """The draft model ``[models.NAME.speculative]`` names, if any."""
    spec = main.config.speculative
    if spec.mode != "draft" or spec.draft_model_path is None:
        return None
    n_batch = max(main.config.n_batch, main.config.batching.prefill_chunk_tokens)
    return DraftModel(main, spec.draft_model_path, n_gpu_layers=spec.draft_n_gpu_layers,
                      n_batch=n_batch)  # fmt: skip
