"""Request sampling params as ``ExLlamaV2Sampler.Settings`` fields (pure: tested on a CPU).

Every field is set explicitly: the library's own defaults are not neutral (repetition penalty
1.025, top-k 50, top-p 0.8, temperature 0.8). Greedy is the library's ``Settings.greedy()``:
top-k 1 with penalties still applied.
"""

from __future__ import annotations

from gateway.types import SamplingParams


def settings_fields(p: SamplingParams) -> dict[str, float | int]:
    fields: dict[str, float | int] = {
        "token_repetition_penalty": p.repetition_penalty,
        "token_frequency_penalty": p.frequency_penalty,
        "token_presence_penalty": p.presence_penalty,
    }
    if p.greedy:
        fields.update(temperature=1.0, top_k=1, top_p=0.0, min_p=0.0)
    else:
        fields.update(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
    return fields


def padded_vocab(vocab_size: int) -> int:
    """Length of ``Settings.token_bias``: the vocabulary padded to a multiple of 32."""
    return vocab_size + (-vocab_size % 32)
