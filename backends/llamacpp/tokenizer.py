"""Tokenization and token pieces through a loaded model's vocabulary (llama_cpp calls)."""

from __future__ import annotations

import ctypes
from functools import cached_property
from types import ModuleType
from typing import Any


class Tokenizer:
    """Text <-> tokens for one model. Thread-safe: the vocabulary is read-only."""

    def __init__(self, llama: ModuleType, vocab: Any) -> None:
        self._llama = llama
        self._vocab = vocab
        self.n_vocab: int = llama.llama_vocab_n_tokens(vocab)
        self.add_bos: bool = bool(llama.llama_vocab_get_add_bos(vocab))
        self.bos: int = llama.llama_vocab_bos(vocab)
        self.eos: int = llama.llama_vocab_eos(vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        #: Control tokens shown as their text (the tool-call and reasoning markers the core
        #: parses); every other control token stands for no text.
        self.visible: frozenset[int] = frozenset()

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Tokens of ``text``; ``special`` parses control-token text (``<|im_start|>``)."""
        data = text.encode("utf-8")
        if not data:
            return []
        capacity = len(data) + 8
        buf = (self._llama.llama_token * capacity)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, special)
        if n < 0:  # cannot happen for byte-level vocabularies; retry with the asked size
            capacity = -n
            buf = (self._llama.llama_token * capacity)()
            n = self._llama.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, False, special
            )
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens: none)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            special = token in self.visible
            n = self._llama.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._llama.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def bytes_of(self, token: int) -> bytes:
        """A token's bytes as the vocabulary spells it, control tokens included."""
        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
        return buf.raw[: max(n, 0)]

    def text_of(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", errors="replace")

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for (control tokens by their text)."""
        buf = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(self.n_vocab):
            n = self._llama.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
            longest = max(longest, abs(n))
        return longest

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, ...)."""
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(self._llama.llama_vocab_is_eog(self._vocab, token))
        return known

    @cached_property
    def special_texts(self) -> frozenset[str]:
        """The text of every control / user-defined token (what must never be parsed from
        message content)."""
        llama = self._llama
        mask = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = set()
        for token in range(self.n_vocab):
            if llama.llama_vocab_get_attr(self._vocab, token) & mask:
                text = self.text_of(token)
                if text:
                    texts.add(text)
        return frozenset(texts)

    def special_token(self, text: str) -> int | None:
        """The id of the control token spelled ``text``, if it is one (as llguidance sees
        control tokens: CONTROL, or USER_DEFINED written ``<...>``)."""
        tokens = self.encode(text, special=True)
        if len(tokens) != 1:
            return None
        attr = self._llama.llama_vocab_get_attr(self._vocab, tokens[0])
        control = attr & self._llama.LLAMA_TOKEN_ATTR_CONTROL
        user = attr & self._llama.LLAMA_TOKEN_ATTR_USER_DEFINED
        if control or (user and text.startswith("<") and text.endswith(">")):
            return tokens[0]
        return None

    def has_special_text(self, text: str) -> bool:
        return any(s in text for s in self.special_texts)
