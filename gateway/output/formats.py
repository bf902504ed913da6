"""Tool-call formats per model family, and the model's chat format as the core sees it.

A format says how calls look in the model's text (its markers and the JSON inside them), so
that :mod:`gateway.output.parser` can parse them and :mod:`gateway.output.grammar` can
constrain them. The format is detected from the chat template's source and can be set per
model in config (``tool_format``).

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` per call (Hermes,
  Qwen2.5, Qwen3).
- ``llama3``: ``{"name": ..., "parameters": {...}}``, after ``<|python_tag|>`` or alone; several
  calls separated by ``;`` (Llama 3.1 / 3.2).
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
- ``mistral_args``: ``[TOOL_CALLS]name[ARGS]{...}`` per call (Mistral's newer templates).
- ``generic``: for templates that know no tools (SmolLM2's): the tools are described in the
  system prompt and calls are written as in ``hermes``.

A custom tool (the Responses API's free-form tools: its input is text, maybe under a Lark or
regex grammar) is called raw where the format has a closing marker: ``hermes`` and
``generic`` write ``<tool_call>name\n`` then the input exactly as meant (no JSON escaping)
then ``</tool_call>``. The other formats write its JSON form,
``{"name": ..., "arguments": {"input": "..."}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ToolFormatName = Literal["hermes", "llama3", "mistral", "mistral_args", "generic"]
TOOL_FORMATS: tuple[ToolFormatName, ...] = (
    "hermes",
    "llama3",
    "mistral",
    "mistral_args",
    "generic",
)


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one family writes tool calls."""

    name: ToolFormatName
    #: Text that starts the calls (empty: llama3's bare JSON).
    start: str
    #: Text around each call: what opens (after the first) and what closes one.
    call_open: str = ""
    call_close: str = ""
    #: The key of the arguments in a call object.
    arguments_key: str = "arguments"
    #: Calls are written into the template by the template itself (it takes ``tools=``).
    native: bool = True

    @property
    def raw(self) -> bool:
        """A custom tool's call is ``call_open`` name, newline, its raw input, ``call_close``."""
        return self.name in ("hermes", "generic")

    @property
    def markers(self) -> tuple[str, ...]:
        """Marker texts a backend must show in the text it hands the parser (control tokens
        are otherwise invisible)."""
        out = [self.start, self.call_open, self.call_close]
        if self.name == "mistral_args":
            out.append("[ARGS]")
        return tuple(dict.fromkeys(m for m in out if m))


FORMATS: dict[ToolFormatName, ToolFormat] = {
    "hermes": ToolFormat("hermes", "<tool_call>", "<tool_call>", "</tool_call>"),
    "generic": ToolFormat("generic", "<tool_call>", "<tool_call>", "</tool_call>", native=False),
    "llama3": ToolFormat("llama3", "<|python_tag|>", arguments_key="parameters"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]"),
    "mistral_args": ToolFormat("mistral_args", "[TOOL_CALLS]", "[TOOL_CALLS]"),
}


def detect_tool_format(template: str) -> ToolFormat:
    """The format a chat template's source implies (``generic`` if it knows no tools)."""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral_args" if "[ARGS]" in template else "mistral"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return FORMATS["llama3"]
    return FORMATS["generic"]


@dataclass(frozen=True, slots=True)
class Reasoning:
    """The markers around a thinking model's reasoning."""

    start: str = "<think>"
    end: str = "</think>"


def detect_reasoning(template: str) -> Reasoning | None:
    return Reasoning() if "</think>" in template else None


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """What the core needs to know of an in-process model's chat output.

    ``special`` maps marker texts that are single control tokens of the model's vocabulary to
    their ids: a grammar must name them as tokens, not text."""

    tools: ToolFormat
    reasoning: Reasoning | None = None
    special: Mapping[str, int] = field(default_factory=dict)
    #: The custom tools a generation offers whose calls are written raw (:attr:`ToolFormat.raw`),
    #: by name: their ``(syntax, definition)`` (set by the plan, per generation; the parser
    #: reads a raw call only of these).
    raw_tools: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def opens_reasoning(self, prompt: str) -> bool:
        """The rendered prompt ends inside the reasoning (the template wrote its start marker
        into the generation prompt, as DeepSeek-R1's and Qwen3's thinking templates do)."""
        return self.reasoning is not None and prompt.rstrip().endswith(self.reasoning.start)

    @property
    def markers(self) -> tuple[str, ...]:
        out = list(self.tools.markers)
        if self.reasoning is not None:
            out += [self.reasoning.start, self.reasoning.end]
        return tuple(dict.fromkeys(out))


def chat_format(template: str, override: ToolFormatName | None = None) -> ChatFormat:
    """A model's chat format from its template (``special`` filled in by the backend)."""
    tools = FORMATS[override] if override is not None else detect_tool_format(template)
    return ChatFormat(tools, detect_reasoning(template))
