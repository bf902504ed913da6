"""Budget steering (:mod:`gateway.output.finish`) over a byte-level vocabulary, where every
character costs a token and a budget is tight.

- From every prefix of a valid document, the shortest finish makes a valid document, and the
  narrowed grammar (nothing to spare) takes the prefix's open scalar and that finish: the two
  walks agree.
- An adversarial model (it prefers any token that does not close a string, an array or an
  object) always ends a json_schema answer, a json_object answer and a forced call with
  ``stop`` within its budget, valid against the schema; without steering it runs out.
- A budget wide enough is never narrowed; one too small for the shortest answer is left alone.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import llguidance
import pytest

from backends._grammar import unpack
from gateway.output.finish.closing import narrowed, shortest
from gateway.output.finish.schemas import Doc, Narrow, dumps, lit
from gateway.output.finish.steering import BASE_RULES, Budget
from gateway.output.finish.tracker import Tracker
from gateway.output.formats import FORMATS, ChatFormat, Reasoning
from gateway.output.matchers import Grammars
from gateway.output.plan import plan_output
from gateway.output.schemas import closed
from gateway.types import ChatMessage, GenerationRequest, ResponseFormat, Tools, ToolSpec

pytestmark = pytest.mark.timeout(60)

EOS = 256


class _Bytes:
    """One token per byte, plus EOS."""

    eos_token_id = EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, text: Any) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))
GRAMMARS = Grammars(lambda: TOKENIZER)
GENERIC = ChatFormat(FORMATS["generic"])

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
        "nickname": {"type": "string"},
        "email": {"type": "string"},
    },
    "required": ["name", "age", "role", "tags", "address", "email"],
}
PET: dict[str, Any] = {  # a tagged union behind $refs, as pydantic writes one
    "$defs": {
        "Cat": {
            "type": "object",
            "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
            "required": ["kind", "lives"],
        },
        "Dog": {
            "type": "object",
            "properties": {
                "kind": {"const": "dog"},
                "tricks": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            },
            "required": ["kind", "tricks"],
        },
    },
    "type": "object",
    "properties": {
        "pets": {
            "type": "array",
            "items": {"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
        },
        "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["pets", "owner", "score", "ok", "when"],
}
PERSON_DOC = {
    "name": 'Ann "the" Smith\\é',
    "age": -42,
    "role": "guest",
    "tags": ["a", "bc"],
    "address": {"street": "Main St 1", "city": "Zürich"},
    "nickname": "annie",
    "email": "ann@example.com",
}
PET_DOC = {
    "pets": [{"kind": "dog", "tricks": ["sit", "roll"]}, {"kind": "cat", "lives": 9}],
    "owner": None,
    "score": 12.5e3,
    "ok": True,
    "when": "2024-02-29",
}
OBJECT_DOC = {"a": [1, {"b": None}], "c": "d", "e": False, "f": {}}


def house(doc: object) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(", ", ": "))


@pytest.mark.parametrize(
    ("schema", "doc"),
    [(PERSON, PERSON_DOC), (PET, PET_DOC), ({"type": "object"}, OBJECT_DOC)],
    ids=["person", "union", "object"],
)
def test_every_prefix_finishes_and_the_two_walks_agree(schema: dict[str, Any], doc: Any) -> None:
    root = closed(schema)
    data = house(doc).encode()
    for cut in range(len(data) + 1):
        tracker = Tracker(Doc(root), root)
        assert tracker.feed(data[:cut]) == cut
        assert tracker.lost is None, (cut, tracker.lost)
        finish = shortest(tracker).body
        whole = data[:cut].decode(errors="ignore") + finish
        if data[:cut].decode(errors="ignore") != data[:cut].decode(errors="replace"):
            continue  # a character cut in two: the text is not a str yet
        jsonschema.validate(json.loads(whole), schema)
        s = tracker.scalar
        if s is not None and any("format" in o for o in s.schemas):
            continue  # a formatted string's shortest end is an estimate (counted, not written)
        rest = narrowed(tracker, Narrow(tracker.doc, 0))
        back = cut if rest.back is None else rest.back
        matcher = GRAMMARS.narrowed(f"start: {rest.body or lit('')}\n{BASE_RULES}")
        assert matcher is not None, rest.body
        tokens = list(data[back:cut]) + list(finish.encode())
        assert matcher.try_consume_tokens(tokens) == len(tokens), (cut, rest.body, finish)
        assert matcher.is_accepting(), (cut, rest.body)


def request(
    schema: dict[str, Any] | None = None,
    tools: Tools | None = None,
    fmt: ChatFormat = GENERIC,
) -> GenerationRequest:
    rf = None if tools is not None else ResponseFormat(json.dumps(schema) if schema else None)
    messages = (ChatMessage("user", "hi"),)
    gen = GenerationRequest("r", messages=messages, response_format=rf, tools=tools)
    return plan_output(gen, fmt)


def allowed_tokens(c: Any) -> list[int]:
    mask = unpack(c.compute_mask(), EOS + 1)
    return [t for t in range(EOS + 1) if mask[t]]


def generate(
    gen: GenerationRequest, limit: int, seed: int, *, steer: bool = True, closer: bool = False
) -> tuple[str, str, int]:
    """Run a model over the byte vocabulary: the adversary (or, ``closer``, a model that closes
    whatever it can); the text, the finish reason and the narrowings."""
    rnd = random.Random(seed)
    assert gen.output is not None and gen.output.grammar is not None
    budget = Budget(gen, limit) if steer else None
    c = GRAMMARS.constraint(gen.output.grammar, "x", [EOS], budget)
    out = bytearray()
    for _ in range(limit):
        allowed = allowed_tokens(c)
        closing = [t for t in allowed if t in b'"}]' or t == EOS]
        if closer and closing:
            token = closing[0]
        else:
            opening = [t for t in allowed if t not in closing]
            token = rnd.choice(opening if opening and rnd.random() < 0.97 else allowed)
        if token == EOS:
            return out.decode(), "stop", c.steered
        c.accept(token)
        out.append(token)
        assert c.failed is None
        if c.complete:
            return out.decode(), "stop", c.steered
    return out.decode(errors="replace"), "length", c.steered


def call_arguments(text: str, layout: str = "generic") -> Any:
    """The one call in ``text``, written in ``layout``."""
    if layout == "llama3":
        call = json.loads(text.removeprefix("<|python_tag|>"))
        return call["name"], call["parameters"]
    if layout == "mistral":
        (call,) = json.loads(text.removeprefix("[TOOL_CALLS]"))
    else:
        call = json.loads(text.split("<tool_call>", 1)[1].rsplit("</tool_call>", 1)[0])
    return call["name"], call["arguments"]


PERSON_TOOL = ToolSpec("save_person", parameters=json.dumps(PERSON))
PET_TOOL = ToolSpec("save_pets", parameters=json.dumps(PET))


@pytest.mark.parametrize("seed", range(6))
def test_an_adversary_ends_a_json_schema_answer_within_its_budget(seed: int) -> None:
    text, why, steered = generate(request(PERSON), 150, seed)
    assert why == "stop" and steered >= 1, text
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", range(6))
def test_an_adversary_ends_a_json_object_answer_within_its_budget(seed: int) -> None:
    text, why, _ = generate(request(None), 60, seed)
    assert why == "stop", text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("layout", ["generic", "hermes", "llama3", "mistral"])
@pytest.mark.parametrize("seed", range(3))
def test_an_adversary_ends_a_forced_call_within_its_budget(seed: int, layout: str) -> None:
    tools = Tools((PERSON_TOOL, PET_TOOL), "required")
    fmt = ChatFormat(FORMATS[layout])  # type: ignore[index]
    text, why, steered = generate(request(tools=tools, fmt=fmt), 260, seed)
    assert why == "stop" and steered >= 1, text
    name, arguments = call_arguments(text, layout)  # one call: none starts once narrowed
    jsonschema.validate(arguments, PERSON if name == "save_person" else PET)


def test_without_steering_the_adversary_runs_out() -> None:
    reasons = {generate(request(PERSON), 150, seed, steer=False)[1] for seed in range(3)}
    assert reasons == {"length"}


def test_a_wide_budget_is_never_narrowed() -> None:
    text, why, steered = generate(request(PERSON), 400, 0, closer=True)
    assert (why, steered) == ("stop", 0)
    jsonschema.validate(json.loads(text), PERSON)


def test_a_budget_below_the_shortest_answer_is_left_alone() -> None:
    shortest_answer = house({"name": "", "age": 0, "role": "user", "tags": [""],
                             "address": {"street": "", "city": ""}, "email": ""})  # fmt: skip
    _, why, steered = generate(request(PERSON), len(shortest_answer) - 5, 0)
    assert (why, steered) == ("length", 0)


def test_a_call_begun_under_auto_is_steered_once_opened() -> None:
    gen = request(tools=Tools((PERSON_TOOL,), "auto"))
    assert gen.output is not None and gen.output.grammar is not None
    c = GRAMMARS.constraint(gen.output.grammar, "x", [EOS], Budget(gen, 220))
    for token in b"Sure. <tool_call>":
        unpack(c.compute_mask(), EOS + 1)
        c.accept(token)
    assert c.steered == 0
    rnd = random.Random(1)
    out = bytearray(b"Sure. <tool_call>")
    for _ in range(220 - len(out)):
        allowed = allowed_tokens(c)
        opening = [t for t in allowed if t not in b'"}]' and t != EOS] or allowed
        token = rnd.choice(opening)
        if token == EOS:
            break
        c.accept(token)
        out.append(token)
        if c.complete:
            break
    assert c.complete and c.steered >= 1, out
    _, arguments = call_arguments(out.decode())
    jsonschema.validate(arguments, PERSON)


def test_thinking_is_not_steered_and_the_answer_after_it_is() -> None:
    fmt = ChatFormat(FORMATS["generic"], reasoning=Reasoning())
    gen = plan_output(
        GenerationRequest("r", messages=(ChatMessage("user", "hi"),),
                          response_format=ResponseFormat(json.dumps(PERSON))),
        fmt,
    )  # fmt: skip
    assert gen.output is not None and gen.output.grammar is not None
    c = GRAMMARS.constraint(gen.output.grammar, "x", [EOS], Budget(gen, 170))
    for token in b"<think>hm</think>\n":
        unpack(c.compute_mask(), EOS + 1)
        c.accept(token)
    rnd = random.Random(2)
    out = bytearray()
    while not c.complete:
        allowed = allowed_tokens(c)
        opening = [t for t in allowed if t not in b'"}]' and t != EOS] or allowed
        token = rnd.choice(opening)
        c.accept(token)
        out.append(token)
        assert len(out) + 18 <= 170
    jsonschema.validate(json.loads(out.decode()), PERSON)


def test_narrowed_strings_keep_the_schema_bounds() -> None:
    doc = Doc({"type": "string", "minLength": 3, "maxLength": 5})
    expr = Narrow(doc, chars=50).value(doc.root)
    assert '"minLength": 3' in expr and '"maxLength": 5' in expr
    assert dumps({"a": 1}) == '{"a": 1}'


def test_rollback_within_the_narrowed_grammar() -> None:
    gen = request(PERSON)
    assert gen.output is not None and gen.output.grammar is not None
    c = GRAMMARS.constraint(gen.output.grammar, "x", [EOS], Budget(gen, 140))
    for token in b'{"name": "ab':
        unpack(c.compute_mask(), EOS + 1)
        c.accept(token)
    assert c.steered == 1
    assert c.rollback(1)  # inside the narrowed grammar: taken back
    assert not c.rollback(20)  # past where the narrowed grammar began
    c.reset()
    assert c.steered == 0 and c.matcher is not None


def test_an_unsteered_sequence_takes_tokens_back_freely() -> None:
    """A sequence far from its budget (or never to be steered) rolls back as its grammar does
    (ExLlama's filters roll back), and is not steered afterwards."""
    gen = request(PERSON)
    assert gen.output is not None and gen.output.grammar is not None
    for limit in (1000, 10):  # wide, and below the shortest answer (steering off at once)
        c = GRAMMARS.constraint(gen.output.grammar, "x", [EOS], Budget(gen, limit))
        for token in b'{"name": "ab':
            allowed_tokens(c)
            c.accept(token)
        assert c.steered == 0
        assert c.rollback(3) and c.rollback(5)
        allowed_tokens(c)
        assert c.steered == 0
