"""Sampling params mapped to ExLlamaV2's Settings fields and exllamav3's ComboSampler args."""

from __future__ import annotations

from backends.exllamav2.sampling import padded_vocab, settings_fields
from backends.exllamav3.sampling import combo_sampler_args
from gateway.types import SamplingParams


def test_v2_neutral_defaults_override_the_librarys() -> None:
    # the library defaults to rep. penalty 1.025, top-k 50, top-p 0.8, temperature 0.8
    assert settings_fields(SamplingParams()) == {
        "token_repetition_penalty": 1.0,
        "token_frequency_penalty": 0.0,
        "token_presence_penalty": 0.0,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
    }


def test_v2_sampling() -> None:
    p = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
    )
    assert settings_fields(p) == {
        "token_repetition_penalty": 1.1,
        "token_frequency_penalty": -0.5,
        "token_presence_penalty": 0.5,
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
    }


def test_v2_greedy_is_top_k_1_with_penalties_kept() -> None:
    fields = settings_fields(SamplingParams(temperature=0.0, top_k=50, repetition_penalty=1.2))
    assert (fields["top_k"], fields["top_p"], fields["temperature"]) == (1, 0.0, 1.0)
    assert fields["token_repetition_penalty"] == 1.2


def test_v2_token_bias_length() -> None:
    assert padded_vocab(32000) == 32000
    assert padded_vocab(32001) == 32032
    assert padded_vocab(151936) == 151936


def test_v3_combo_sampler_args() -> None:
    p = SamplingParams(
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        min_p=0.1,
        presence_penalty=0.2,
        frequency_penalty=0.3,
        repetition_penalty=1.05,
        logit_bias=((5, -100.0), (9, 2.5)),
    )
    assert combo_sampler_args(p) == {
        "rep_p": 1.05,
        "freq_p": 0.3,
        "pres_p": 0.2,
        "temperature": 0.0,  # ComboSampler: temperature 0 -> argmax
        "min_p": 0.1,
        "top_k": 3,
        "top_p": 0.5,
        "logit_bias": {5: -100.0, 9: 2.5},
    }


def test_v3_no_logit_bias_key_when_unused() -> None:
    assert "logit_bias" not in combo_sampler_args(SamplingParams())
