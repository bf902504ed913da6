"""Grammars in the ExLlama backends, on a CPU: the filters both libraries drive, over the
core's matcher, with llguidance's tokenizer from a real ``tokenizer.json``.

The libraries are not installed here (they need CUDA). Each filter class is built on a base
that drives it as the library's generator does: exllamav3 calls ``reset``, then per token
``get_next_logit_mask`` and ``feed`` (which ends the job when ``is_completed``); exllamav2
calls ``begin``, then ``prepare_logit_mask`` + ``mask_logits`` and ``feed``. Random logits
play the model; whatever they say, the text decodes, parses and validates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import pytest

from backends._exllama.backend import model_chat_format
from backends._exllama.config import ExllamaModelConfig
from backends._exllama.grammar import (
    V2Grammar,
    V3Grammar,
    grammars,
    v2_filter_class,
    v3_filter_class,
)
from backends._exllama.modeldir import TokenizerFacts
from backends.exllamav3.config import ExLlamaV3ModelConfig
from gateway.errors import InvalidRequest
from gateway.output.formats import ChatFormat
from gateway.output.grammar import grammar_for
from gateway.output.matchers import Constraint, Grammars
from gateway.output.parser import OutputParser
from gateway.types import (
    Delta,
    Finish,
    ReasoningDelta,
    ResponseFormat,
    TextDelta,
    ToolCallDelta,
    Tools,
    ToolSpec,
    Usage,
)
from tests.backends.exllama.tokenizer_json import write_tokenizer_json
from tests.backends.llamacpp.families import FAMILIES, Family

N_VOCAB = 512  # the model's logits: padded past the tokenizer's ~460 tokens
EOS_TEXT = "<|im_end|>"
#: Up to 8 calls of ~50 byte-sized tokens each, and then some.
MAX_STEPS = 4000

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}
TOOLS = (
    ToolSpec("get_weather", "Weather", json.dumps(WEATHER)),
    ToolSpec("make_person", "Person", json.dumps(PERSON)),
)


# ---- the libraries' side, as their generators drive a filter ----


class V3Base:
    """What exllamav3's ``Filter`` does around a subclass: ``feed`` accepts the token and
    deactivates the filter at its end (ending the job when ``eos_after_completed``)."""

    def __init__(
        self, tokenizer: Any, trigger: int | None, prefix: str | None, eos_after: bool
    ) -> None:
        assert trigger is None and prefix is None
        self.eos_after_completed = eos_after
        self.is_active = True

    def feed(self, token: int) -> bool:
        me: Any = self
        me.accept_token(token)
        if me.is_completed():
            self.is_active = False
            return self.eos_after_completed
        return False


class V2Base:
    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer


def identity(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return array


def pick(logits: npt.NDArray[np.float32], rng: np.random.Generator, temperature: float) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    gumbel = -np.log(-np.log(rng.uniform(1e-9, 1.0, logits.shape)))
    return int(np.argmax(logits / temperature + gumbel))


def drive_v3(f: V3Grammar, rng: np.random.Generator, temp: float, stops: set[int]) -> list[int]:
    f.reset()
    out: list[int] = []
    for _ in range(MAX_STEPS):
        words = f.get_next_logit_mask()
        assert words.shape == (1, (N_VOCAB + 31) // 32) and words.dtype == np.int32
        bits = np.unpackbits(words[0].view(np.uint8), bitorder="little").astype(bool)
        logits = rng.normal(0, 3, N_VOCAB).astype(np.float32)
        logits[~bits[:N_VOCAB]] = -np.inf
        token = pick(logits, rng, temp)
        out.append(token)
        if token in stops or f.feed(token):  # type: ignore[attr-defined]
            return out
    raise AssertionError("the grammar never ended")


def drive_v2(f: V2Grammar, rng: np.random.Generator, temp: float, stops: set[int]) -> list[int]:
    f.begin("")
    out: list[int] = []
    for step in range(MAX_STEPS):
        logits = rng.normal(0, 3, N_VOCAB).astype(np.float32)
        if step % 2:  # the sampler's mask path, and its other path (the allowed ids)
            assert f.can_mask_logits() and f.prepare_logit_mask()
            logits = f.mask_logits(logits)
        else:
            allowed, ends = f.next()
            assert allowed and ends == set()
            masked = np.full(N_VOCAB, -np.inf, dtype=np.float32)
            idx = sorted(allowed)
            masked[idx] = logits[idx]
            logits = masked
        token = pick(logits, rng, temp)
        out.append(token)
        if token in stops:
            return out
        f.feed(token)
    raise AssertionError("the grammar never ended")


# ---- a model directory per family ----


@dataclass
class ModelDir:
    family: Family
    path: Path
    fmt: ChatFormat
    grammars: Grammars
    eos: int

    def decode(self, tokens: list[int]) -> str:
        body = [t for t in tokens if t != self.eos]
        return str(self.grammars.tokenizer().decode_str(body))


def make_dir(root: Path, family: Family) -> ModelDir:
    v = family.vocab
    added = tuple((t, True) for t in v.control) + tuple((t, False) for t in v.user_defined)
    if EOS_TEXT not in dict(added):
        added += ((EOS_TEXT, True),)
    ids = write_tokenizer_json(root, added)
    (root / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": v.template, "eos_token": EOS_TEXT})
    )
    config = ExLlamaV3ModelConfig(backend="exllamav3", model_dir=root)
    fmt = model_chat_format(config, TokenizerFacts.from_model_dir(root))
    eos = ids[EOS_TEXT]
    return ModelDir(family, root, fmt, grammars(root, N_VOCAB, (eos,)), eos)


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> ModelDir:
    return make_dir(tmp_path, request.param)


def test_markers_that_are_added_tokens_are_named_by_id(model_dir: ModelDir) -> None:
    fmt = model_dir.fmt
    assert fmt.tools.name == model_dir.family.tool_format
    # llguidance treats every added token as a control token, special or not
    assert set(fmt.special) == set(model_dir.family.special_markers)


def parse(fmt: ChatFormat, text: str) -> list[Delta]:
    """The text through the core's parser in 1-character deltas."""
    parser = OutputParser(fmt, parse_tools=True)
    out: list[Delta] = []
    for ch in text:
        out += parser.feed(TextDelta(ch))
    return out + parser.feed(Finish("stop", Usage(1, len(text))))


