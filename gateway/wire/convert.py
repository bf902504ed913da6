"""Turn a raw request body into a domain :class:`ClientRequest`, or raise a 400 naming the field."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import replace
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.output.plan import template_tools
from gateway.output.schemas import schema_text
from gateway.types import (
    Capability,
    ChatMessage,
    ClientRequest,
    EmbedParams,
    Endpoint,
    GenerationRequest,
    Passthrough,
    Requirement,
    ResponseFormat,
    SamplingParams,
    ToolCallRef,
    Tools,
    ToolSpec,
)
from gateway.wire.requests import (
    FORBIDDEN_FIELDS,
    AllowedToolsChoice,
    ChatCompletionRequest,
    CompletionRequest,
    CustomTool,
    EmbeddingsRequest,
    FunctionTool,
    Message,
    MessageCustomToolCall,
    NamedCustomChoice,
    NamedToolChoice,
    SamplingFields,
    TextPart,
    WireModel,
)
from gateway.wire.shared import (
    GENERATES,
    chat_tool_choice,
    choose_tools,
    custom_arguments,
    custom_tool,
    sampling_params,
)

log = logging.getLogger("gateway.wire")
W = TypeVar("W", bound=WireModel)


class LoggedOnce:
    """Names already logged, bounded: clients choose the names, so at most ``limit`` are kept
    (oldest forgotten first; a forgotten name is logged again), each cut to ``length``
    characters (a name is as long as the client likes)."""

    def __init__(self, limit: int = 1024, length: int = 64) -> None:
        self.limit = limit
        self.length = length
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first_time(self, name: str) -> bool:
        name = name[: self.length]
        if name in self._seen:
            return False
        self._seen[name] = None
        if len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)


#: Unknown request field names logged so far (process-wide, bounded).
ignored_fields = LoggedOnce()


def _field_names() -> frozenset[str]:
    """Every wire model's field names (walked once per error, not per location: an
    endpoint's models may be imported after the first error)."""
    names: set[str] = set()
    stack: list[type[BaseModel]] = [WireModel]
    while stack:
        cls = stack.pop()
        names.update(cls.model_fields)
        stack.extend(cls.__subclasses__())
    return frozenset(names)


#: Mapping fields: what follows them in an error's location is a client's key, not a field.
_MAPPINGS = frozenset({"logit_bias"})
#: The errors of one validation a 400 looks at: the first names the field, those after it
#: on the same field add their messages. A body of 150,000 bad elements has 150,000 errors:
#: what is read of them stays this many.
_ERRORS_READ = 20
#: A location's parts read (a deeper one is named by its first parts).
_LOC_PARTS = 32


def _param(loc: tuple[int | str, ...], names: frozenset[str] | None = None) -> str | None:
    """``("messages", 0, "TextPart", "text")`` -> ``"messages[0].text"`` (union tags dropped;
    ``names``: the wire models' field names, if the caller has them)."""
    fields = _field_names() if names is None else names
    out = ""
    for part in loc[:_LOC_PARTS]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in fields:
            out += f".{part}" if out else part
            if part in _MAPPINGS:
                break
    return out or None


def validation_error(err: ValidationError, where: str | None = None) -> InvalidRequest:
    """A 400 naming the first invalid field (union tags dropped), below ``where`` when the
    model validated one element of the body (``input[3]``). At most :data:`_ERRORS_READ` of
    its errors are looked at, however many the body made."""
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    errors = errors[:_ERRORS_READ]
    if errors[0]["type"] in ("json_invalid", "json_type"):
        return InvalidRequest(f"request body is not valid JSON: {errors[0]['msg']}")
    if errors[0]["type"] == "model_type" and not errors[0]["loc"]:
        return InvalidRequest("request body must be a JSON object")
    names = _field_names()
    first = _param(tuple(errors[0]["loc"]), names)
    msgs = [e["msg"] for e in errors if _param(tuple(e["loc"]), names) == first]
    param = f"{where}.{first}" if where and first else where or first
    named = param or "body"
    if errors[0]["type"] == "missing":
        return InvalidRequest(f"'{named}' is a required property", param=param)
    return InvalidRequest(f"invalid '{named}': " + "; or ".join(dict.fromkeys(msgs)), param=param)


def _check_extra(wire: WireModel) -> None:
    for name in wire.model_extra or {}:
        if name in FORBIDDEN_FIELDS:
            raise InvalidRequest(f"'{name}' may not be set by a request", param=name)
        if ignored_fields.first_time(name):
            log.info("ignoring unknown request field %r (logged once)", name[:64])


def parse_body(schema: type[W], body: bytes) -> W:
    """The body as ``schema`` (a 400 naming the field otherwise); unknown fields checked."""
    try:
        wire = schema.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err) from None
    _check_extra(wire)
    return wire


