"""From a request to prompt token ids: chat template, BOS, special tokens.

The template and BOS facts come from the model directory (:mod:`backends._exllama.modeldir`);
rendering happens in the core's sandbox (:mod:`gateway.chat_template`).

Message content is text, never control tokens: when a message contains the text of a special
token (``<|im_start|>``...), the prompt is tokenized segment by segment, the template's own text
with special tokens parsed and message content without.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from backends._exllama.modeldir import TokenizerFacts
from gateway.chat_template import ChatTemplate, Segment
from gateway.errors import InvalidRequest
from gateway.output.formats import ChatFormat
from gateway.types import ChatMessage, GenerationRequest, TokenizedPrompt


class Tokenizer(Protocol):
    """What prompt building needs from a loaded model's tokenizer."""

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def special_pieces(self) -> frozenset[str]:
        """The text of every special/added control token."""
        ...

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text`` (no BOS); ``special``: parse control-token text as tokens."""
        ...


class PromptBuilder:
    """Turns a :class:`GenerationRequest` into prompt token ids for one model."""

    def __init__(
        self,
        model: str,
        facts: TokenizerFacts,
        tokenizer: Tokenizer,
        *,
        render_timeout_s: float = 1.0,
        max_output_chars: int = 4_000_000,
        fmt: ChatFormat | None = None,
    ) -> None:
        self.model = model
        self.facts = facts
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.template = (
            ChatTemplate(
                facts.chat_template,
                bos_token=facts.bos_token or "",
                eos_token=facts.eos_token or "",
                timeout_s=render_timeout_s,
                max_output_chars=max_output_chars,
            )
            if facts.chat_template is not None
            else None
        )

    def token_ids(self, request: GenerationRequest) -> list[int]:
        return list(self.tokenize(request).tokens)

    def tokenize(self, request: GenerationRequest) -> TokenizedPrompt:
        if request.messages is None:
            assert request.prompt is not None
            return TokenizedPrompt.of(
                self._with_bos(self.tokenizer.encode(request.prompt, special=True))
            )
        plan = request.output
        segments = self._render(
            request.messages,
            tools=plan.template_tools if plan is not None else None,
            reasoning_effort=request.reasoning_effort,
            continue_final=request.continue_final,
        )
        opened = (
            self.fmt is not None
            and bool(segments)
            and not segments[-1].content
            and self.fmt.opens_reasoning(segments[-1].text)
        )
        return TokenizedPrompt.of(self._chat(segments), reasoning_open=opened)

    def _render(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: str | None,
        reasoning_effort: str | None,
        continue_final: bool = False,
    ) -> list[Segment]:
        if self.template is None:
            raise InvalidRequest(
                f"model {self.model!r} has no chat template (none in its tokenizer_config.json "
                "or chat_template.jinja, and no chat_template_file configured): use "
                "/v1/completions with a prompt",
                param="messages",
            )
        return self.template.render_segments(
            messages,
            content_is_safe=self._is_plain,
            tools=tools,
            reasoning_effort=reasoning_effort,
            continue_final=continue_final,
        )

    def _chat(self, segments: Sequence[Segment]) -> list[int]:
        if all(self._is_plain(s.text) for s in segments if s.content):
            ids = self.tokenizer.encode("".join(s.text for s in segments), special=True)
        else:
            ids = [
                i for s in segments for i in self.tokenizer.encode(s.text, special=not s.content)
            ]
        starts_with_bos = (
            bool(self.facts.bos_token)
            and bool(segments)
            and (
                not segments[0].content and segments[0].text.startswith(self.facts.bos_token or "")
            )
        )
        return ids if starts_with_bos else self._with_bos(ids)

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if self.facts.add_bos and bos is not None and (not ids or ids[0] != bos):
            return [bos, *ids]
        return ids

    def _is_plain(self, text: str) -> bool:
        """No control-token text in ``text``."""
        return not any(piece in text for piece in self.tokenizer.special_pieces if piece)
