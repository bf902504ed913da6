"""Tool calling per model family on tiny generated GGUFs: Hermes, Llama 3.1 and both Mistral
templates (written in :mod:`tests.backends.llamacpp.families`), each with its markers as the
control tokens of its vocabulary.

Rendering is checked byte for byte: a conversation with tools, two earlier calls and their
results must reach the engine as exactly the prompt its template defines, markers as single
control tokens. Parsing is checked on what the engine writes: the tiny models know nothing of
tools, so forced calls are made by the grammar (in the family's own markup) and ``auto``
calls by a ``logit_bias`` on the family's start marker; each call must come back parsed,
validated against its schema, and the same streamed as not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from openai import OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from backends.llamacpp import LlamaCppBackend
from gateway.testing import ServerThread
from gateway.types import GenerationRequest, TokenizedPrompt
from tests.backends.llamacpp.conftest import backend_of, client_for, model_table, serve
from tests.backends.llamacpp.families import FAMILIES, Family
from tests.backends.llamacpp.tiny_gguf import write_tiny_gguf

MODEL = "fam"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
ASK: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]


class Spy:
    """The prompt tokens of the last request the model rendered."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        model = backend._model
        assert model is not None
        self.tokenizer = model.tokenizer
        self._tokenize = model.prompt_builder.tokenize
        self.last: list[int] = []
        model.prompt_builder.tokenize = self._record  # type: ignore[method-assign]

    def _record(self, request: GenerationRequest) -> TokenizedPrompt:
        prompt = self._tokenize(request)
        self.last = list(prompt.tokens)
        return prompt

    def text(self) -> str:
        return b"".join(self.tokenizer.bytes_of(t) for t in self.last).decode()


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request: pytest.FixtureRequest) -> Family:
    fam: Family = request.param
    return fam


@pytest.fixture(scope="module")
def family_server(
    family: Family, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, Spy]]:
    path = write_tiny_gguf(
        tmp_path_factory.mktemp("gguf") / f"{family.name}.gguf", vocab=family.vocab
    )
    table = model_table(Path(path), kv_cache={"n_ctx_per_slot": 3072})  # a byte-level BPE
    with serve({MODEL: table}) as server:
        yield server, Spy(backend_of(server, MODEL))


@pytest.fixture
def client(family_server: tuple[ServerThread, Spy]) -> Iterator[OpenAI]:
    with client_for(family_server[0]) as c:
        yield c


def _tool_json(index: int, indent: int | None = None) -> str:
    """A tool as Hugging Face templates receive it (``{"type", "function"}``)."""
    fn = TOOLS[index]["function"]
    function = {"name": fn["name"], "parameters": fn["parameters"]}
    if "description" in fn:
        function["description"] = fn["description"]
    return json.dumps({"type": "function", "function": function}, indent=indent)


CALLS = [("call_a1", '{"city": "Paris", "days": 2}'), ("call_b2", '{"city": "Rome", "days": 1}')]
CONVERSATION: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": a}}
            for i, a in CALLS
        ],
    },
    {"role": "tool", "tool_call_id": "call_a1", "content": "Sunny"},
    {"role": "tool", "tool_call_id": "call_b2", "content": [{"type": "text", "text": "Rain"}]},
    {"role": "user", "content": "Thanks. And Oslo?"},
]
PARIS, ROME = (a for _, a in CALLS)


def _expected_prompt(name: str) -> str:
    tools = "\n".join(_tool_json(i) for i in range(len(TOOLS)))
    if name == "hermes":
        return (
            "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call functions. Their "
            f"signatures are within <tools></tools>:\n<tools>\n{tools}\n</tools>\n\n"
            "For each call, return a JSON object within <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call><|im_end|>\n"
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
            "<|im_start|>assistant\n"
            f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
            f'<tool_call>\n{{"name": "get_weather", "arguments": {ROME}}}\n</tool_call>'
            "<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\nSunny\n</tool_response>\n"
            "<tool_response>\nRain\n</tool_response><|im_end|>\n"
            "<|im_start|>user\nThanks. And Oslo?<|im_end|>\n<|im_start|>assistant\n"
        )
    if name == "llama3":
        indented = "".join(_tool_json(i, indent=4) + "\n\n" for i in range(len(TOOLS)))
        return (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Environment: ipython\nCutting Knowledge Date: December 2023\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, "
            "respond with a JSON for a function call.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}.'
            f"\n\n{indented}Weather in Paris and Rome?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>"
            f'{{"name": "get_weather", "parameters": {PARIS}}}; '
            f'{{"name": "get_weather", "parameters": {ROME}}}<|eom_id|>'
            "<|start_header_id|>ipython<|end_header_id|>\n\nSunny<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\nRain<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nThanks. And Oslo?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    listed = "[" + ", ".join(_tool_json(i) for i in range(len(TOOLS))) + "]"
    tail = f"[AVAILABLE_TOOLS]{listed}[/AVAILABLE_TOOLS][INST]Be brief.\n\nThanks. And Oslo?[/INST]"
    if name == "mistral":
        return (
            "<s>[INST]Weather in Paris and Rome?[/INST][TOOL_CALLS]["
            f'{{"name": "get_weather", "arguments": {PARIS}, "id": "call_a1"}}, '
            f'{{"name": "get_weather", "arguments": {ROME}, "id": "call_b2"}}]</s>'
            '[TOOL_RESULTS]{"content": "Sunny", "call_id": "call_a1"}[/TOOL_RESULTS]'
            '[TOOL_RESULTS]{"content": "Rain", "call_id": "call_b2"}[/TOOL_RESULTS]' + tail
        )
    assert name == "mistral_args"
    return (
        "<s>[INST]Weather in Paris and Rome?[/INST]"
        f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_weather[ARGS]{ROME}</s>"
        "[TOOL_RESULTS]Sunny[/TOOL_RESULTS][TOOL_RESULTS]Rain[/TOOL_RESULTS]" + tail
    )


def test_the_family_format_is_detected(
    family: Family, family_server: tuple[ServerThread, Spy]
) -> None:
    fmt = backend_of(family_server[0], MODEL).chat_format
    assert fmt is not None and fmt.tools.name == family.tool_format
    assert set(fmt.special) == set(family.special_markers)  # markers are control tokens


def test_a_conversation_with_calls_renders_byte_for_byte(
    family: Family, family_server: tuple[ServerThread, Spy], client: OpenAI
) -> None:
    spy = family_server[1]
    r = client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, tools=TOOLS, max_tokens=1, temperature=0
    )
    expected = _expected_prompt(family.name)
    assert spy.text() == expected
    assert r.usage is not None and r.usage.prompt_tokens == len(spy.last)
    fmt = backend_of(family_server[0], MODEL).chat_format
    assert fmt is not None
    for marker, token in fmt.special.items():  # each marker is its one token, never text
        assert spy.last.count(token) == expected.count(marker)


