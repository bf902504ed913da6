"""Grammars (llguidance's Lark) for what a request forces: a JSON schema for the content, tool
calls in the model's own format with each tool's parameters schema, or both.

Backends only apply the grammar they are handed (:attr:`OutputPlan.grammar`). The text around
a call (``<tool_call>{"name": "f", "arguments": `` ... ``}</tool_call>``) is literal, the
arguments are ``%json{schema}`` with the tool's schema as given (its ``$ref``s intact).
Markers that are single control tokens of the model are named as tokens (``<[id]>``): they
never match text.
"""

from __future__ import annotations

import json
import re

from gateway.output.formats import ChatFormat, ToolFormat
from gateway.output.schemas import closed
from gateway.types import ResponseFormat, Tools, ToolSpec

#: JSON written the way models write it (and never endless white space).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
OBJECT_SCHEMA = '{"type": "object"}'
#: White space between the parts of a call: bounded, so a model that shuns the closing marker
#: (or EOS) cannot write spaces until ``max_tokens``.
MAX_SPACE = 4


def json_rule(schema: str) -> str:
    """``%json{...}`` for a schema's JSON text (:func:`closed`), in the house JSON style."""
    doc = closed(json.loads(schema))
    if isinstance(doc, dict) and "x-guidance" not in doc:
        doc = {**doc, "x-guidance": JSON_STYLE}
    return "%json" + json.dumps(doc, ensure_ascii=False)


def _regex(text: str) -> str:
    """``text`` matched literally inside a Lark ``/regex/``."""
    return re.escape(text).replace("/", "\\/")


def _name_args(b: GrammarBuilder, tool: ToolSpec) -> str:
    """Mistral's ``name[ARGS]{...}`` call, after its marker (``[ARGS]`` a token where the
    vocabulary has one: the model writes it so, and text never matches a control token)."""
    return f"{json.dumps(tool.name)} {b.lit('[ARGS]')} {json_rule(tool.parameters)}"


class GrammarBuilder:
    """``opened``: the prompt already opened the reasoning (the output starts inside it)."""

    def __init__(self, fmt: ChatFormat, *, opened: bool = False) -> None:
        self.fmt = fmt
        self.opened = opened
        self.rules: list[str] = []

    def lit(self, text: str) -> str:
        """A marker as a token (a control token of the model) or as literal text."""
        token = self.fmt.special.get(text)
        return f"<[{token}]>" if token is not None else json.dumps(text, ensure_ascii=False)

    def until(self, marker: str) -> str:
        """Any text up to and including the first ``marker``."""
        token = self.fmt.special.get(marker)
        if token is not None:
            return f"ANY <[{token}]>"  # text never holds a control token
        name = f"upto{len(self.rules)}"
        self.rules.append(f"{name}[lazy]: /(?s:.*){_regex(marker)}/")
        return name

    def free_text(self, marker: str) -> str:
        """Any text that never holds ``marker``."""
        if marker in self.fmt.special:
            return "ANY"
        name = f"TEXT{len(self.rules)}"
        self.rules.append(f"{name}: /(?s:.*)/ & ~/(?s:.*){_regex(marker)}(?s:.*)/")
        return name

    def reasoning(self) -> str:
        """The reasoning before the answer: optional, or (already opened) its rest."""
        r = self.fmt.reasoning
        if r is None:
            return ""
        if self.opened:
            self.rules.append(f"think: {self.until(r.end)} WS?")
            return "think "
        self.rules.append(f"think: {self.lit(r.start)} {self.until(r.end)} WS?")
        return "think? "

    def build(self, start: str) -> str:
        head = f"start: {self.reasoning()}{start}"
        base = ["ANY: /(?s:.*)/", f"WS: /[ \\t\\r\\n]{{1,{MAX_SPACE}}}/"]
        return "\n".join([head, *self.rules, *base]) + "\n"


def _call(b: GrammarBuilder, fmt: ToolFormat, tool: ToolSpec) -> str:
    if fmt.name == "mistral_args":
        return f"{b.lit(fmt.start)} {_name_args(b, tool)}"
    args = json_rule(tool.parameters)
    head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "{fmt.arguments_key}": ')
    return f'{head} {args} "}}"'


def _repeat(expr: str, times: int) -> str:
    return f" {expr}{{0,{times}}}" if times > 0 else ""


def _calls(b: GrammarBuilder, tools: Tools, *, started: bool) -> str:
    """The calls; ``started``: the first call's opening marker is already written."""
    fmt = b.fmt.tools
    b.rules.append("call: " + " | ".join(_call(b, fmt, t) for t in tools.offered))
    more = tools.max_calls - 1
    if fmt.name in ("hermes", "generic"):
        close = b.lit(fmt.call_close)
        b.rules.append(f"block: {b.lit(fmt.call_open)} WS? call WS? {close}")
        first = f"WS? call WS? {close}" if started else "block"
        return first + _repeat("(WS? block)", more)
    if fmt.name == "llama3":
        return "call" + _repeat('(";" WS? call)', more)
    if fmt.name == "mistral":
        opener = "" if started else f"{b.lit(fmt.start)} "
        rest = _repeat('("," WS? call)', more)
        return f'{opener}"[" call{rest} "]"'
    # mistral_args: every call carries its own marker
    if not started:
        return "call" + _repeat("(WS? call)", more)
    b.rules.append("first: " + " | ".join(_name_args(b, t) for t in tools.offered))
    return "first" + _repeat("(WS? call)", more)


def grammar_for(
    fmt: ChatFormat,
    tools: Tools | None,
    response_format: ResponseFormat | None,
    *,
    opened: bool = False,
) -> str | None:
    """The Lark grammar a generation must follow (None: free text); ``opened``: the variant
    for a prompt that ends inside the reasoning."""
    b = GrammarBuilder(fmt, opened=opened)
    content = None
    if response_format is not None:
        content = json_rule(response_format.schema or OBJECT_SCHEMA)
    if tools is None or not tools.offered:
        return b.build(content) if content is not None else None
    start = fmt.tools.start
    if tools.choice in ("required", "named"):
        return b.build(_calls(b, tools, started=False))
    # auto: free text (or the content's schema), or calls once the model starts one
    if fmt.tools.name == "llama3":  # bare JSON or after <|python_tag|>
        return b.build(f"{content or 'ANY'} | {b.lit(start)}? {_calls(b, tools, started=False)}")
    after = _calls(b, tools, started=True)
    if content is not None:
        return b.build(f"{content} | {b.lit(start)} {after}")
    return b.build(f"{b.free_text(start)} | {b.until(start)} {after}")
