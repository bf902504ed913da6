"""Chat templates (Jinja, as in Hugging Face ``tokenizer_config.json`` and GGUF metadata).

Templates come from the model file or the operator's config, never from a request, and are
still treated as untrusted code: they render in Jinja's ``ImmutableSandboxedEnvironment`` with a
deadline and an output-size limit, checked on every call, attribute/item access, arithmetic
operator and output chunk. Templates get the helpers real ones call: ``raise_exception``,
``strftime_now``, ``bos_token``/``eos_token``, ``tojson`` (non-ASCII kept).

:meth:`ChatTemplate.render_segments` tells apart the template's own text (which may contain
control tokens such as ``<|im_start|>``) from message content (which must be tokenized as plain
text, whatever it contains). It is pure Python so every backend can use it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.errors import EngineError, InvalidRequest
from gateway.types import ChatMessage

#: A content marker (private-use delimiters around a nonce and a message index).
_MARKER = re.compile("(\ue000[0-9a-f]{12}:\\d+\ue001)")


class ChatTemplateError(InvalidRequest):
    """The template rejected the conversation (``raise_exception``) or hit a render limit."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages", code="invalid_chat_template_input")


class UnsafeTemplate(EngineError):
    """The configured template tried something the sandbox forbids: the operator's fault."""


