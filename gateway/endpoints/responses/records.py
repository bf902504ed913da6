"""What the store keeps of a response: the object, its input items (with ids, as
``input_items`` lists them) and the conversation a later ``previous_response_id`` replays."""

from __future__ import annotations

import json

from gateway.endpoints.responses.convert import ResponsesState
from gateway.endpoints.responses.objects import new_id
from gateway.endpoints.responses.wire import Item, MessageItem
from gateway.store import StoredResponse
from gateway.wire.responses import dumps

_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}


def item_json(item: Item) -> dict[str, object]:
    """An input item as ``input_items`` lists it: with an id and a status; message content
    as parts."""
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


def record_of(state: ResponsesState, response: dict[str, object]) -> StoredResponse:
    items = [item_json(i) for i in state.items]
    history = [i.model_dump(mode="json", by_alias=True, exclude_none=True) for i in state.history]
    output = response["output"]
    assert isinstance(output, list)
    created = response["created_at"]
    assert isinstance(created, int)
    return StoredResponse(
        id=str(response["id"]),
        owner=state.owner,
        created_at=created,
        response=dumps(response),
        input_items=dumps(items),
        context=json.dumps([*history, *items, *output], ensure_ascii=False),
        root=state.root or str(response["id"]),
    )
