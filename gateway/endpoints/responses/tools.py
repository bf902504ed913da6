"""Responses API tools: ``function``, ``custom`` and ``namespace`` tools become the core's
:class:`Tools`; hosted tools the gateway cannot run are set aside by name, never offered."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway.endpoints.responses.items import qualified
from gateway.endpoints.responses.wire import TOOLS, CustomTool, FunctionTool, NamespaceTool
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.output.schemas import schema_text
from gateway.types import ToolChoiceMode, Tools, ToolSpec
from gateway.wire.convert import validation_error
from gateway.wire.shared import choice_mode, custom_tool

log = logging.getLogger("gateway.responses")
_NO_PARAMETERS: dict[str, object] = {"type": "object", "properties": {}}
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def tool_type_name(kind: object) -> str:
    """A hosted tool's ``type`` as it may be named in a response header and a log line: only
    ``[A-Za-z0-9_.-]``, at most 64 characters ("?" if nothing is left)."""
    return _NOT_A_NAME.sub("", str(kind))[:64] or "?"


@dataclass(frozen=True)
class ToolOrigin:
    """Where a name the model calls came from: its namespace and name, and whether it is a
    custom tool (its call is a ``custom_tool_call`` whose ``input`` is free text)."""

    name: str
    namespace: str | None = None
    custom: bool = False


@dataclass
class ToolSet:
    specs: list[ToolSpec] = field(default_factory=list)
    origins: dict[str, ToolOrigin] = field(default_factory=dict)
    #: Hosted tools (``web_search``, ``mcp``...) not offered to the model, by type.
    ignored: list[str] = field(default_factory=list)

    def add(self, spec: ToolSpec, origin: ToolOrigin, where: str) -> None:
        if spec.name in self.origins:
            raise InvalidRequest(f"tool name {spec.name!r} is given twice", param=where)
        self.specs.append(spec)
        self.origins[spec.name] = origin


def _function(tool: FunctionTool, namespace: str | None, where: str) -> tuple[ToolSpec, ToolOrigin]:
    name = qualified(tool.name, namespace)
    param = f"{where}.parameters"
    parameters = schema_text(tool.parameters or _NO_PARAMETERS, param)
    spec = ToolSpec(name, tool.description or "", parameters, tool.strict is not False, param)
    return spec, ToolOrigin(tool.name, namespace)


def _custom(tool: CustomTool, namespace: str | None, where: str) -> tuple[ToolSpec, ToolOrigin]:
    fmt = tool.format
    grammar = None if fmt is None or fmt.type == "text" else (fmt.syntax, fmt.definition)
    name = qualified(tool.name, namespace)
    spec = custom_tool(name, tool.description, grammar, f"{where}.format")
    return spec, ToolOrigin(tool.name, namespace, custom=True)


def tool_set(raw: list[dict[str, object]] | None) -> ToolSet:
    out = ToolSet()
    for i, entry in enumerate(raw or ()):
        where = f"tools[{i}]"
        kind = entry.get("type")
        model = TOOLS.get(kind) if isinstance(kind, str) else None
        if model is None:
            name = tool_type_name(kind)
            if name not in out.ignored:
                out.ignored.append(name)
            continue
        try:
            tool = model.model_validate(entry)
        except ValidationError as err:
            raise validation_error(err, where) from None
        match tool:
            case FunctionTool():
                out.add(*_function(tool, None, where), where)
            case CustomTool():
                out.add(*_custom(tool, None, where), where)
            case NamespaceTool(tools=inner):
                for j, sub in enumerate(inner):
                    at = f"{where}.tools[{j}]"
                    make = _function if isinstance(sub, FunctionTool) else _custom
                    out.add(*make(sub, tool.name, at), at)  # type: ignore[arg-type]
    if out.ignored:
        log.warning("not offering hosted tools this server cannot run: %s", ", ".join(out.ignored))
    return out


def _named(choice: dict[str, object], names: set[str]) -> str:
    name = choice.get("name")
    if not isinstance(name, str) or name not in names:
        raise InvalidRequest(
            f"tool_choice names {str(name)[:64]!r}, which is not in 'tools'", param="tool_choice"
        )
    return name


def _allowed(choice: dict[str, object], tools: ToolSet) -> tuple[list[ToolSpec], ToolChoiceMode]:
    mode = choice.get("mode", "auto")
    allowed = choice.get("tools")
    if mode not in ("auto", "required") or not isinstance(allowed, list) or not allowed:
        raise InvalidRequest(
            "tool_choice allowed_tools needs 'mode' (auto or required) and a list of 'tools'",
            param="tool_choice",
        )
    names = {t.name for t in tools.specs}
    picked = {_named(a if isinstance(a, dict) else {}, names) for a in allowed}
    return [t for t in tools.specs if t.name in picked], choice_mode(mode)


def tools_for(
    tools: ToolSet, choice: str | dict[str, object] | None, parallel: bool | None
) -> Tools | None:
    """The core's :class:`Tools` for the request's ``tool_choice``; a 400 naming it when it
    asks for a tool that is not there (or a hosted one this server cannot run)."""
    parallel_ok = parallel is not False
    if not tools.specs:
        if choice in (None, "auto", "none"):
            return None
        raise InvalidRequest("'tool_choice' is set but 'tools' offers no tool", param="tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        mode = choice_mode(choice or "auto")
        return Tools(tuple(tools.specs), mode, None, parallel_ok)
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom"):
            name = _named(choice, set(tools.origins))
            return Tools(tuple(tools.specs), "named", name, parallel_ok)
        if kind == "allowed_tools":
            specs, mode = _allowed(choice, tools)
            return Tools(tuple(specs), mode, None, parallel_ok)
        raise UnsupportedParameter(
            f"tool_choice {str(kind)[:64]!r} names a hosted tool this server cannot run",
            param="tool_choice",
        )
    raise InvalidRequest(f"invalid 'tool_choice': {str(choice)[:64]!r}", param="tool_choice")