def _check_calls(choice: Any, max_calls: int, name: str | None = None) -> list[Any]:
    calls = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls", choice
    assert 1 <= len(calls) <= max_calls
    assert not choice.message.content  # no markup, no stray text
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert name is None or call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return list(calls)


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_forced_calls_parse_and_validate(client: OpenAI, temperature: float) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=2, seed=5,
        temperature=temperature, max_tokens=1000,
    )  # fmt: skip
    ids = [c.id for choice in r.choices for c in _check_calls(choice, 8)]
    assert len(set(ids)) == len(ids)
    named = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, parallel_tool_calls=False, seed=6,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=temperature, max_tokens=120,
    )  # fmt: skip
    _check_calls(named.choices[0], 1, "add")


def _streamed(client: OpenAI, **kw: Any) -> tuple[Any, str]:
    """The stream reassembled by the SDK's own state machine, and its content deltas."""
    state = ChatCompletionStreamState()
    contents = []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        state.handle_chunk(chunk)
        contents += [c.delta.content or "" for c in chunk.choices]
    return state.get_final_completion(), "".join(contents)


def test_streamed_calls_equal_the_whole_answer(client: OpenAI) -> None:
    """Greedy: over hundreds of sampled tokens, a seeded draw can flip between a fresh prefill
    and a prefix-cached one (llama.cpp's sums differ in the last bits)."""
    kw: dict[str, Any] = dict(
        messages=ASK, tools=TOOLS, tool_choice="required", seed=11, temperature=0,
        max_tokens=1000,
    )  # fmt: skip
    whole = client.chat.completions.create(model=MODEL, **kw)
    streamed, contents = _streamed(client, **kw)
    assert contents == ""
    want = [(c.function.name, c.function.arguments) for c in _check_calls(whole.choices[0], 8)]
    got = [(c.function.name, c.function.arguments) for c in _check_calls(streamed.choices[0], 8)]
    assert got == want


def _start_token(family_server: tuple[ServerThread, Spy]) -> int:
    fmt = backend_of(family_server[0], MODEL).chat_format
    assert fmt is not None
    return fmt.special[fmt.tools.start]


def test_auto_parses_a_call_the_model_starts(
    family_server: tuple[ServerThread, Spy], client: OpenAI
) -> None:
    """The model writes the start marker (pushed by a logit_bias); the grammar then makes the
    call it started valid, and the gateway parses it out of the text."""
    bias = {str(_start_token(family_server)): 100}
    for stream in (False, True):
        kw: dict[str, Any] = dict(
            messages=ASK, tools=TOOLS, logit_bias=bias, parallel_tool_calls=False, seed=2,
            temperature=0.8, max_tokens=120,
        )  # fmt: skip
        if stream:
            r, contents = _streamed(client, **kw)
            assert contents == ""
        else:
            r = client.chat.completions.create(model=MODEL, **kw)
        _check_calls(r.choices[0], 1)


def test_auto_without_a_call_is_plain_content(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=12, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content


def test_parsed_calls_render_back_as_the_template_writes_them(
    family: Family, family_server: tuple[ServerThread, Spy], client: OpenAI
) -> None:
    """A round trip: the calls the gateway parsed, sent back as the assistant's turn, render
    as the template writes calls (the JSON the model wrote, in the family's markup)."""
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=4,
        parallel_tool_calls=False, temperature=0.7, max_tokens=120,
    )  # fmt: skip
    call = _check_calls(first.choices[0], 1)[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "done"},
    ]
    client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=1)
    args = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    name = call.function.name
    written = {
        "hermes": f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>',
        "llama3": f'<|python_tag|>{{"name": "{name}", "parameters": {args}}}<|eom_id|>',
        "mistral": f'[TOOL_CALLS][{{"name": "{name}", "arguments": {args}, "id": "{call.id}"}}]',
        "mistral_args": f"[TOOL_CALLS]{name}[ARGS]{args}</s>",
    }[family.name]
    assert written in family_server[1].text()
