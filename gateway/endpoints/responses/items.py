"""Responses API items: validated one by one, and turned into the chat messages a template
renders (a conversation's stored items are replayed through the same functions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pydantic import ValidationError

from gateway.endpoints.responses.wire import (
    ITEMS,
    Content,
    CustomToolCallItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    Item,
    MessageItem,
    ReasoningItem,
)
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.ids import ordered_hex
from gateway.output.calls import custom_arguments
from gateway.types import ChatMessage, ToolCallRef
from gateway.wire.convert import validation_error

#: The most items one request (with its stored history) may carry.
MAX_ITEMS = 4096
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{ordered_hex()}"


def item_json(item: Item) -> dict[str, object]:
    """An input item as stored and as ``input_items`` lists it: with an id (given once, when
    the request is read) and a status; message content as parts."""
    out = item.model_dump(mode="json", by_alias=True, exclude_none=True)
    out.setdefault("id", new_id(_ID_PREFIX[item.type]))
    out.setdefault("status", "completed")
    if isinstance(item, MessageItem) and isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        part: dict[str, object] = {"type": kind, "text": item.content}
        if kind == "output_text":
            part["annotations"] = []
        out["content"] = [part]
    return out


def parse_items(raw: str | list[dict[str, object]], where: str = "input") -> list[Item]:
    """``input`` as items: a string is one user message."""
    if isinstance(raw, str):
        return [MessageItem(role="user", content=raw)]
    if len(raw) > MAX_ITEMS:
        raise InvalidRequest(f"'{where}' has more than {MAX_ITEMS} items", param=where)
    return [parse_item(item, f"{where}[{i}]") for i, item in enumerate(raw)]


def parse_item(raw: dict[str, object], where: str) -> Item:
    kind = raw.get("type", "message" if "role" in raw else None)
    model = ITEMS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnsupportedParameter(
            f"'{where}.type' {str(kind)[:64]!r} is not an input item this server takes "
            f"(one of {', '.join(ITEMS)})",
            param=f"{where}.type",
        )
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, where) from None


def content_text(content: Content, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        elif part.type in _TEXT_PARTS and part.text is not None:
            texts.append(part.text)
        else:
            raise UnsupportedParameter(
                f"content parts of type {part.type[:64]!r} are not supported by this server",
                param=f"{where}[{j}]",
            )
    return "".join(texts)


def _reasoning_text(item: ReasoningItem) -> str:
    parts = item.content or item.summary
    return "\n".join(p.text for p in parts)


@dataclass
class _Conversation:
    """Messages built item by item: calls join the assistant message before them, reasoning
    joins the next assistant message."""

    messages: list[ChatMessage] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)
    reasoning: str | None = None

    def assistant(self) -> ChatMessage:
        """The assistant message a call joins: the last message if it is one (and no tool
        result followed it), else a new empty one."""
        if not self.messages or self.messages[-1].role != "assistant":
            self.messages.append(ChatMessage("assistant", "", reasoning=self._take_reasoning()))
        return self.messages[-1]

    def _take_reasoning(self) -> str | None:
        reasoning, self.reasoning = self.reasoning, None
        return reasoning

    def message(self, item: MessageItem, where: str) -> None:
        text = content_text(item.content, f"{where}.content")
        if item.role == "assistant":
            self.messages.append(ChatMessage("assistant", text, reasoning=self._take_reasoning()))
        else:
            self.messages.append(ChatMessage(item.role, text))

    def call(self, call_id: str, name: str, arguments: str) -> None:
        last = self.assistant()
        ref = ToolCallRef(call_id, name, arguments)
        self.messages[-1] = replace(last, tool_calls=(*last.tool_calls, ref))
        self.calls[call_id] = name

    def output(self, item: FunctionCallOutputItem, where: str) -> None:
        name = self.calls.get(item.call_id)
        if name is None:
            raise InvalidRequest(
                f"no function_call with call_id {item.call_id[:64]!r} precedes this output",
                param=f"{where}.call_id",
            )
        text = content_text(item.output, f"{where}.output")
        self.messages.append(ChatMessage("tool", text, name=name, tool_call_id=item.call_id))

    def add(self, item: Item, where: str) -> None:
        match item:
            case MessageItem():
                self.message(item, where)
            case FunctionCallItem(call_id=call_id, name=name, arguments=arguments):
                self.call(call_id, qualified(name, item.namespace), arguments)
            case CustomToolCallItem(call_id=call_id, name=name):
                self.call(call_id, qualified(name, item.namespace), custom_arguments(item.input))
            case FunctionCallOutputItem():
                self.output(item, where)
            case ReasoningItem():
                text = _reasoning_text(item)
                self.reasoning = f"{self.reasoning}\n{text}" if self.reasoning else text


def qualified(name: str, namespace: str | None) -> str:
    """The name the model sees for a tool inside a namespace: ``crm.lookup``."""
    return f"{namespace}.{name}" if namespace else name


def to_messages(
    history: Sequence[Item], items: Sequence[Item], instructions: str | None
) -> tuple[ChatMessage, ...]:
    """``instructions`` (a system message: they are not carried over from earlier turns), the
    stored ``history`` and this request's ``items``, as chat messages."""
    convo = _Conversation()
    if instructions:
        convo.messages.append(ChatMessage("system", instructions))
    for i, item in enumerate(history):
        convo.add(item, f"previous_response_id (item {i})")
    for i, item in enumerate(items):
        convo.add(item, f"input[{i}]")
    if not convo.messages:
        raise InvalidRequest("'input' is empty and no instructions were given", param="input")
    return tuple(convo.messages)