def _content(msg: Message, i: int) -> str:
    if msg.content is None:
        if msg.role == "assistant":
            return ""
        raise InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for j, part in enumerate(msg.content):
        if not isinstance(part, TextPart):
            raise UnsupportedParameter(
                f"content parts of type {part.type!r} are not supported by this server",
                param=f"messages[{i}].content[{j}]",
            )
        texts.append(part.text)
    return "".join(texts)


def _tool_calls(msg: Message, i: int) -> tuple[ToolCallRef, ...]:
    if msg.role != "assistant" and msg.tool_calls:
        raise InvalidRequest(
            "only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls"
        )
    return tuple(
        ToolCallRef(c.id, c.custom.name, custom_arguments(c.custom.input))
        if isinstance(c, MessageCustomToolCall)
        else ToolCallRef(c.id, c.function.name, c.function.arguments)
        for c in msg.tool_calls or ()
    )


def _message(msg: Message, i: int) -> ChatMessage:
    reasoning = msg.reasoning_content if msg.reasoning_content is not None else msg.reasoning
    return ChatMessage(
        role=msg.role,
        content=_content(msg, i),
        name=msg.name,
        tool_calls=_tool_calls(msg, i),
        tool_call_id=msg.tool_call_id if msg.role == "tool" else None,
        reasoning=reasoning if msg.role == "assistant" else None,
    )


