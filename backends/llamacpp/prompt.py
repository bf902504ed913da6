"""A request's prompt tokens: chat template rendering, then tokenization that keeps message
content plain text (a ``<|im_end|>`` typed by a user stays characters, never a control token).
"""

from __future__ import annotations

from backends.llamacpp.tokenizer import Tokenizer
from gateway.chat_template import ChatTemplate
from gateway.errors import ContextLengthExceeded, InvalidRequest
from gateway.types import GenerationRequest

#: Used (with a warning at load) when a GGUF has no ``tokenizer.chat_template``.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PromptBuilder:
    """``max_tokens``: the context a prompt must fit; a text that cannot fit is refused before
    it is tokenized (llama.cpp's tokenizer is quadratic in the control-token texts it parses:
    a 1 MB prompt of them takes 20 s)."""

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, max_tokens: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_tokens = max_tokens

    def tokens(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            segments = self.template.render_segments(
                request.messages, content_is_safe=lambda text: not tok.has_special_text(text)
            )
            parts = [(seg.text, not seg.content) for seg in segments]
        else:
            assert request.prompt is not None
            # A raw completion prompt is the client's own full prompt, template tokens included.
            parts = [(request.prompt, True)]
        self._check_size(request, parts)
        tokens: list[int] = []
        for text, special in parts:
            tokens += tok.encode(text, special=special)
        if tok.add_bos and (not tokens or tokens[0] != tok.bos):
            tokens.insert(0, tok.bos)
        if not tokens:
            raise InvalidRequest(
                "the prompt is empty", param="messages" if request.is_chat else "prompt"
            )
        return tokens

    def _check_size(self, request: GenerationRequest, parts: list[tuple[str, bool]]) -> None:
        limit = self.max_tokens
        if limit is None or sum(len(text) for text, _ in parts) <= limit:
            return  # a token is at least one character (BOS aside): it fits, or nearly
        size = sum(len(text.encode("utf-8")) for text, _ in parts)
        at_least = size // self.tokenizer.max_token_bytes
        if at_least > limit:
            where = "messages" if request.is_chat else "prompt"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your {where} "
                f"resulted in more than {at_least} tokens. Please reduce the length of the "
                f"{where}.",
                param=where,
            )
