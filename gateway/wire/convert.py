"""Turn a raw request body into a domain :class:`ClientRequest`, or raise a 400 naming the field."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cache

from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.types import ChatMessage, ClientRequest, Endpoint, GenerationRequest, SamplingParams
from gateway.wire.requests import (
    FORBIDDEN_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    SamplingFields,
    TextPart,
    WireModel,
)

log = logging.getLogger("gateway.wire")
_ignored_logged: set[str] = set()


@cache
def _field_names() -> frozenset[str]:
    names: set[str] = set()
    stack: list[type[BaseModel]] = [WireModel]
    while stack:
        cls = stack.pop()
        names.update(cls.model_fields)
        stack.extend(cls.__subclasses__())
    return frozenset(names)


#: Mapping fields: what follows them in an error's location is a client's key, not a field.
_MAPPINGS = frozenset({"logit_bias"})


def _param(loc: tuple[int | str, ...]) -> str | None:
    """``("messages", 0, "TextPart", "text")`` -> ``"messages[0].text"`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _field_names():
            out += f".{part}" if out else part
            if part in _MAPPINGS:
                break
    return out or None


def _validation_error(err: ValidationError) -> InvalidRequest:
    errors = err.errors()
    if errors[0]["type"] in ("json_invalid", "json_type"):
        return InvalidRequest(f"request body is not valid JSON: {errors[0]['msg']}")
    if errors[0]["type"] == "model_type" and not errors[0]["loc"]:
        return InvalidRequest("request body must be a JSON object")
    param = _param(tuple(errors[0]["loc"]))
    msgs = [e["msg"] for e in errors if _param(tuple(e["loc"])) == param]
    where = param or "body"
    if errors[0]["type"] == "missing":
        return InvalidRequest(f"'{where}' is a required property", param=param)
    return InvalidRequest(f"invalid '{where}': " + "; or ".join(dict.fromkeys(msgs)), param=param)


def _check_extra(wire: WireModel) -> None:
    for name in wire.model_extra or {}:
        if name in FORBIDDEN_FIELDS:
            raise InvalidRequest(f"'{name}' may not be set by a request", param=name)
        if name not in _ignored_logged:
            _ignored_logged.add(name)
            log.info("ignoring unknown request field %r (logged once)", name)


def _content(msg: Message, i: int) -> str:
    if msg.content is None:
        if msg.role == "assistant":
            if msg.tool_calls:
                raise UnsupportedParameter(
                    "assistant tool_calls are not supported by this server",
                    param=f"messages[{i}].tool_calls",
                )
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


def _messages(wire: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    return tuple(
        ChatMessage(role=m.role, content=_content(m, i), name=m.name)
        for i, m in enumerate(wire.messages)
    )


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
    top_k = wire.top_k if wire.top_k is not None and wire.top_k > 0 else 0
    return SamplingParams(
        temperature=1.0 if wire.temperature is None else wire.temperature,
        top_p=1.0 if wire.top_p is None else wire.top_p,
        top_k=top_k,
        min_p=wire.min_p or 0.0,
        presence_penalty=wire.presence_penalty or 0.0,
        frequency_penalty=wire.frequency_penalty or 0.0,
        repetition_penalty=wire.repetition_penalty or 1.0,
        seed=wire.seed,
        logit_bias=_logit_bias(wire),
    )


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
    if wire.tools:
        raise UnsupportedParameter("'tools' is not supported by this server yet", param="tools")
    if wire.functions:
        raise UnsupportedParameter("'functions' is not supported by this server", param="functions")
    if wire.tool_choice not in (None, "none", "auto"):
        raise UnsupportedParameter("'tool_choice' is not supported", param="tool_choice")
    if wire.logprobs or wire.top_logprobs:
        param = "logprobs" if wire.logprobs else "top_logprobs"
        raise UnsupportedParameter(f"'{param}' is not supported by this server yet", param=param)
    if wire.response_format is not None and wire.response_format.type != "text":
        raise UnsupportedParameter(
            f"response_format {wire.response_format.type!r} is not supported by this server yet",
            param="response_format",
        )


def _include_usage(wire: SamplingFields) -> bool:
    if wire.stream_options is not None and not wire.stream:
        raise InvalidRequest(
            "stream_options may only be set when stream is true", param="stream_options"
        )
    return wire.stream_options is not None and wire.stream_options.include_usage


def chat_request(body: bytes, request_id: str) -> ClientRequest:
    try:
        wire = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        raise _validation_error(err) from None
    _check_extra(wire)
    _check_chat_unsupported(wire)
    both = wire.max_tokens is not None and wire.max_completion_tokens is not None
    if both and wire.max_tokens != wire.max_completion_tokens:
        raise InvalidRequest(
            "set max_tokens or max_completion_tokens, not both", param="max_tokens"
        )
    base = GenerationRequest(
        request_id=request_id,
        messages=_messages(wire),
        sampling=_sampling(wire),
        max_tokens=wire.max_completion_tokens or wire.max_tokens,
        stop=_stop(wire),
    )
    return _client_request("chat", wire, _fan_out(base, wire.n, 0))


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
    if wire.logprobs is not None:
        raise UnsupportedParameter(
            "'logprobs' is not supported by this server yet", param="logprobs"
        )
    if wire.best_of is not None and wire.best_of != wire.n:
        raise UnsupportedParameter("'best_of' other than n is not supported", param="best_of")


def completion_request(body: bytes, request_id: str) -> ClientRequest:
    try:
        wire = CompletionRequest.model_validate_json(body)
    except ValidationError as err:
        raise _validation_error(err) from None
    _check_extra(wire)
    _check_completion_unsupported(wire)
    prompts = _prompts(wire)
    if len(prompts) * wire.n > 128:
        raise InvalidRequest("at most 128 choices per request (prompts x n)", param="n")
    generations: list[GenerationRequest] = []
    for p, prompt in enumerate(prompts):
        base = GenerationRequest(
            request_id=request_id,
            prompt=prompt,
            sampling=_sampling(wire),
            max_tokens=wire.max_tokens or 16,
            stop=_stop(wire),
        )
        generations.extend(_fan_out(base, wire.n, p * wire.n))
    return _client_request("completion", wire, generations, echo=wire.echo)


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
    )