def _messages(wire: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    return tuple(_message(m, i) for i, m in enumerate(wire.messages))


def _logit_bias(wire: SamplingFields) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in (wire.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or len(key) > 9:  # "²".isdigit()
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {key[:32]!r}", param="logit_bias"
            )
        out.append((int(key), bias))
    return tuple(out)


def _sampling(wire: SamplingFields) -> SamplingParams:
    return sampling_params(
        temperature=wire.temperature, top_p=wire.top_p, top_k=wire.top_k, min_p=wire.min_p,
        presence_penalty=wire.presence_penalty, frequency_penalty=wire.frequency_penalty,
        repetition_penalty=wire.repetition_penalty, seed=wire.seed, logit_bias=_logit_bias(wire),
    )  # fmt: skip


def _stop(wire: SamplingFields) -> tuple[str, ...]:
    if wire.stop is None:
        return ()
    return (wire.stop,) if isinstance(wire.stop, str) else tuple(dict.fromkeys(wire.stop))


def _fan_out(base: GenerationRequest, n: int, offset: int) -> list[GenerationRequest]:
    """``n`` choices of one prompt; each choice gets its own seed so the choices differ."""
    out = []
    for i in range(n):
        seed = base.sampling.seed
        sampling = base.sampling if seed is None else replace(base.sampling, seed=seed + i)
        idx = offset + i
        out.append(
            replace(base, request_id=f"{base.request_id}-{idx}", index=idx, sampling=sampling)
        )
    return out


def _check_chat_unsupported(wire: ChatCompletionRequest) -> None:
    if wire.functions:
        raise UnsupportedParameter("'functions' is not supported by this server", param="functions")
    if wire.top_logprobs is not None and not wire.logprobs:
        raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    if wire.tool_choice is not None and not wire.tools:
        raise InvalidRequest("'tool_choice' is set but 'tools' is not", param="tool_choice")


#: Chat fields that need a capability, and the fields passed through with them unchanged to a
#: backend that has it (a remote replica).
_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
_LOGPROB_FIELDS = ("logprobs", "top_logprobs")


def _shared_features(
    wire: SamplingFields, wants_logprobs: bool
) -> tuple[list[Requirement], list[str]]:
    """What both completion APIs may need: a JSON response format, logprobs."""
    requires: list[Requirement] = list(_GENERATES)
    fields: list[str] = []
    if wire.response_format is not None and wire.response_format.type != "text":
        requires.append(Requirement(Capability.JSON_SCHEMA, "response_format"))
        fields.append("response_format")
    if wants_logprobs:
        requires.append(Requirement(Capability.LOGPROBS, "logprobs"))
        fields += [f for f in _LOGPROB_FIELDS if getattr(wire, f, None) is not None]
    return requires, fields


def _passthrough(wire: SamplingFields, fields: list[str]) -> Passthrough:
    dump = wire.model_dump(mode="json", include=set(fields), exclude_none=True, by_alias=True)
    return tuple((k, json.dumps(dump[k], ensure_ascii=False)) for k in fields if k in dump)


def _chat_features(
    wire: ChatCompletionRequest, messages: tuple[ChatMessage, ...], tools: Tools | None
) -> tuple[tuple[Requirement, ...], Passthrough]:
    requires, fields = _shared_features(wire, bool(wire.logprobs))
    converted: Passthrough = ()
    if wire.tools:
        requires.append(Requirement(Capability.TOOLS, "tools"))
        if tools is not None and _only_functions(wire):
            fields += [f for f in _TOOL_FIELDS if getattr(wire, f) is not None]
        elif tools is not None:  # as functions: the calls come back as the backend reads them
            converted = _function_form(tools)
    for i, m in enumerate(messages):
        if m.tool_calls:  # rendering a call back to the model takes its tool-call format
            requires.append(Requirement(Capability.TOOLS, f"messages[{i}].tool_calls"))
            break
    return tuple(dict.fromkeys(requires)), _passthrough(wire, fields) + converted


def _only_functions(wire: ChatCompletionRequest) -> bool:
    """The tools and the tool choice are function tools only, as every OpenAI-compatible
    server reads them."""
    tools = wire.tools or ()
    choice = wire.tool_choice
    return not any(isinstance(t, CustomTool) for t in tools) and not isinstance(
        choice, (NamedCustomChoice, AllowedToolsChoice)
    )


def _function_form(tools: Tools) -> Passthrough:
    """Custom tools (and an ``allowed_tools`` choice) for a remote replica: the functions
    they are to the core (a custom tool's input the string ``input`` of its arguments)."""
    return (
        ("tools", template_tools(tools.specs)),
        ("tool_choice", json.dumps(chat_tool_choice(tools))),
        ("parallel_tool_calls", json.dumps(tools.parallel)),
    )


def _tool_spec(tool: FunctionTool | CustomTool, i: int) -> ToolSpec:
    if isinstance(tool, CustomTool):
        c = tool.custom
        fmt = c.format
        grammar = None
        if fmt is not None and fmt.type == "grammar":
            grammar = (
                (None, None)
                if fmt.grammar is None
                else (fmt.grammar.syntax, fmt.grammar.definition)
            )
        return custom_tool(c.name, c.description, grammar, f"tools[{i}].custom.format")
    fn = tool.function
    param = f"tools[{i}].function.parameters"
    parameters = schema_text(fn.parameters or _NO_PARAMETERS, param)
    return ToolSpec(fn.name, fn.description or "", parameters, bool(fn.strict))


def _choice_name(
    specs: list[ToolSpec], choice: NamedToolChoice | NamedCustomChoice, param: str
) -> str:
    """The tool a named choice names, which must be of its kind (a 400 naming ``param``)."""
    custom = isinstance(choice, NamedCustomChoice)
    name = choice.custom.name if isinstance(choice, NamedCustomChoice) else choice.function.name
    for spec in specs:
        if spec.name == name and (spec.freeform is not None) != custom:
            kind, other = ("custom", "function") if custom else ("function", "custom")
            raise InvalidRequest(
                f"{param} names the {other} tool {name[:64]!r} as a {kind} tool", param=param
            )
    return name


def _tools(wire: ChatCompletionRequest) -> Tools | None:
    if not wire.tools:
        return None
    specs = [_tool_spec(tool, i) for i, tool in enumerate(wire.tools)]
    choice = wire.tool_choice
    parallel = wire.parallel_tool_calls is not False
    match choice:
        case NamedToolChoice() | NamedCustomChoice():
            name = _choice_name(specs, choice, "tool_choice")
            return choose_tools(specs, "named", name, parallel=parallel)
        case AllowedToolsChoice(allowed_tools=allowed):
            choose_tools(specs, "auto")  # the names are unique
            picked = set()
            for j, entry in enumerate(allowed.tools):
                param = f"tool_choice.allowed_tools.tools[{j}]"
                name = _choice_name(specs, entry, param)
                choose_tools(specs, "named", name, choice_param=param)  # it is there
                picked.add(name)
            offered = [s for s in specs if s.name in picked]
            return choose_tools(offered, allowed.mode, parallel=parallel)
        case None:
            return choose_tools(specs, "auto", parallel=parallel)
        case _:
            return choose_tools(specs, choice, parallel=parallel)


_NO_PARAMETERS: dict[str, object] = {"type": "object", "properties": {}}


def _response_format(wire: SamplingFields) -> ResponseFormat | None:
    fmt = wire.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat()
    spec = fmt.json_schema
    if spec is None or spec.schema_ is None:
        raise InvalidRequest(
            "response_format json_schema needs 'json_schema.schema'",
            param="response_format.json_schema",
        )
    schema = schema_text(spec.schema_, "response_format.json_schema.schema")
    return ResponseFormat(schema, spec.name, bool(spec.strict))


def _include_usage(wire: SamplingFields) -> bool:
    if wire.stream_options is not None and not wire.stream:
        raise InvalidRequest(
            "stream_options may only be set when stream is true", param="stream_options"
        )
    return wire.stream_options is not None and wire.stream_options.include_usage


def chat_request(body: bytes, request_id: str) -> ClientRequest:
    wire = parse_body(ChatCompletionRequest, body)
    _check_chat_unsupported(wire)
    both = wire.max_tokens is not None and wire.max_completion_tokens is not None
    if both and wire.max_tokens != wire.max_completion_tokens:
        raise InvalidRequest(
            "set max_tokens or max_completion_tokens, not both", param="max_tokens"
        )
    messages = _messages(wire)
    tools = _tools(wire)
    requires, passthrough = _chat_features(wire, messages, tools)
    base = GenerationRequest(
        request_id=request_id,
        messages=messages,
        sampling=_sampling(wire),
        max_tokens=wire.max_completion_tokens or wire.max_tokens,
        stop=_stop(wire),
        passthrough=passthrough,
        tools=tools,
        response_format=_response_format(wire),
        logprobs=(wire.top_logprobs or 0) if wire.logprobs else None,
        reasoning_effort=wire.reasoning_effort,
        cache_salt=wire.cache_salt,
        progress=wire.return_progress and wire.stream,
    )
    request = _client_request("chat", wire, _fan_out(base, wire.n, 0))
    return replace(request, requires=requires)


def _prompts(wire: CompletionRequest) -> list[str]:
    if isinstance(wire.prompt, str):
        return [wire.prompt]
    if not wire.prompt:  # [] passes the schema as an empty token array
        raise InvalidRequest("'prompt' must not be an empty list", param="prompt")
    if all(isinstance(p, str) for p in wire.prompt):
        return [p for p in wire.prompt if isinstance(p, str)]
    raise UnsupportedParameter("token-array prompts are not supported yet", param="prompt")


def _check_completion_unsupported(wire: CompletionRequest) -> None:
    if wire.suffix:
        raise UnsupportedParameter("'suffix' is not supported by this server", param="suffix")
    if wire.best_of is not None and wire.best_of != wire.n:
        raise UnsupportedParameter("'best_of' other than n is not supported", param="best_of")


def completion_request(body: bytes, request_id: str) -> ClientRequest:
    wire = parse_body(CompletionRequest, body)
    _check_completion_unsupported(wire)
    prompts = _prompts(wire)
    if len(prompts) * wire.n > 128:
        raise InvalidRequest("at most 128 choices per request (prompts x n)", param="n")
    requires, fields = _shared_features(wire, wire.logprobs is not None)
    generations: list[GenerationRequest] = []
    for p, prompt in enumerate(prompts):
        base = GenerationRequest(
            request_id=request_id,
            prompt=prompt,
            sampling=_sampling(wire),
            max_tokens=wire.max_tokens or 16,
            stop=_stop(wire),
            response_format=_response_format(wire),
            logprobs=wire.logprobs,
            passthrough=_passthrough(wire, fields),
            cache_salt=wire.cache_salt,
            progress=wire.return_progress and wire.stream,
        )
        generations.extend(_fan_out(base, wire.n, p * wire.n))
    request = _client_request("completion", wire, generations, echo=wire.echo)
    return replace(request, requires=tuple(requires))


_GENERATES = (GENERATES,)


def _client_request(
    endpoint: Endpoint,
    wire: SamplingFields,
    generations: list[GenerationRequest],
    echo: bool = False,
) -> ClientRequest:
    return ClientRequest(
        endpoint=endpoint,
        model=wire.model,
        generations=tuple(generations),
        stream=wire.stream,
        include_usage=_include_usage(wire),
        echo=echo,
        requires=_GENERATES,
        choices_per_prompt=wire.n,
    )


def _embedding_inputs(wire: EmbeddingsRequest) -> list[str | tuple[int, ...]]:
    value = wire.input
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)]
    if all(isinstance(v, int) for v in value):
        return [tuple(v for v in value if isinstance(v, int))]
    return [tuple(v) for v in value if isinstance(v, list)]


def embeddings_request(body: bytes, request_id: str) -> ClientRequest:
    wire = parse_body(EmbeddingsRequest, body)
    embed = EmbedParams(dimensions=wire.dimensions)
    generations = []
    for i, item in enumerate(_embedding_inputs(wire)):
        text, tokens = (item, None) if isinstance(item, str) else (None, item)
        generations.append(
            GenerationRequest(
                request_id=f"{request_id}-{i}",
                prompt=text,
                prompt_tokens=tokens,
                index=i,
                embed=embed,
            )
        )
    return ClientRequest(
        endpoint="embeddings",
        model=wire.model,
        generations=tuple(generations),
        requires=(Requirement(Capability.EMBEDDINGS, "model"),),
        take_turns=True,
        encoding_format=wire.encoding_format,
    )
