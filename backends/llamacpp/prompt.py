"""A request's prompt tokens: chat template rendering, then tokenization that keeps message
content plain text (a ``<|im_end|>`` typed by a user stays characters, never a control token).
"""

from __future__ import annotations

from backends.llamacpp.tokenizer import Tokenizer
from gateway.chat_template import ChatTemplate
from gateway.errors import InvalidRequest, context_length_exceeded
from gateway.output.formats import ChatFormat
from gateway.types import GenerationRequest, TokenizedPrompt

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
    a 1 MB prompt of them takes 20 s). ``fmt``: the model's chat format (whether a rendered
    prompt opened the reasoning)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        max_tokens: int | None = None,
        fmt: ChatFormat | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_tokens = max_tokens
        self.fmt = fmt

    def tokens(self, request: GenerationRequest) -> list[int]:
        return list(self.tokenize(request).tokens)

    def tokenize(self, request: GenerationRequest) -> TokenizedPrompt:
        tok = self.tokenizer
        opened = False
        if request.messages is not None:
            segments = self.template.render_segments(
                request.messages,
                content_is_safe=lambda text: not tok.has_special_text(text),
                tools=request.output.template_tools if request.output is not None else None,
                reasoning_effort=request.reasoning_effort,
                continue_final=request.continue_final,
            )
            parts = [(seg.text, not seg.content) for seg in segments]
            if self.fmt is not None and segments:
                opened = not segments[-1].content and self.fmt.opens_reasoning(segments[-1].text)
        elif request.prompt_tokens is not None:
            return TokenizedPrompt.of(self._given_tokens(request, request.prompt_tokens))
        else:
            assert request.prompt is not None
            # A raw prompt (completions, embeddings input) is the client's own full text,
            # template tokens included.
            parts = [(request.prompt, True)]
        self._check_size(request, parts)
        tokens: list[int] = []
        for text, special in parts:
            tokens += tok.encode(text, special=special)
        if tok.add_bos and (not tokens or tokens[0] != tok.bos):
            tokens.insert(0, tok.bos)
        if not tokens:
            raise InvalidRequest("the prompt is empty", param=request.prompt_param)
        return TokenizedPrompt.of(tokens, reasoning_open=opened)

    def _given_tokens(self, request: GenerationRequest, tokens: tuple[int, ...]) -> list[int]:
        n_vocab = self.tokenizer.n_vocab
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad} is not in this model's vocabulary (0..{n_vocab - 1})",
                param=request.prompt_param,
            )
        return list(tokens)

    def _check_size(self, request: GenerationRequest, parts: list[tuple[str, bool]]) -> None:
        limit = self.max_tokens
        if limit is None or sum(len(text) for text, _ in parts) <= limit:
            return  # a token is at least one character (BOS aside): it fits, or nearly
        size = sum(len(text.encode("utf-8")) for text, _ in parts)
        at_least = size // self.tokenizer.max_token_bytes
        if at_least > limit:
            raise context_length_exceeded(
                limit, at_least, None, request.prompt_param, at_least=True
            )
