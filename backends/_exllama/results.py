"""The generators' result dicts, read into typed events.

``ExLlamaV2DynamicGenerator.iterate()`` and exllamav3's ``Generator.iterate()`` return a list of
dicts with the same keys (``stage``, ``identifier``, ``eos``, ``text``, ``token_ids``,
``eos_reason``, ``new_tokens``, ``prompt_tokens``, ``cached_tokens``...). This is the one
place that reads them. Stages other than ``streaming`` (``started``, ``prefill``) carry
nothing a client sees; exllamav3 adds ``error`` for a job that failed on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.types import FinishReason

#: The generators' ``eos_reason`` values, mapped to OpenAI's ``finish_reason``.
_FINISH: dict[str, FinishReason] = {
    "stop_token": "stop",
    "stop_string": "stop",
    "end_filter": "stop",
    "loop_detected": "stop",
    "max_new_tokens": "length",
}


@dataclass(frozen=True, slots=True)
class Chunk:
    """Streamed text of one job; ``tokens`` is how many sampled tokens it accounts for."""

    identifier: int
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class End:
    """A job's last result: its remaining text, why it ended, and the generator's counts."""

    identifier: int
    text: str
    tokens: int
    reason: FinishReason
    new_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    identifier: int
    message: str


Event = Chunk | End | Failed


def _int(result: Mapping[str, object], key: str) -> int:
    value = result.get(key, 0)
    return value if isinstance(value, int) else 0


def count_tokens(token_ids: object) -> int:
    """Length of a ``token_ids`` tensor of shape (1, n) (or any sized sequence)."""
    if token_ids is None:
        return 0
    shape = getattr(token_ids, "shape", None)
    if shape is not None:
        return int(shape[-1]) if len(shape) else 1
    if hasattr(token_ids, "__len__"):
        return len(token_ids)
    return 0


def read_result(result: Mapping[str, object]) -> Event | None:
    """One result dict as an event; ``None`` for progress-only stages and foreign jobs."""
    identifier = result.get("identifier")
    if not isinstance(identifier, int):
        return None
    stage = result.get("stage")
    if stage == "error":
        return Failed(identifier, f"the engine failed on this request: {result.get('error')!r}")
    if stage != "streaming":
        return None
    text = result.get("text", "")
    text = text if isinstance(text, str) else ""
    tokens = count_tokens(result.get("token_ids"))
    if not result.get("eos"):
        return Chunk(identifier, text, tokens)
    reason = result.get("eos_reason")
    finish = _FINISH.get(reason, "stop") if isinstance(reason, str) else "stop"
    if reason == "stop_token":
        # Text held back when the stop token came (an incomplete character) is never
        # emitted by the generator; it goes to "held" with the stop token's own piece.
        text, tokens = "", 0
    return End(
        identifier=identifier,
        text=text,
        tokens=tokens,
        reason=finish,
        new_tokens=_int(result, "new_tokens"),
        cached_tokens=_int(result, "cached_tokens"),
    )
