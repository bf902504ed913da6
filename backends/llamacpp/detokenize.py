"""UTF-8-safe incremental detokenization: a character split across tokens is never sent broken."""

from __future__ import annotations

import codecs


class Detokenizer:
    """Feed each token's bytes; get back only whole characters.

    Bytes of an unfinished multi-byte character are held until it completes; bytes that can
    never form a valid character become U+FFFD. A character still unfinished when generation
    ends (cut by ``max_tokens``) is dropped, never sent as a broken or replacement character.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """At the end of generation: drop an unfinished character; return nothing else."""
        self._decoder.reset()
        return ""
