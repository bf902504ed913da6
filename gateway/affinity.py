"""Prefix affinity: which conversation a request continues, and which of several servers
should take it, so that every turn lands where the KV cache holds its prefix.

Used by the ``openai`` backend's fleet balancer and the Ray Serve request router.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

from gateway.types import GenerationRequest

T = TypeVar("T")


def affinity_key(request: GenerationRequest, prompt_prefix_chars: int = 256) -> bytes:
    """What identifies a conversation: its messages up to and including the first user message
    (the system prompt and the opening question stay the same on every turn); for a text
    prompt, its first ``prompt_prefix_chars`` characters. A request that names its
    conversation (:attr:`GenerationRequest.affinity`) is keyed by that name."""
    if request.affinity is not None:
        return b"named\0" + request.affinity.encode()
    if request.messages is None:
        return (request.prompt or "")[:prompt_prefix_chars].encode()
    h = hashlib.blake2b(digest_size=16)
    for m in request.messages:
        h.update(m.role.encode() + b"\0" + m.content.encode() + b"\0")
        if m.role == "user":
            break
    return h.digest()


def rendezvous_rank(
    key: bytes, items: Sequence[T], names: Sequence[str], weights: Sequence[float] = ()
) -> list[T]:
    """``items`` by weighted rendezvous score for ``key``, best first (each named by
    ``names[i]``, weighted ``weights[i]``, default 1). Removing an item moves only the keys it
    had; each item gets keys in proportion to its weight."""
    w = list(weights) or [1.0] * len(items)

    def score(i: int) -> float:
        digest = hashlib.blake2b(key + b"\0" + names[i].encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2**64  # uniform in (0, 1)
        return -w[i] / math.log(u)

    order = sorted(range(len(items)), key=score, reverse=True)
    return [items[i] for i in order]
