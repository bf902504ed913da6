"""A request's prompt tokens: chat template rendering, then tokenization that keeps message
content plain text (a ``<|im_end|>`` typed by a user stays characters, never a control token).
"""

from __future__ import annotations

from backends.llamacpp.tokenizer import Tokenizer
from gateway.chat_template import ChatTemplate
from gateway.errors import InvalidRequest
from gateway.types import GenerationRequest

#: Used (with a warning at load) when a GGUF has no ``tokenizer.chat_template``.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template

    def tokens(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            segments = self.template.render_segments(
                request.messages, content_is_safe=lambda text: not tok.has_special_text(text)
            )
            tokens: list[int] = []
            for seg in segments:
                tokens += tok.encode(seg.text, special=not seg.content)
        else:
            assert request.prompt is not None
            # A raw completion prompt is the client's own full prompt, template tokens included.
            tokens = tok.encode(request.prompt, special=True)
        if tok.add_bos and (not tokens or tokens[0] != tok.bos):
            tokens.insert(0, tok.bos)
        if not tokens:
            raise InvalidRequest(
                "the prompt is empty", param="messages" if request.is_chat else "prompt"
            )
        return tokens