def calls(deltas: list[Delta]) -> list[tuple[str, dict[str, Any]]]:
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for d in deltas:
        assert not (isinstance(d, TextDelta) and d.text.strip()), f"text beside calls: {d}"
        if isinstance(d, ToolCallDelta):
            if d.name is not None:
                names[d.call] = d.name
            args[d.call] = args.get(d.call, "") + d.arguments
    return [(names[i], json.loads(args[i])) for i in sorted(names)]


Driver = Callable[[Any, np.random.Generator, float, set[int]], list[int]]


def filters(model: ModelDir, grammar: str) -> Iterator[tuple[Any, Driver]]:
    """The same grammar as each library's filter, each with a fresh matcher."""
    v3 = v3_filter_class(V3Base)
    v2 = v2_filter_class(V2Base)
    stops = (model.eos,)
    yield v3(None, model.grammars.constraint(grammar, "tools", stops), identity), drive_v3
    yield v2(None, None, model.grammars.constraint(grammar, "tools", stops), identity), drive_v2


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_required_calls_parse_and_validate_whatever_the_model(
    model_dir: ModelDir, temperature: float
) -> None:
    schemas = {t.name: json.loads(t.parameters) for t in TOOLS}
    grammar = grammar_for(model_dir.fmt, Tools(TOOLS, "required"), None)
    assert grammar is not None
    for seed in range(4):
        for f, drive in filters(model_dir, grammar):
            rng = np.random.default_rng(seed)
            tokens = drive(f, rng, temperature, {model_dir.eos})
            assert f.constraint.failed is None
            text = model_dir.decode(tokens)
            made = calls(parse(model_dir.fmt, text))
            assert 1 <= len(made) <= 8, text
            for name, arguments in made:
                jsonschema.validate(arguments, schemas[name])


def test_a_named_choice_is_one_call_of_that_tool(model_dir: ModelDir) -> None:
    grammar = grammar_for(model_dir.fmt, Tools(TOOLS, "named", name="make_person"), None)
    assert grammar is not None
    for f, drive in filters(model_dir, grammar):
        tokens = drive(f, np.random.default_rng(7), 1.0, {model_dir.eos})
        made = calls(parse(model_dir.fmt, model_dir.decode(tokens)))
        assert [name for name, _ in made] == ["make_person"]
        jsonschema.validate(made[0][1], PERSON)


def test_a_json_schema_answer_validates(tmp_path: Path) -> None:
    model = make_dir(tmp_path, FAMILIES[0])
    grammar = grammar_for(model.fmt, None, ResponseFormat(json.dumps(PERSON)))
    assert grammar is not None
    for seed in range(6):
        for f, drive in filters(model, grammar):
            tokens = drive(f, np.random.default_rng(seed), 1.2, {model.eos})
            jsonschema.validate(json.loads(model.decode(tokens)), PERSON)


