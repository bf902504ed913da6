"""What every wire API maps the same way: sampling settings, tools (custom tools too) and the
tool choice, JSON response formats, and the chat-completions fields a remote replica gets for
them.

Each endpoint's converter reads its own wire shape and calls these; none writes them again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gateway.errors import InvalidRequest
from gateway.output.calls import custom_arguments as custom_arguments  # the wire's, re-exported
from gateway.output.grammar import freeform_limits
from gateway.output.plan import template_tools
from gateway.types import (
    Capability,
    Passthrough,
    PromptProgress,
    Requirement,
    ResponseFormat,
    SamplingParams,
    ToolChoiceMode,
    Tools,
    ToolSpec,
)

#: What every text-generating request needs of its model's backend.
GENERATES = Requirement(Capability.COMPLETIONS, "model")


def sampling_params(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    logit_bias: tuple[tuple[int, float], ...] = (),
) -> SamplingParams:
    """Sampling settings from the fields a request set (None: the neutral value)."""
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k if top_k is not None and top_k > 0 else 0,
        min_p=min_p or 0.0,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repetition_penalty=repetition_penalty or 1.0,
        seed=seed,
        logit_bias=logit_bias,
    )


#: The tool choices every wire API has, by the names each gives them.
_MODES: dict[str, ToolChoiceMode] = {
    "auto": "auto",
    "none": "none",
    "required": "required",  # OpenAI's name
    "any": "required",  # Anthropic's
}


def choice_mode(value: object, param: str = "tool_choice") -> ToolChoiceMode:
    """A tool choice's mode by its wire name (``auto``, ``none``, ``required`` / ``any``)."""
    mode = _MODES.get(value) if isinstance(value, str) else None
    if mode is None:
        raise InvalidRequest(f"invalid '{param}': {str(value)[:64]!r}", param=param)
    return mode


def choose_tools(
    specs: Sequence[ToolSpec],
    mode: ToolChoiceMode,
    name: str | None = None,
    *,
    parallel: bool = True,
    param: str = "tools",
    choice_param: str = "tool_choice",
) -> Tools:
    """The request's :class:`Tools`: names unique, a named choice among them (400s naming
    ``param`` / ``choice_param``)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param=param)
    if mode == "named" and name not in names:
        raise InvalidRequest(
            f"{choice_param} names {str(name)[:64]!r}, which is not in '{param}'",
            param=choice_param,
        )
    return Tools(tuple(specs), mode, name if mode == "named" else None, parallel)


#: A custom tool's grammar as its wire API gives it: ``(syntax, definition)``, either possibly
#: missing (a 400); None: the ``text`` format (any text).
Grammar = tuple[str | None, str | None] | None


def _freeform(name: str, grammar: Grammar, param: str) -> tuple[str, str]:
    """A custom tool's input format as :attr:`ToolSpec.freeform`: ``("text", "")``, or its
    Lark or regex grammar within the sizes llguidance is handed safely (a 400 naming
    ``param`` if not; whether it compiles is checked off the event loop, by
    :func:`gateway.output.plan.check_schemas`)."""
    if grammar is None:
        return ("text", "")
    syntax, definition = grammar
    if syntax is None or not definition:
        raise InvalidRequest(
            f"custom tool {name[:64]!r}: a grammar format needs 'syntax' (lark or regex) and "
            "a 'definition'",
            param=param,
        )
    freeform_limits(syntax, definition, param)
    return (syntax, definition)


def custom_tool(name: str, description: str | None, grammar: Grammar, param: str) -> ToolSpec:
    """A custom tool (free-text input, OpenAI's ``custom`` tool of the Responses and the Chat
    Completions APIs) as a :class:`ToolSpec`; ``param`` names its format (in a 400).

    Its input is also the one string property ``input`` of JSON arguments (its call in a
    tool-call format that cannot write it raw, and for a remote replica); a regex format
    constrains that string."""
    freeform = _freeform(name, grammar, param)
    text: dict[str, object] = {"type": "string"}
    if freeform[0] == "regex":
        text["pattern"] = f"^(?:{freeform[1]})$"
    parameters = {
        "type": "object",
        "properties": {"input": text},
        "required": ["input"],
        "additionalProperties": False,
    }
    return ToolSpec(name, description or "", json.dumps(parameters), True, param, freeform)


def chat_tool_choice(tools: Tools) -> object:
    """The tool choice as chat completions say it (for a remote replica)."""
    if tools.choice == "named":
        return {"type": "function", "function": {"name": tools.name}}
    return tools.choice


def chat_format(fmt: ResponseFormat) -> dict[str, object]:
    """A response format as chat completions' ``response_format`` (for a remote replica)."""
    if fmt.schema is None:
        return {"type": "json_object"}
    spec = {"name": fmt.name, "schema": json.loads(fmt.schema), "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": spec}


def features(
    tools: Tools | None,
    fmt: ResponseFormat | None,
    *,
    tools_param: str = "tools",
    format_param: str = "response_format",
    logprobs_param: str | None = None,
) -> tuple[tuple[Requirement, ...], Passthrough]:
    """What a request needs of its model's backend (each naming the field that needs it),
    and the chat-completions fields a remote replica that has the capability gets for it."""
    requires = [GENERATES]
    passthrough: list[tuple[str, str]] = []
    if tools is not None:
        requires.append(Requirement(Capability.TOOLS, tools_param))
        passthrough.append(("tools", template_tools(tools.specs)))  # chat's shape
        passthrough.append(("tool_choice", json.dumps(chat_tool_choice(tools))))
        passthrough.append(("parallel_tool_calls", json.dumps(tools.parallel)))
    if fmt is not None:
        requires.append(Requirement(Capability.JSON_SCHEMA, format_param))
        passthrough.append(("response_format", json.dumps(chat_format(fmt), ensure_ascii=False)))
    if logprobs_param is not None:
        requires.append(Requirement(Capability.LOGPROBS, logprobs_param))
    return tuple(requires), tuple(passthrough)


def prompt_progress(progress: PromptProgress) -> dict[str, object]:
    """llama-server's ``prompt_progress`` object (``return_progress``): prompt tokens in all,
    taken from the cache, read so far (the cached ones included), and milliseconds since the
    engine took the request."""
    return {
        "total": progress.total,
        "cache": progress.cached,
        "processed": progress.processed,
        "time_ms": round(progress.elapsed_s * 1000, 1),
    }
