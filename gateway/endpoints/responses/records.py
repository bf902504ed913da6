"""What the store keeps of a response: the object, its input items (with the ids they got
when the request was read, as ``input_items`` lists them) and the conversation a later
``previous_response_id`` replays."""

from __future__ import annotations

from gateway.endpoints.responses.convert import ResponsesState
from gateway.store import StoredResponse
from gateway.wire.responses import dumps


def record_of(state: ResponsesState, response: dict[str, object]) -> StoredResponse:
    output = response["output"]
    assert isinstance(output, list)
    created = response["created_at"]
    assert isinstance(created, int)
    return StoredResponse(
        id=str(response["id"]),
        owner=state.owner,
        created_at=created,
        response=dumps(response),
        input_items=dumps(state.input_json),
        context=dumps([*state.history, *state.input_json, *output]),
        root=state.root or str(response["id"]),
        item_ids=tuple(str(i["id"]) for i in [*state.input_json, *output] if "id" in i),
    )
