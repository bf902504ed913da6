"""Request sampling params as exllamav3 ``ComboSampler`` arguments (pure: tested on a CPU).

``ComboSampler`` turns neutral values into no-op steps and temperature 0 into argmax, so the
mapping is one to one: repetition/frequency/presence penalties, temperature, min-p, top-k, top-p,
logit bias (token id -> additive bias).
"""

from __future__ import annotations

from gateway.types import SamplingParams


def combo_sampler_args(p: SamplingParams) -> dict[str, float | int | dict[int, float]]:
    args: dict[str, float | int | dict[int, float]] = {
        "rep_p": p.repetition_penalty,
        "freq_p": p.frequency_penalty,
        "pres_p": p.presence_penalty,
        "temperature": p.temperature,
        "min_p": p.min_p,
        "top_k": p.top_k,
        "top_p": p.top_p,
    }
    if p.logit_bias:
        args["logit_bias"] = dict(p.logit_bias)
    return args
