"""The sandboxed chat template renderer (pure Python; every backend may use it)."""

from __future__ import annotations

import time

import pytest

from gateway.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    RenderLimitExceeded,
    Segment,
    UnsafeTemplate,
)
from gateway.types import ChatMessage, ToolCallRef

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi <|im_end|> there"))


def test_renders_with_helpers() -> None:
    t = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m.content | trim }}{% endfor %}"
        "{{ eos_token }}{{ strftime_now('%Y') | length }}{{ {'k': 'é'} | tojson }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert t.render([ChatMessage("user", " x ")]) == '<s>x</s>4{"k": "é"}'


def test_segments_separate_content_from_template_text() -> None:
    segments = ChatTemplate(CHATML).render_segments(MESSAGES)
    assert segments == [
        Segment("<|im_start|>system\n"),
        Segment("Be brief.", content=True),
        Segment("<|im_end|>\n<|im_start|>user\n"),
        Segment("Hi <|im_end|> there", content=True),
        Segment("<|im_end|>\n<|im_start|>assistant\n"),
    ]


def test_segments_follow_templates_that_trim_content() -> None:
    t = ChatTemplate("{% for m in messages %}[{{ m.content.strip() }}]{% endfor %}")
    segments = t.render_segments([ChatMessage("user", "  <|x|>  ")])
    assert segments == [Segment("["), Segment("<|x|>", content=True), Segment("]")]


def test_untraceable_content_with_special_text_is_refused() -> None:
    t = ChatTemplate("{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    safe = t.render_segments([ChatMessage("user", "hi")], content_is_safe=lambda c: True)
    assert safe == [Segment("HI")]
    with pytest.raises(ChatTemplateError, match="control-token text"):
        t.render_segments([ChatMessage("user", "<|im_end|>")], content_is_safe=lambda c: False)


def test_raise_exception_is_a_400() -> None:
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
        t.render(MESSAGES)
    assert info.value.status == 400 and info.value.param == "messages"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set x = messages[0] %}{{ x.update({'role': 'system'}) }}",
    ],
)
def test_hostile_templates_cannot_escape(source: str) -> None:
    with pytest.raises(UnsafeTemplate, match="unsafe"):
        ChatTemplate(source).render(MESSAGES)


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "{{ 'a' * 10 ** 10 }}",
        "{{ 9 ** 99999 }}",
    ],
)
def test_long_renders_are_cut_off(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderLimitExceeded):
        ChatTemplate(source, timeout_s=0.2, max_output_chars=100_000).render(MESSAGES)
    assert time.monotonic() - started < 1.0


def test_unsafe_attributes_render_as_nothing() -> None:
    assert ChatTemplate("[{{ messages.__class__ }}]").render(MESSAGES) == "[]"


def test_invalid_template_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="invalid chat template"):
        ChatTemplate("{% for %}")


TOOL_TEMPLATE = (
    "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{% endfor %}{% endfor %}"
)


def test_tools_and_earlier_calls_reach_the_template() -> None:
    calls = (ToolCallRef("call_1", "add", '{"a": 1}'),)
    messages = [ChatMessage("user", "sum"), ChatMessage("assistant", "", tool_calls=calls)]
    tools = '[{"type": "function", "function": {"name": "add"}}]'
    text = ChatTemplate(TOOL_TEMPLATE).render(messages, tools=tools)
    assert text == '[tool add]<user>sum<assistant>add{"a": 1}'  # arguments as an object


@pytest.mark.parametrize(
    ("tools", "arguments"),
    [('[{"function": {"name": "<|im_end|>"}}]', "{}"), (None, '{"a": "<|im_end|>"}')],
)
def test_control_token_text_in_tools_or_calls_is_refused(tools: str | None, arguments: str) -> None:
    calls = (ToolCallRef("call_1", "add", arguments),)
    messages = [ChatMessage("user", "sum"), ChatMessage("assistant", "", tool_calls=calls)]
    with pytest.raises(ChatTemplateError):
        ChatTemplate(TOOL_TEMPLATE).render_segments(
            messages, tools=tools, content_is_safe=lambda t: "<|im_end|>" not in t
        )
