"""Per-sequence sampler chains (llama.cpp's sampler API) built from :class:`SamplingParams`.

Order as in llama.cpp's common sampling: logit bias, penalties, top-k, top-p, min-p,
temperature, then a seeded draw (or greedy at temperature 0). Neutral settings add no stage.
Penalties count generated tokens only (OpenAI's presence/frequency semantics).
"""

from __future__ import annotations

import secrets
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gateway.types import SamplingParams

if TYPE_CHECKING:
    from backends.llamacpp.grammar import GrammarStage

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: "pick a random seed"


def seed_for(params: SamplingParams) -> int:
    """A 32-bit seed: the request's (stable across runs) or a fresh random one."""
    if params.seed is None:
        return secrets.randbelow(_DEFAULT_SEED)
    return params.seed % _DEFAULT_SEED


class SamplerChain:
    """One sequence's sampler. Owned by the engine thread; :meth:`close` frees it."""

    def __init__(
        self,
        llama: ModuleType,
        n_vocab: int,
        params: SamplingParams,
        penalty_window: int,
        grammar: GrammarStage | None = None,
    ) -> None:
        self._llama = llama
        #: First in the chain: every later stage sees only what the grammar allows.
        self.grammar = grammar
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain: Any = llama.llama_sampler_chain_init(chain_params)
        first = [grammar.sampler] if grammar is not None else []
        for stage in first + self._stages(n_vocab, params, penalty_window):
            llama.llama_sampler_chain_add(self._chain, stage)

    def _stages(self, n_vocab: int, p: SamplingParams, window: int) -> list[Any]:
        llama = self._llama
        stages: list[Any] = []
        if p.logit_bias:
            biases = (llama.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias):
                biases[i].token = token
                biases[i].bias = bias
            stages.append(llama.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            stages.append(
                llama.llama_sampler_init_penalties(
                    n_vocab, window, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        if p.greedy:
            stages.append(llama.llama_sampler_init_greedy())
            return stages
        if p.top_k > 0:
            stages.append(llama.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            stages.append(llama.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            stages.append(llama.llama_sampler_init_min_p(p.min_p, 1))
        if p.temperature != 1.0:
            stages.append(llama.llama_sampler_init_temp(p.temperature))
        stages.append(llama.llama_sampler_init_dist(seed_for(p)))
        return stages

    def sample(self, ctx: Any, output_index: int) -> int:
        """Draw from the logits of batch row ``output_index`` (the token is accepted)."""
        token: int = self._llama.llama_sampler_sample(self._chain, ctx, output_index)
        return token

    def close(self) -> None:
        if self._chain is not None:
            self._llama.llama_sampler_free(self._chain)
            self._chain = None