def test_v3_ends_the_job_at_the_grammar_end(tmp_path: Path) -> None:
    """exllamav3 stops the job itself when the filter completes (``end_filter``)."""
    model = make_dir(tmp_path, FAMILIES[0])
    grammar = 'start: "yes" | "no"\n'
    f: Any = v3_filter_class(V3Base)(
        None, model.grammars.constraint(grammar, "tools", (model.eos,)), identity
    )
    tokens = drive_v3(f, np.random.default_rng(0), 1.0, {model.eos})
    assert model.decode(tokens) in ("yes", "no") or tokens[-1] == model.eos
    assert f.is_completed() and not f.is_active


def test_rollback_replays_to_the_same_state(tmp_path: Path) -> None:
    model = make_dir(tmp_path, FAMILIES[0])
    grammar = grammar_for(model.fmt, None, ResponseFormat(json.dumps(PERSON)))
    assert grammar is not None
    c = model.grammars.constraint(grammar, "response_format", (model.eos,))
    tokens = model.grammars.tokenizer().tokenize_str('{"name": "ab')
    for t in tokens:
        c.accept(t)
    before = bytes(c.compute_mask())
    c.accept(model.grammars.tokenizer().tokenize_str("c")[0])
    assert c.rollback(1) and bytes(c.compute_mask()) == before
    assert not c.rollback(100), "more than was accepted"


def test_a_failed_matcher_allows_only_the_stop_tokens(tmp_path: Path) -> None:
    model = make_dir(tmp_path, FAMILIES[0])
    grammar = grammar_for(model.fmt, None, ResponseFormat(json.dumps(PERSON)))
    assert grammar is not None
    c: Constraint = model.grammars.constraint(grammar, "response_format", (model.eos,))
    c.matcher.consume_token(model.grammars.tokenizer().tokenize_str("zz")[0])  # not JSON
    assert c.failed
    c.accept(5)  # no exception on the engine thread
    bits = np.unpackbits(np.frombuffer(c.compute_mask(), dtype=np.uint8), bitorder="little")
    assert list(np.flatnonzero(bits)) == [model.eos]
    v3: Any = v3_filter_class(V3Base)(None, c, identity)
    assert v3.is_completed(), "exllamav3 ends the job"
    v2: Any = v2_filter_class(V2Base)(None, None, c, identity)
    assert v2.next()[0] == {model.eos}


def test_a_grammar_the_tokenizer_cannot_serve_is_a_400(tmp_path: Path) -> None:
    model = make_dir(tmp_path, FAMILIES[0])
    with pytest.raises(InvalidRequest) as err:
        model.grammars.compile('start: "a" <[99999]>\n', "tools")
    assert err.value.param == "tools"


def test_no_tokenizer_json_is_a_400(tmp_path: Path) -> None:
    g = grammars(tmp_path, N_VOCAB, (2,))
    with pytest.raises(InvalidRequest, match=r"tokenizer\.json"):
        g.compile('start: "a"\n', "response_format")


def test_a_prompt_opened_reasoning_is_parsed_and_constrained(tmp_path: Path) -> None:
    model = make_dir(tmp_path, FAMILIES[0])
    fmt = replace(model.fmt, reasoning=_reasoning())
    assert fmt.opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not fmt.opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    grammar = grammar_for(fmt, None, ResponseFormat(json.dumps(PERSON)), opened=True)
    assert grammar is not None
    c = model.grammars.constraint(grammar, "response_format", (model.eos,))
    tok = model.grammars.tokenizer()
    for t in tok.tokenize_str('a plan</think>\n{"name": "x", "tags": []}'):
        c.accept(t)
    assert c.failed is None
    fresh = model.grammars.constraint(grammar, "response_format", (model.eos,))
    for t in tok.tokenize_str("<think>"):
        fresh.accept(t)
    # "<think>" is reasoning text here (opened already): the answer still must follow
    assert fresh.failed is None
    parser = OutputParser(fmt, parse_tools=False, reasoning_open=True)
    out = parser.feed(TextDelta('a plan</think>\n{"name": "x"}'))
    out += parser.feed(Finish("stop", Usage(1, 2)))
    assert "".join(d.text for d in out if isinstance(d, ReasoningDelta)) == "a plan"
    assert "".join(d.text for d in out if isinstance(d, TextDelta)) == '{"name": "x"}'


def _reasoning() -> Any:
    from gateway.output.formats import Reasoning

    return Reasoning()


def test_the_config_names_a_tool_format(tmp_path: Path) -> None:
    model = make_dir(tmp_path, FAMILIES[0])
    config: ExllamaModelConfig = ExLlamaV3ModelConfig(
        backend="exllamav3", model_dir=model.path, tool_format="llama3"
    )
    fmt = model_chat_format(config, TokenizerFacts.from_model_dir(model.path))
    assert fmt.tools.name == "llama3"
