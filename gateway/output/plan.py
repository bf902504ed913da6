"""From a request and the model's chat format to what the backend renders and enforces.

For a model whose template knows tools, the tools go to the template (``tools=``); for one
that does not (``generic``), they are described in the system prompt, earlier calls are
written back as the model would write them, and tool results become user turns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import replace

from gateway.output.calls import custom_names, input_of
from gateway.output.formats import ChatFormat
from gateway.output.grammar import check_freeform, grammar_for
from gateway.output.schemas import check_schema
from gateway.types import (
    ChatMessage,
    ClientRequest,
    GenerationRequest,
    OutputPlan,
    ToolSpec,
)


def template_tools(tools: Sequence[ToolSpec]) -> str:
    """The tools as Hugging Face chat templates take them (JSON text)."""
    return json.dumps([_tool_dict(t) for t in tools], ensure_ascii=False)


def _tool_dict(tool: ToolSpec) -> dict[str, object]:
    function: dict[str, object] = {"name": tool.name, "parameters": json.loads(tool.parameters)}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def check_schemas(request: GenerationRequest) -> None:
    """Every schema of the request compiles, and every custom tool's grammar (run in a
    worker thread: up to ~50 ms each)."""
    if request.tools is not None:
        for i, tool in enumerate(request.tools.specs):
            if tool.freeform is not None and tool.freeform[0] != "text":
                check_freeform(*tool.freeform, tool.param or f"tools[{i}].format")
            check_schema(tool.parameters, tool.param or f"tools[{i}].function.parameters")
    fmt = request.response_format
    if fmt is not None and fmt.schema is not None:
        check_schema(fmt.schema, fmt.param)


def plan_output(request: GenerationRequest, fmt: ChatFormat) -> GenerationRequest:
    tools = request.tools
    offered = tools.offered if tools is not None else ()
    messages = request.messages
    if messages is not None:
        messages = _written(messages, fmt, offered, custom_names(tools))
    needed = offered or request.response_format is not None or fmt.reasoning is not None
    if not needed and messages == request.messages:
        return request
    grammar_open = None
    if fmt.reasoning is not None:
        grammar_open = grammar_for(fmt, tools, request.response_format, opened=True)
    plan = OutputPlan(
        grammar=grammar_for(fmt, tools, request.response_format),
        grammar_open=grammar_open,
        template_tools=template_tools(offered) if offered and fmt.tools.native else None,
        parse_tools=bool(offered),
        format=_with_raw_tools(fmt, offered),
    )
    return replace(request, messages=messages, output=plan)


def _with_raw_tools(fmt: ChatFormat, offered: Sequence[ToolSpec]) -> ChatFormat:
    """``fmt`` knowing the offered custom tools whose calls are written raw."""
    if not fmt.tools.raw:
        return fmt
    raw = {t.name: t.freeform for t in offered if t.freeform is not None}
    return replace(fmt, raw_tools=raw) if raw else fmt


GENERIC_INSTRUCTIONS = (
    "You can call functions. These are the functions, as JSON schemas:\n{tools}\n"
    "To call a function, answer with nothing but "
    '<tool_call>{{"name": "<function name>", "arguments": <arguments as a JSON object>}}'
    "</tool_call>"
)
#: Added when a custom tool (free-text input) is offered (for ``hermes`` templates too).
RAW_INSTRUCTIONS = GENERIC_RAW_INSTRUCTIONS = (
    '\nTo call a function that takes free text (it has "input", not "parameters"), answer '
    "with nothing but <tool_call><function name>, a new line, then the text as it is (not "
    "JSON), then </tool_call>"
)
_FREEFORM_INPUT = {
    "text": "free text",
    "regex": "free text matching this regular expression: {}",
    "lark": "free text in this Lark grammar:\n{}",
}


def call_text(name: str, arguments: str, *, raw: bool = False) -> str:
    """A call as the model writes it (``raw``: a custom tool's, its input unescaped)."""
    text = input_of(arguments) if raw else None
    if text is not None:
        return f"<tool_call>{name}\n{text}</tool_call>"
    return (
        f'<tool_call>{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}</tool_call>'
    )


def _described(tool: ToolSpec) -> str:
    if tool.freeform is None:
        return json.dumps(_tool_dict(tool)["function"])
    syntax, definition = tool.freeform
    about: dict[str, object] = {"name": tool.name}
    if tool.description:
        about["description"] = tool.description
    about["input"] = _FREEFORM_INPUT.get(syntax, "free text").format(definition)
    return json.dumps(about, ensure_ascii=False)


def generic_messages(
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolSpec],
    raw: frozenset[str] = frozenset(),
) -> tuple[ChatMessage, ...]:
    """The conversation for a template that knows no tools; calls of the tools named in
    ``raw`` (custom tools) are written raw."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.tool_calls:
            calls = "".join(call_text(c.name, c.arguments, raw=c.name in raw) for c in m.tool_calls)
            out.append(replace(m, content=m.content + calls, tool_calls=()))
        elif m.role == "tool":
            result = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_response>"):
                out[-1] = replace(out[-1], content=out[-1].content + "\n" + result)
            else:
                out.append(ChatMessage("user", result))
        else:
            out.append(m)
    if tools:
        described = "\n".join(_described(t) for t in tools)
        instructions = GENERIC_INSTRUCTIONS.format(tools=described)
        if any(t.freeform is not None for t in tools):
            instructions += GENERIC_RAW_INSTRUCTIONS
        if out and out[0].role in ("system", "developer"):
            out[0] = replace(out[0], content=f"{out[0].content}\n\n{instructions}")
        else:
            out.insert(0, ChatMessage("system", instructions))
    return tuple(out)


def _written(
    messages: Sequence[ChatMessage],
    fmt: ChatFormat,
    tools: Sequence[ToolSpec],
    raw: frozenset[str],
) -> tuple[ChatMessage, ...]:
    """The conversation as the model's format takes it: :func:`generic_messages` for a
    template that knows no tools, :func:`native_messages` for one that writes calls raw."""
    if not fmt.tools.native:
        return generic_messages(messages, tools, raw)
    if fmt.tools.raw:
        return native_messages(messages, tools, raw)
    return tuple(messages)


def native_messages(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], raw: frozenset[str]
) -> tuple[ChatMessage, ...]:
    """For a template that knows tools and whose calls have a closing marker (``hermes``):
    earlier custom calls written raw into the assistant's text (the template writes the
    others), and the raw-call instructions added to the system prompt when a custom tool is
    offered (the template only knows the JSON form)."""
    out: list[ChatMessage] = []
    for m in messages:
        custom = [c for c in m.tool_calls if c.name in raw]
        if custom:
            text = "".join(call_text(c.name, c.arguments, raw=True) for c in custom)
            rest = tuple(c for c in m.tool_calls if c.name not in raw)
            m = replace(m, content=m.content + text, tool_calls=rest)
        out.append(m)
    if any(t.freeform is not None for t in tools):
        note = RAW_INSTRUCTIONS.strip()
        if out and out[0].role in ("system", "developer"):
            out[0] = replace(out[0], content=f"{out[0].content}\n\n{note}")
        else:
            out.insert(0, ChatMessage("system", note))
    return tuple(out)


def _needs_schema_check(request: GenerationRequest) -> bool:
    fmt = request.response_format
    return request.tools is not None or (fmt is not None and fmt.schema is not None)


async def plan_request(request: ClientRequest, fmt: ChatFormat | None) -> ClientRequest:
    """Each generation's :class:`OutputPlan` for a backend that parses nothing itself (one
    with a chat format); requests for other backends pass unchanged."""
    if fmt is None or request.endpoint == "embeddings" or not request.generations:
        return request
    first = request.generations[0]
    if _needs_schema_check(first):  # the generations share their tools and formats
        await asyncio.to_thread(check_schemas, first)
    if first.is_chat:  # chat completions, responses
        gens = tuple(plan_output(g, fmt) for g in request.generations)
    else:  # a raw completion: constrained if asked, never parsed
        gens = tuple(_completion_plan(g, fmt) for g in request.generations)
    return replace(request, generations=gens)


def with_messages(
    planned: ClientRequest, messages: Sequence[ChatMessage], fmt: ChatFormat | None
) -> ClientRequest:
    """``planned`` (from :func:`plan_request`) for another conversation with the same tools
    and formats (a shorter one, under ``truncation: "auto"``): its plan is kept, only the
    messages are written as the model's format takes them; no schema is compiled again."""
    kept = tuple(messages)
    if fmt is not None:
        tools = planned.generations[0].tools
        kept = _written(kept, fmt, tools.offered if tools is not None else (), custom_names(tools))
    gens = tuple(replace(g, messages=kept) for g in planned.generations)
    return replace(planned, generations=gens)


def _completion_plan(request: GenerationRequest, fmt: ChatFormat) -> GenerationRequest:
    if request.response_format is None:
        return request
    grammar = grammar_for(replace(fmt, reasoning=None), None, request.response_format)
    return replace(request, output=OutputPlan(grammar=grammar))
