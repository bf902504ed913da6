"""Drafts for speculative decoding, from the context itself: no second model.

Agents spend most of their tokens rewriting what their context already holds (a file with one
change, a patch, a tool result echoed back). :class:`ContextDrafter` indexes one sequence's
tokens (prompt and accepted output) by their n-grams and proposes what followed the last
occurrence of the sequence's tail, longest match first, chaining through the index for longer
drafts. :class:`NgramPool` is shared by the sequences of one model: n-grams of every prompt and
output mapped to the token that followed them, keyed with the sequence's cache salt and tagged,
so what one API key's conversations taught it does not draft for another key (the hash table is
bounded and reset when it fills, as llama.cpp's ngram-mod does; drafts never change the text,
only how many tokens a step writes).

Drafts only decide which tokens are verified in one decode; the sequence's sampler chain
decides what is written (:mod:`backends.llamacpp.decoding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: How far back a context match is measured (the source of a draft, see :meth:`propose`).
MAX_MATCH = 32


class ContextDrafter:
    """One sequence's tokens, indexed by their n-grams (``n_min``..``n_max`` tokens)."""

    def __init__(self, n_min: int, n_max: int, *, index: bool = True) -> None:
        self.tokens: list[int] = []
        sizes = range(n_max, n_min - 1, -1) if index else range(0)
        #: For each n-gram size: the n-gram -> the position of the token that followed its
        #: latest occurrence (none: the tokens are kept, not indexed).
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}

    def extend(self, tokens: Sequence[int]) -> None:
        seq = self.tokens
        for token in tokens:
            seq.append(token)
            follower = len(seq) - 1
            for n, index in self._index.items():
                if follower >= n:
                    index[tuple(seq[follower - n : follower])] = follower

    def propose(self, k: int) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed earlier occurrences of the tail (chained), and how
        many tokens of the tail the first occurrence shares (0: no match; at least the n-gram
        found, measured back up to :data:`MAX_MATCH`: a longer match is the likelier copy)."""
        seq = self.tokens
        draft: list[int] = []
        first = 0
        while len(draft) < k:
            start, n = self._match(draft)
            if start is None:
                break
            run = seq[start : start + k - len(draft)]
            if not run:
                break
            first = first or self._shared(start, n)
            draft.extend(run)
        return draft, first

    def _shared(self, follower: int, n: int) -> int:
        """How many tokens before ``follower`` equal the sequence's last ones (``n`` known)."""
        seq, end = self.tokens, len(self.tokens)
        m = n
        while m < MAX_MATCH and follower - m - 1 >= 0 and seq[follower - m - 1] == seq[end - m - 1]:
            m += 1
        return m

    def _match(self, draft: list[int]) -> tuple[int | None, int]:
        seq = self.tokens
        for n, index in self._index.items():
            if len(seq) + len(draft) < n:
                continue
            tail = (seq[len(seq) - max(n - len(draft), 0) :] + draft)[-n:]
            found = index.get(tuple(tail))
            if found is not None:
                return found, n
        return None, 0


class NgramPool:
    """n-grams of ``n`` tokens -> the token that followed, shared by one model's sequences and
    partitioned by cache salt; a fixed-size hash table (``size`` entries), reset at 1/4 full.
    Each entry keeps a tag (other bits of its key's hash), so a lookup that lands on another
    salt's or another n-gram's entry finds nothing."""

    EMPTY = -1

    def __init__(self, n: int, size: int = 1 << 20) -> None:
        self.n = n
        self._table = np.full(size, self.EMPTY, dtype=np.int32)
        self._tags = np.zeros(size, dtype=np.int32)
        self._mask = size - 1
        assert size & self._mask == 0, "size must be a power of two"
        self.used = 0

    def _slot(self, salt: str, gram: Sequence[int]) -> tuple[int, int]:
        h = hash((salt, *gram))
        return h & self._mask, (h >> 32) & 0x7FFFFFFF

    def add(self, salt: str, tokens: Sequence[int], start: int = 0) -> None:
        """Learn every n-gram of ``tokens`` ending at or after ``start`` (and its follower)."""
        n, table, tags = self.n, self._table, self._tags
        for end in range(max(start, n), len(tokens)):
            slot, tag = self._slot(salt, tokens[end - n : end])
            if table[slot] == self.EMPTY:
                self.used += 1
            table[slot] = tokens[end]
            tags[slot] = tag
        if self.used * 4 > len(table):
            self._table.fill(self.EMPTY)
            self.used = 0

    def propose(self, salt: str, tail: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens chained from the last ``n`` of ``tail``."""
        if len(tail) < self.n:
            return []
        window = list(tail[-self.n :])
        draft: list[int] = []
        while len(draft) < k:
            slot, tag = self._slot(salt, window[-self.n :])
            token = int(self._table[slot])
            if token == self.EMPTY or int(self._tags[slot]) != tag:
                break
            draft.append(token)
            window.append(token)
        return draft