class RenderLimitExceeded(ChatTemplateError):
    pass


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a rendered prompt. ``content`` pieces came from messages (plain text)."""

    text: str
    content: bool = False


@dataclass
class _Budget:
    deadline: float
    max_chars: int
    timeout_s: float

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitExceeded(
                f"rendering the chat template took longer than {self.timeout_s:g} s"
            )

    def check(self, value: object) -> None:
        if isinstance(value, str | bytes | list | tuple | dict):
            self.check_len(len(value))

    def check_len(self, n: int) -> None:
        if n > self.max_chars:
            raise RenderLimitExceeded(
                f"the chat template built a value larger than {self.max_chars} characters"
            )


_budget: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _tick() -> _Budget | None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()
    return budget


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus deadline and size checks on every hook Jinja offers."""

    intercepted_binops = frozenset({"*", "**", "+", "//", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        result = super().call(__context, __obj, *args, **kwargs)
        budget = _budget.get()
        if budget is not None:
            budget.check(result)
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        return _checked(_tick(), super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _checked(_tick(), super().getitem(obj, argument))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _tick()
        if budget is not None:
            _precheck_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if budget is not None:
            budget.check(result)
        return result


def _checked(budget: _Budget | None, value: Any) -> Any:
    if budget is not None:
        budget.check(value)
    return value


def _precheck_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse ``'x' * 10**9`` and ``9 ** 9 ** 9`` before computing them."""
    if operator == "**" and isinstance(right, int) and abs(right) > 4096:
        raise RenderLimitExceeded("the chat template computed a power that is too large")
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int):
                budget.check_len(len(seq) * max(times, 0))


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """A compiled chat template with its render limits.

    Raises :class:`ValueError` at construction if the source is not a valid template.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        timeout_s: float = 1.0,
        max_output_chars: int = 4_000_000,
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        env = _LimitedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except JinjaTemplateError as err:
            raise ValueError(f"invalid chat template: {err}") from err

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: str | None = None,
        reasoning_effort: str | None = None,
    ) -> str:
        """The prompt text, or :class:`ChatTemplateError` / :class:`UnsafeTemplate`.
        ``tools``: the JSON text of the ``tools`` list templates take; ``reasoning_effort``
        goes to the template as is and as Qwen3's ``enable_thinking`` (false for "none")."""
        return self._render(
            [_as_dict(m, m.content) for m in messages],
            add_generation_prompt,
            _tools(tools),
            _effort(reasoning_effort),
        )

    def render_segments(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        content_is_safe: Callable[[str], bool] = lambda _: False,
        tools: str | None = None,
        reasoning_effort: str | None = None,
        continue_final: bool = False,
    ) -> list[Segment]:
        """The prompt as template text and message content, in order.

        Renders once with a unique marker in place of each message's content and once with
        the real content; if substituting the content (as is, or stripped, as templates that
        ``trim`` do) into the marked render gives exactly the real one, the split is exact.
        Otherwise the template transforms content in ways that cannot be traced; the whole
        prompt is returned as one template segment if every content is safe by
        ``content_is_safe`` (e.g. holds no control-token text), and a 400 is raised if not.

        ``continue_final``: the last message is the start of the assistant's answer (a
        prefill): the conversation before it is rendered with the generation prompt, and its
        content follows as is, for the model to continue.
        """
        if continue_final and messages and messages[-1].role == "assistant":
            head = self.render_segments(
                messages[:-1],
                add_generation_prompt=True,
                content_is_safe=content_is_safe,
                tools=tools,
                reasoning_effort=reasoning_effort,
            )
            prefill = messages[-1].content
            return [*head, Segment(prefill, content=True)] if prefill else head
        _check_tool_texts(messages, tools, content_is_safe)
        real = self.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            reasoning_effort=reasoning_effort,
        )
        nonce = secrets.token_hex(6)
        markers = {f"\ue000{nonce}:{i}\ue001": i for i, m in enumerate(messages) if m.content}
        marked = self._render(
            [
                _as_dict(m, f"\ue000{nonce}:{i}\ue001" if m.content else "")
                for i, m in enumerate(messages)
            ],
            add_generation_prompt,
            _tools(tools),
            _effort(reasoning_effort),
        )
        pieces = _MARKER.split(marked)  # a marker without this nonce stays text
        for transform in (_identity, str.strip):
            segments = [
                Segment(transform(messages[markers[p]].content), content=True)
                if p in markers
                else Segment(p)
                for p in pieces
                if p
            ]
            if "".join(s.text for s in segments) == real:
                return [s for s in segments if s.text]
        if all(content_is_safe(m.content) for m in messages):
            return [Segment(real)]
        raise ChatTemplateError(
            "this model's chat template rewrites message content, so control-token text in "
            "a message cannot be kept as plain text; remove it from the messages"
        )

    def _render(
        self,
        messages: list[dict[str, object]],
        add_generation_prompt: bool,
        tools: list[object] | None = None,
        extra: dict[str, object] | None = None,
    ) -> str:
        budget = _Budget(time.monotonic() + self.timeout_s, self.max_output_chars, self.timeout_s)
        token = _budget.set(budget)
        try:
            chunks = self._chunks(budget, messages, add_generation_prompt, tools, extra or {})
            return "".join(chunks)
        except SecurityError as err:
            raise UnsafeTemplate(f"the chat template tried an unsafe operation: {err}") from err
        except JinjaTemplateError as err:
            raise ChatTemplateError(f"the chat template failed to render: {err}") from err
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            raise ChatTemplateError(
                f"the chat template failed to render: {type(err).__name__}: {err}"
            ) from err
        finally:
            _budget.reset(token)

    def _chunks(
        self,
        budget: _Budget,
        messages: list[dict[str, object]],
        add_generation_prompt: bool,
        tools: list[object] | None,
        extra: dict[str, object],
    ) -> Iterator[str]:
        size = 0
        for chunk in self._template.generate(
            **extra,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=tools,
        ):
            size += len(chunk)
            if size > budget.max_chars:
                raise RenderLimitExceeded(
                    f"the rendered chat template is longer than {budget.max_chars} characters"
                )
            budget.tick()
            yield chunk


def _identity(text: str) -> str:
    return text


def _effort(effort: str | None) -> dict[str, object]:
    """Template variables for a request's ``reasoning_effort`` (none if it gave none: a
    template's own default then holds)."""
    if effort is None:
        return {}
    return {"reasoning_effort": effort, "enable_thinking": effort != "none"}


def _tools(tools: str | None) -> list[object] | None:
    if tools is None:
        return None
    parsed = json.loads(tools)
    return parsed if isinstance(parsed, list) else None


def _arguments(text: str) -> object:
    """A call's arguments as templates expect them: the parsed object (text if not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _check_tool_texts(
    messages: Sequence[ChatMessage], tools: str | None, is_safe: Callable[[str], bool]
) -> None:
    """Tool definitions and earlier calls render as template text: none may hold control-token
    text (it would become a control token)."""
    texts = [tools or ""]
    for m in messages:
        texts += [t for c in m.tool_calls for t in (c.name, c.arguments, c.id)]
        texts += [m.tool_call_id or "", m.reasoning or ""]
    if not all(is_safe(t) for t in texts if t):
        raise ChatTemplateError(
            "tool definitions, tool calls and reasoning may not contain this model's "
            "control-token text"
        )


def _as_dict(message: ChatMessage, content: str) -> dict[str, object]:
    out: dict[str, object] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning is not None:
        out["reasoning_content"] = message.reasoning
    return out
