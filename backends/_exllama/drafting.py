"""Speculative decoding in the ExLlama generators: what both versions' loaders share.

The libraries draft and verify inside ``iterate()`` (``[models.<name>.speculative]`` picks how,
see :class:`~backends._exllama.config.ExllamaSpeculative`); the adapter only loads the draft
model, passes the generator its arguments, makes each job ``draft_tokens`` longer (see
:class:`~backends._exllama.config.EnginePlan`) and counts the drafts (the engine loop).
"""

from __future__ import annotations

from backends._exllama.config import ExllamaSpeculative
from gateway.errors import EngineError


def check_draft_vocab(vocab_size: int | None, draft_vocab_size: int | None) -> None:
    """A draft model must not propose tokens the model lacks (an out-of-range embedding index
    is a CUDA fault, not an error). A smaller draft vocabulary (a padded one on the model's
    side) is fine. Unknown sizes are not checked."""
    if vocab_size is None or draft_vocab_size is None or draft_vocab_size <= vocab_size:
        return
    raise EngineError(
        f"speculative.draft_model_dir: the draft model's vocabulary ({draft_vocab_size} tokens) "
        f"is larger than the model's ({vocab_size}); a draft model must share its tokenizer"
    )


def speculation_label(spec: ExllamaSpeculative) -> str:
    """For the load log line: ``""`` when off."""
    if spec.mode == "off":
        return ""
    source = "n-grams" if spec.mode == "ngram" else f"draft model {spec.draft_model_dir}"
    return f", speculative decoding ({spec.num_draft_tokens} tokens from {source})"
