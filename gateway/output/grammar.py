"""Grammars (llguidance's Lark) for what a request forces: a JSON schema for the content, tool
calls in the model's own format with each tool's parameters schema, or both.

Backends only apply the grammar they are handed (:attr:`OutputPlan.grammar`). The text around
a call (``<tool_call>{"name": "f", "arguments": `` ... ``}</tool_call>``) is literal, the
arguments are ``%json{schema}`` with the tool's schema as given (its ``$ref``s intact).
Markers that are single control tokens of the model are named as tokens (``<[id]>``): they
never match text.

A custom tool's call, in a format that writes it raw (:attr:`ToolFormat.raw`), is its name and
a newline, then its input under the tool's own grammar (a Lark grammar nested as
``%lark{...}``, a regex as a terminal, any text), then the closing marker.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache

import llguidance

from gateway.errors import InvalidRequest
from gateway.output.formats import ChatFormat, ToolFormat
from gateway.output.panics import EnginePanic, no_panics
from gateway.output.schemas import closed
from gateway.types import ResponseFormat, Tools, ToolSpec

log = logging.getLogger("gateway.output.grammar")
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


def regex_body(definition: str) -> str:
    """A regex (Rust syntax, as a custom tool's ``regex`` format gives it) as the body of a
    Lark ``/regex/``: its slashes and line breaks escaped, an anchor at either end dropped (a
    terminal matches whole)."""
    out: list[str] = []
    chars = iter(definition)
    for c in chars:
        if c == "\\":
            out.append(c + next(chars, "\\"))
        elif c == "/":
            out.append("\\/")
        else:
            out.append({"\n": "\\n", "\r": "\\r"}.get(c, c))
    if out and out[0] == "^":
        out.pop(0)
    if out and out[-1] == "$":
        out.pop()
    return "".join(out)


def freeform_grammar(syntax: str, definition: str) -> str:
    """A custom tool's format as a whole Lark grammar of its input."""
    if syntax == "lark":
        return definition
    if syntax == "regex":
        return f"start: INPUT\nINPUT: /{regex_body(definition)}/\n"
    return "start: /(?s:.*)/\n"


#: A custom tool's grammar is compiled by llguidance, whose compiler recurses along rule
#: references: a chain of ~2700 rules (fewer where references sit inside parentheses)
#: overflows the stack and kills the process (no panic to catch). Its text is bounded, and a
#: Lark grammar's rules are counted and their references' depth weighed before llguidance
#: sees it (a reference costs 1, plus 2 per bracket around it: measured, a reference inside
#: ``(...)*`` costs llguidance ~2.7 times a bare one); 600 leaves a margin of over 4.
MAX_FREEFORM_CHARS = 32 * 1024
MAX_LARK_RULES = 1000
MAX_LARK_DEPTH = 600
_LARK_TOKEN = re.compile(
    r"""(?P<skip>"(?:[^"\\\n]|\\.)*"i?|//[^\n]*|/(?:[^/\\\n]|\\.)+/[imslux]*|\s+)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<open>[(\[{])|(?P<close>[)\]}])|.""",
    re.X | re.S,
)
_LARK_DEFINITION = re.compile(
    r"^[ \t]*(?:[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?(?:\[[^\]\n]*\])?[ \t]*:|%)", re.M
)


def lark_shape(definition: str) -> tuple[int, int]:
    """A Lark grammar's number of rules (terminals too) and the weighted depth of its rule
    references (the longest path through them; a cycle counted whole), read without
    compiling it: linear in its length."""
    starts = {m.start(): m.group(1) for m in _LARK_DEFINITION.finditer(definition)}
    refs: dict[str, set[str]] = {}
    weight: dict[str, int] = {}
    current: str | None = None
    own_name = False
    nest = 0
    for m in _LARK_TOKEN.finditer(definition):
        if m.start() in starts:
            current, own_name, nest = starts[m.start()], True, 0
            if current is not None:
                refs.setdefault(current, set())
                weight.setdefault(current, 1)
        kind = m.lastgroup
        if kind == "open":
            nest += 1
        elif kind == "close":
            nest = max(0, nest - 1)
        elif kind == "name" and current is not None:
            if own_name:
                own_name = False
            else:
                refs[current].add(m.group())
                weight[current] = max(weight[current], 1 + 2 * nest)
    return len(refs), _longest_path(refs, weight)


def _longest_path(refs: dict[str, set[str]], weight: dict[str, int]) -> int:
    """The heaviest path through the references, each strongly connected set of rules
    counted whole (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    component: dict[str, int] = {}
    heaviest: list[int] = []  # per component, the heaviest path starting in it
    for root in refs:
        if root in index:
            continue
        work = [(root, iter(sorted(refs[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in refs), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(refs[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] != index[node]:
                continue
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            n = len(heaviest)
            for member in members:
                component[member] = n
            below = [  # components found earlier: all reachable ones are done
                heaviest[component[c]]
                for member in members
                for c in refs[member]
                if c in component and component[c] != n
            ]
            heaviest.append(sum(weight[m] for m in members) + max(below, default=0))
    return max(heaviest, default=0)


def freeform_limits(syntax: str, definition: str, param: str) -> None:
    """A 400 naming ``param`` for a custom tool's grammar too large for llguidance to be
    handed safely (cheap: run when the request is read)."""
    if len(definition) > MAX_FREEFORM_CHARS:
        raise InvalidRequest(
            f"the grammar in '{param}' is longer than {MAX_FREEFORM_CHARS} characters",
            param=param,
        )
    if syntax != "lark":
        return
    rules, depth = lark_shape(definition)
    if rules > MAX_LARK_RULES:
        raise InvalidRequest(
            f"the Lark grammar in '{param}' has {rules} rules (at most {MAX_LARK_RULES})",
            param=param,
        )
    if depth > MAX_LARK_DEPTH:
        raise InvalidRequest(
            f"the Lark grammar in '{param}' nests too deeply: its rule references chain "
            f"{depth} deep (at most {MAX_LARK_DEPTH}; a reference inside brackets counts 2 "
            "more per bracket)",
            param=param,
        )


@lru_cache(maxsize=256)
def _freeform_error(syntax: str, definition: str) -> str:
    """Why a custom tool's grammar does not compile ("" if it does)."""
    try:
        with no_panics():
            grammar = llguidance.LLMatcher.grammar_from_lark(freeform_grammar(syntax, definition))
            error = llguidance.LLMatcher.validate_grammar(grammar)
    except EnginePanic as err:
        return str(err)
    return error.strip().splitlines()[0] if error else ""


def check_freeform(syntax: str, definition: str, param: str) -> None:
    """A 400 naming ``param`` (``tools[i].format``) if a custom tool's grammar is too large
    (:func:`freeform_limits`, always checked first: llguidance never sees such a grammar) or
    llguidance cannot compile it (run in a worker thread, once per grammar: cached)."""
    freeform_limits(syntax, definition, param)
    reason = _freeform_error(syntax, definition)
    if reason:
        raise InvalidRequest(f"invalid {syntax} grammar in '{param}': {reason}", param=param)


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


def _raw_call(b: GrammarBuilder, fmt: ToolFormat, tool: ToolSpec) -> str:
    """A custom tool's raw call after its opening marker, its closing marker included. A
    regex or text input never holds the closing marker (it ends at the first one, as the
    parser reads it); a Lark input may (a nested grammar cannot be intersected): the parser
    ends it at the first marker where the input is complete under the tool's grammar."""
    assert tool.freeform is not None
    syntax, definition = tool.freeform
    head = json.dumps(tool.name + "\n", ensure_ascii=False)
    close = fmt.call_close
    n = len(b.rules)
    if syntax == "lark":
        b.rules.append(f"input{n}: %lark {{\n{definition}\n}}")
        return f"{head} input{n} {b.lit(close)}"
    if syntax == "regex":
        if close in b.fmt.special:
            b.rules.append(f"INPUT{n}: /{regex_body(definition)}/")
            return f"{head} INPUT{n} {b.lit(close)}"
        # one terminal, the marker inside (an input terminal apart would run over it), the
        # input never holding the marker: the parser ends it at the first one
        body, marker = regex_body(definition), _regex(close)
        b.rules.append(f"INPUT{n}: (/{body}/ & ~/(?s:.*){marker}(?s:.*)/) /{marker}/")
        return f"{head} INPUT{n}"
    return f"{head} {b.until(close)}"  # lazy: the input ends at the first marker


_warned_lark_json = False


def _json_call(fmt: ToolFormat, tool: ToolSpec) -> ToolSpec:
    """``tool`` as its call is written in JSON. A Lark grammar cannot be enforced inside a
    JSON string (llguidance): its input there is any string (a warning, logged once), so
    that declaring such a tool (Codex's ``apply_patch``) never fails a request; a regex is
    still enforced, as the input's ``pattern``."""
    global _warned_lark_json
    if tool.freeform is not None and tool.freeform[0] == "lark" and not _warned_lark_json:
        _warned_lark_json = True
        log.warning(
            "custom tool %r: its Lark grammar is not enforced in the %r tool-call format "
            "(its input is any JSON string there); logged once",
            tool.name,
            fmt.name,
        )
    return tool


def _call(b: GrammarBuilder, fmt: ToolFormat, tool: ToolSpec) -> str:
    tool = _json_call(fmt, tool)
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
    more = tools.max_calls - 1
    if fmt.raw:
        raw = [t for t in tools.offered if t.freeform is not None]
        calls = [t for t in tools.offered if t.freeform is None]
        bodies = []
        if calls:
            b.rules.append("call: " + " | ".join(_call(b, fmt, t) for t in calls))
            bodies.append(f"WS? call WS? {b.lit(fmt.call_close)}")
        if raw:
            b.rules.append("raw: " + " | ".join(_raw_call(b, fmt, t) for t in raw))
            bodies.append("WS? raw")
        b.rules.append("body: " + " | ".join(bodies))
        b.rules.append(f"block: {b.lit(fmt.call_open)} body")
        first = "body" if started else "block"
        return first + _repeat("(WS? block)", more)
    b.rules.append("call: " + " | ".join(_call(b, fmt, t) for t in tools.offered))
    if fmt.name == "llama3":
        return "call" + _repeat('(";" WS? call)', more)
    if fmt.name == "mistral":
        opener = "" if started else f"{b.lit(fmt.start)} "
        rest = _repeat('("," WS? call)', more)
        return f'{opener}"[" call{rest} "]"'
    # mistral_args: every call carries its own marker
    if not started:
        return "call" + _repeat("(WS? call)", more)
    names = (_name_args(b, _json_call(fmt, t)) for t in tools.offered)
    b.rules.append("first: " + " | ".join(names))
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
