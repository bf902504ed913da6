"""A ``POST /v1/responses`` body into a :class:`ClientRequest` (one generation) and the
:class:`ResponsesState` its response object is built from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gateway.endpoints.responses.items import (
    MAX_ITEMS,
    item_json,
    parse_item,
    parse_items,
    to_messages,
)
from gateway.endpoints.responses.tools import ToolOrigin, tool_set, tools_for
from gateway.endpoints.responses.wire import (
    REFERENCE,
    TOOLS,
    Item,
    ResponsesRequest,
    TextFormat,
)
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.output.schemas import schema_text
from gateway.types import (
    ChatMessage,
    ClientRequest,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
)
from gateway.wire.convert import parse_body
from gateway.wire.shared import features, sampling_params

#: The ``include`` value that asks for each output token's logprobs.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: Body fields the Responses API has that change what is generated, and this server lacks.
_UNSUPPORTED = ("conversation", "prompt")


@dataclass(frozen=True)
class ResponsesState:
    """What the response object needs of its request, and what the store keeps."""

    #: The request fields a response object echoes (``instructions``, ``tools``, ``text``...).
    echo: dict[str, object]
    #: This request's input items, as given, and as stored (with their ids).
    items: tuple[Item, ...]
    input_json: tuple[dict[str, object], ...] = ()
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    #: The stored conversation before this request, as stored (set once it is looked up).
    history: tuple[dict[str, object], ...] = ()
    origins: dict[str, ToolOrigin] = field(default_factory=dict)
    logprobs: bool = False
    #: Who made the request (the API key's name), whose the stored response is.
    owner: str | None = None
    #: The first response of the ``previous_response_id`` chain (None: this one).
    root: str | None = None
    #: The ``input`` as given while it holds ``item_reference`` entries (the items are
    #: parsed once the references are looked up); their places in it.
    pending_input: tuple[dict[str, object], ...] = ()
    references: tuple[int, ...] = ()


def state_of(request: ClientRequest) -> ResponsesState:
    state = request.endpoint_state
    assert isinstance(state, ResponsesState), "a responses request carries its state"
    return state


def _response_format(fmt: TextFormat | None) -> ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(param="text.format")
    if fmt.schema_ is None:
        raise InvalidRequest("text.format json_schema needs 'schema'", param="text.format.schema")
    schema = schema_text(fmt.schema_, "text.format.schema")
    return ResponseFormat(schema, fmt.name, fmt.strict is not False, "text.format.schema")


def _sampling(wire: ResponsesRequest) -> SamplingParams:
    return sampling_params(
        temperature=wire.temperature, top_p=wire.top_p, top_k=wire.top_k, min_p=wire.min_p,
        repetition_penalty=wire.repetition_penalty, seed=wire.seed,
    )  # fmt: skip


def _check(wire: ResponsesRequest) -> None:
    for name in _UNSUPPORTED:
        if name in (wire.model_extra or {}):
            raise UnsupportedParameter(f"'{name}' is not supported by this server", param=name)
    if wire.background and not wire.store:
        raise InvalidRequest("background responses must be stored: set store", param="background")


def _echo(wire: ResponsesRequest) -> dict[str, object]:
    fmt = wire.text.format if wire.text is not None and wire.text.format is not None else None
    text: dict[str, object] = {
        "format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True)
        if fmt is not None
        else {"type": "text"}
    }
    if wire.text is not None and wire.text.verbosity is not None:
        text["verbosity"] = wire.text.verbosity
    reasoning = wire.reasoning
    return {
        "instructions": wire.instructions,
        "max_output_tokens": wire.max_output_tokens,
        "max_tool_calls": wire.max_tool_calls,
        "metadata": wire.metadata or {},
        "parallel_tool_calls": wire.parallel_tool_calls is not False,
        "previous_response_id": wire.previous_response_id,
        "prompt_cache_key": wire.prompt_cache_key,
        "reasoning": {
            "effort": reasoning.effort if reasoning else None,
            "summary": (reasoning.summary or reasoning.generate_summary) if reasoning else None,
        },
        "service_tier": "default",
        "store": wire.store,
        "temperature": 1.0 if wire.temperature is None else wire.temperature,
        "text": text,
        "tool_choice": wire.tool_choice if wire.tool_choice is not None else "auto",
        "tools": [t for t in wire.tools or () if t.get("type") in TOOLS],  # hosted ones: not
        "top_logprobs": wire.top_logprobs or 0,
        "top_p": 1.0 if wire.top_p is None else wire.top_p,
        "truncation": wire.truncation or "disabled",
        "user": wire.user,
        "background": wire.background,
    }


def _references(raw: str | list[dict[str, object]]) -> tuple[int, ...]:
    """The places of ``item_reference`` entries in ``input`` (each with a string ``id``)."""
    if isinstance(raw, str):
        return ()
    places = tuple(i for i, e in enumerate(raw) if e.get("type") == REFERENCE)
    for i in places:
        if not isinstance(raw[i].get("id"), str):
            raise InvalidRequest(f"'input[{i}].id' is a required property", param=f"input[{i}].id")
    return places


def _input_items(
    raw: str | list[dict[str, object]], references: tuple[int, ...]
) -> tuple[list[Item], tuple[dict[str, object], ...]]:
    """``input``'s items, or, while it holds references, nothing yet and ``input`` kept as
    given (its other entries checked now: a bad one is a 400 before any lookup)."""
    if not references or isinstance(raw, str):
        return parse_items(raw), ()
    if len(raw) > MAX_ITEMS:  # before any reference is looked up
        raise InvalidRequest(f"'input' has more than {MAX_ITEMS} items", param="input")
    for i, entry in enumerate(raw):
        if i not in references:
            parse_item(entry, f"input[{i}]")
    return [], tuple(raw)


def responses_request(body: bytes, request_id: str) -> ClientRequest:
    wire = parse_body(ResponsesRequest, body)
    _check(wire)
    references = _references(wire.input)
    items, pending = _input_items(wire.input, references)
    tools = tool_set(wire.tools)
    chosen = tools_for(tools, wire.tool_choice, wire.parallel_tool_calls)
    if chosen is not None and wire.max_tool_calls is not None:
        chosen = replace(chosen, limit=wire.max_tool_calls)
    fmt = _response_format(wire.text.format if wire.text is not None else None)
    logprobs = LOGPROBS_INCLUDE in (wire.include or ())
    requires, passthrough = features(
        chosen,
        fmt,
        format_param="text.format",
        logprobs_param="include" if logprobs else None,
    )
    state = ResponsesState(
        echo=_echo(wire),
        items=tuple(items),
        input_json=tuple(item_json(i) for i in items),
        instructions=wire.instructions,
        previous_response_id=wire.previous_response_id,
        store=wire.store,
        origins=tools.origins,
        logprobs=logprobs,
        pending_input=pending,
        references=references,
    )
    # with a previous response or references, the messages are built once they are looked up
    later = wire.previous_response_id or references
    messages = () if later else to_messages((), items, wire.instructions)
    effort = wire.reasoning.effort if wire.reasoning is not None else None
    generation = GenerationRequest(
        request_id=f"{request_id}-0",
        messages=messages,
        sampling=_sampling(wire),
        max_tokens=wire.max_output_tokens,
        passthrough=passthrough,
        tools=chosen,
        response_format=fmt,
        logprobs=(wire.top_logprobs or 0) if logprobs else None,
        reasoning_effort="high" if effort == "xhigh" else effort,
        affinity=wire.prompt_cache_key or request_id,  # a new chain starts here
        cache_salt=wire.cache_salt,
        progress=wire.return_progress and wire.stream,
    )
    headers = (("x-gateway-ignored-tools", ",".join(tools.ignored)),) if tools.ignored else ()
    return ClientRequest(
        endpoint="responses",
        model=wire.model,
        generations=(generation,),
        stream=wire.stream,
        requires=requires,
        endpoint_state=state,
        headers=headers,
        background=wire.background,
        truncate=wire.truncation == "auto",
        continues=wire.previous_response_id,
    )


def with_referenced(request: ClientRequest, found: dict[int, dict[str, object]]) -> ClientRequest:
    """The request with its ``item_reference`` entries replaced by the stored items they name
    (``found``, by place in ``input``); its messages built unless a stored conversation is
    still to come before them."""
    state = state_of(request)
    raw = [found.get(i, entry) for i, entry in enumerate(state.pending_input)]
    items = tuple(parse_items(raw))
    state = replace(
        state, items=items, input_json=tuple(item_json(i) for i in items), pending_input=(),
        references=(),
    )  # fmt: skip
    if state.previous_response_id:
        return replace(request, endpoint_state=state)
    messages = to_messages((), items, state.instructions)
    generations = tuple(replace(g, messages=messages) for g in request.generations)
    return replace(request, generations=generations, endpoint_state=state)


def with_history(
    request: ClientRequest, history: list[dict[str, object]], root: str
) -> ClientRequest:
    """The request with its stored conversation (whose chain began at ``root``) before its
    own items; a fleet keeps the chain on one replica unless ``prompt_cache_key`` says else."""
    state = replace(state_of(request), history=tuple(history), root=root)
    stored = parse_items(history, "previous_response_id")
    messages: tuple[ChatMessage, ...] = to_messages(stored, state.items, state.instructions)
    cache_key = state.echo.get("prompt_cache_key")
    affinity = cache_key if isinstance(cache_key, str) else root
    generations = tuple(
        replace(g, messages=messages, affinity=affinity) for g in request.generations
    )
    return replace(request, generations=generations, endpoint_state=state)
