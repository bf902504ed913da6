"""The streaming output parser: a generation's text deltas in, content, reasoning and tool-call
deltas out. Engine-independent: every in-process backend's stream goes through it.

Markup never reaches the content: where the text so far ends with what could be the start of
a marker (``<tool`` of ``<tool_call>``), that much is held back until it either completes the
marker or cannot. Each tool call's first delta carries its id and name, later ones only more
of the raw arguments text (as OpenAI streams them).

In a format that writes custom tools' calls raw (:attr:`ToolFormat.raw`), a call whose
opening marker is followed by the name of an offered custom tool (:attr:`ChatFormat.raw_tools`)
and a newline (not ``{``) is one: its input is the text up to the closing marker (for a Lark
tool, the first marker where the input is complete under its grammar), handed on as the
arguments ``{"input": "..."}``.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import replace
from typing import Literal, assert_never

from gateway.output.calls import CallObject, GrammarEnd, RawCall
from gateway.output.formats import ChatFormat
from gateway.types import (
    Delta,
    EmbeddingDelta,
    Finish,
    PromptProgress,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)

Mode = Literal["content", "reasoning", "calls"]
_ALPHABET = string.ascii_letters + string.digits
_NAME_ARGS = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")
_NAME_ARGS_PREFIX = re.compile(r"[A-Za-z0-9_.\-]*(\[(A(R(G(S)?)?)?)?)?")
#: A raw call's first line: the tool's name (as long as the Responses API allows, namespaced).
_RAW_NAME = re.compile(r"([A-Za-z0-9_.\-]{1,300})\n")
_RAW_NAME_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{0,300}")
#: Where a call object holds its arguments (Llama 3 says ``parameters``).
ARGUMENT_KEYS = ("arguments", "parameters")


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin one of ``markers``."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-n:]):
                longest = n
                break
    return longest


class OutputParser:
    """One generation's parser."""

    def __init__(self, fmt: ChatFormat, *, parse_tools: bool, reasoning_open: bool = False) -> None:
        """``reasoning_open``: the prompt opened the reasoning, the text starts inside it."""
        self.fmt = fmt
        self.tools = fmt.tools
        self.parse_tools = parse_tools
        opened = reasoning_open and fmt.reasoning is not None
        self.mode: Mode = "reasoning" if opened else "content"
        self._buf = ""
        self._out: list[Delta] = []
        self._tokens = 0
        self._logprobs: list[TokenLogprob] = []
        self._call: CallObject | RawCall | None = None
        self._opened = False  # a call's opening marker was the last thing read
        self._call_index = 0
        self._named = False
        self._started = False  # any non-space content emitted
        self._after_reasoning = False
        self._cut = False  # the generation ran out of tokens (finish "length")

    # -- entry points ---------------------------------------------------------------------

    def feed(self, delta: Delta) -> list[Delta]:
        match delta:
            case TextDelta(text=text, tokens=tokens, logprobs=logprobs):
                self._tokens += tokens
                self._logprobs.extend(logprobs)
                self._buf += text
                self._run(final=False)
            case Finish():
                self._cut = delta.reason == "length"
                self._run(final=True)
                self._flush_call()
                reason = delta.reason
                if self._call_index and reason == "stop":
                    reason = "tool_calls"
                self._emit(replace(delta, reason=reason))
            case ReasoningDelta() | ToolCallDelta() | EmbeddingDelta():
                self._emit(delta)  # already structured (a backend that parses itself)
            case PromptProgress():
                self._emit(delta)  # not text: passed on as it comes
            case _:
                assert_never(delta)
        out, self._out = self._out, []
        return out

    # -- the state machine ------------------------------------------------------------------

    def _run(self, *, final: bool) -> None:
        while self._buf:
            before = (self.mode, len(self._buf))
            match self.mode:
                case "content":
                    self._content(final)
                case "reasoning":
                    self._reasoning(final)
                case "calls":
                    self._calls_text(final)
            if (self.mode, len(self._buf)) == before:
                return  # waiting for more text

    def _content_markers(self) -> tuple[str, ...]:
        out: list[str] = []
        if self.fmt.reasoning is not None and not self._after_reasoning and not self._started:
            out.append(self.fmt.reasoning.start)
        if self.parse_tools:
            out.append(self.tools.start)
        return tuple(m for m in out if m)

    def _content(self, final: bool) -> None:
        buf = self._buf
        if self._after_reasoning and not self._started:
            buf = buf.lstrip("\n")
            self._buf = buf
            if not buf:
                return
        if self._bare_json_call(buf, final):
            return
        markers = self._content_markers()
        found = min(
            ((buf.find(m), m) for m in markers if m in buf), default=None, key=lambda x: x[0]
        )
        if found is not None:
            at, marker = found
            self._text(buf[:at])
            self._buf = buf[at + len(marker) :]
            self._logprobs.clear()
            if self.fmt.reasoning is not None and marker == self.fmt.reasoning.start:
                self.mode = "reasoning"
            else:
                self.mode = "calls"
                self._opened = marker == self.tools.call_open
            return
        keep = 0 if final else _held_back(buf, markers)
        self._text(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]

    def _bare_json_call(self, buf: str, final: bool) -> bool:
        """Llama 3 writes a call as bare JSON at the start of its answer."""
        if not (self.parse_tools and self.tools.name == "llama3") or self._started:
            return False
        head = buf.lstrip()
        if not head:
            self._buf = ""  # leading white space: nothing to show yet
            return not final
        if head.startswith("{"):
            self._buf = head
            self.mode = "calls"
            self._logprobs.clear()
            return True
        return False

    def _reasoning(self, final: bool) -> None:
        assert self.fmt.reasoning is not None
        end = self.fmt.reasoning.end
        buf = self._buf
        at = buf.find(end)
        if at >= 0:
            self._think(buf[:at])
            self._buf = buf[at + len(end) :]
            self.mode = "content"
            self._after_reasoning = True
            return
        keep = 0 if final else _held_back(buf, (end,))
        self._think(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]

    def _feed_call(self, *, final: bool = False) -> None:
        call = self._call
        assert call is not None
        used = (
            call.feed(self._buf, final=final, cut=self._cut)
            if isinstance(call, RawCall)
            else call.feed(self._buf)
        )
        self._buf = self._buf[used:]
        self._call_progress()

    def _calls_text(self, final: bool) -> None:
        if self._call is not None:
            self._feed_call()
            return
        buf = self._buf.lstrip()
        if buf != self._buf:
            self._buf = buf
            return
        for glue in self._glue():
            if buf.startswith(glue):
                self._buf = buf[len(glue) :]
                self._opened = glue == self.tools.call_open
                return
        opened, self._opened = self._opened, False
        if buf.startswith("{"):
            self._call = CallObject(ARGUMENT_KEYS)
            self._feed_call()
            return
        if opened and self.tools.raw and self.fmt.raw_tools:
            names = self.fmt.raw_tools
            match = _RAW_NAME.match(buf)
            if match and match.group(1) in names:
                self._buf = buf[match.end() :]
                self._raw_call(match.group(1))
                self._feed_call()
                return
            if _RAW_NAME_PREFIX.fullmatch(buf) and any(n.startswith(buf) for n in names):
                if not final:
                    self._opened = True
                    return
                # cut before the new line after the name: a call if it is whole, never content
                self._buf = ""
                if buf in names:
                    self._raw_call(buf)
                    self._feed_call(final=True)
                return
        if self.tools.name == "mistral_args":
            match = _NAME_ARGS.match(buf)
            if match:
                self._buf = buf[match.end() :].lstrip()
                self._call = CallObject(ARGUMENT_KEYS, name=match.group(1))
                self._feed_call()
                return
            if not final and _NAME_ARGS_PREFIX.fullmatch(buf):
                return
        if not final and any(g.startswith(buf) for g in self._glue()):
            return
        # text after the calls that is no call: it is content again
        self.mode = "content"

    def _raw_call(self, name: str) -> None:
        syntax, definition = self.fmt.raw_tools[name]
        ends = GrammarEnd(definition) if syntax == "lark" else None
        self._call = RawCall(name, self.tools.call_close, ends)

    def _glue(self) -> tuple[str, ...]:
        t = self.tools
        extra = {"llama3": (";", "<|python_tag|>"), "mistral": ("[", "]", ",")}.get(t.name, ())
        return tuple(g for g in (t.start, t.call_open, t.call_close, *extra) if g)

    def _call_progress(self) -> None:
        call = self._call
        assert call is not None
        if call.name is not None and not self._named:
            self._named = True
            self._emit(ToolCallDelta(self._call_index, "", id=call_id(), name=call.name))
        arguments = call.take_arguments()
        if arguments:
            self._emit(ToolCallDelta(self._call_index, arguments))
        if call.done:
            self._end_call()

    def _end_call(self) -> None:
        call = self._call
        assert call is not None
        if self._named:
            if not call.saw_arguments:
                self._emit(ToolCallDelta(self._call_index, "{}"))
            self._call_index += 1
        self._call = None
        self._named = False

    def _flush_call(self) -> None:
        """The stream ended inside a call (cut by max_tokens): keep what was named (and all of
        a raw call's input)."""
        if isinstance(self._call, RawCall):
            self._feed_call(final=True)
        if self._call is not None:
            self._call_progress()
            if self._call is not None:
                self._end_call()

    # -- output -------------------------------------------------------------------------------

    def _owed(self) -> int:
        tokens, self._tokens = self._tokens, 0
        return tokens

    def _emit(self, delta: Delta) -> None:
        if isinstance(delta, ToolCallDelta) and self._tokens:
            delta = replace(delta, tokens=self._owed())
        self._out.append(delta)

    def _text(self, text: str) -> None:
        if not text:
            return
        if text.strip():
            self._started = True
        logprobs, self._logprobs = tuple(self._logprobs), []
        self._out.append(TextDelta(text, tokens=self._owed(), logprobs=logprobs))

    def _think(self, text: str) -> None:
        if text:
            self._out.append(ReasoningDelta(text, tokens=self._owed()))
