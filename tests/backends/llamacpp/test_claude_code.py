"""Claude Code (npm ``@anthropic-ai/claude-code``, which speaks only Anthropic's Messages API)
completes turns against the gateway on the default model, in print mode, as README shows:
``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_AUTH_TOKEN``, with Claude model names that the gateway
maps to the served model through aliases.

Claude Code's own system prompt and tool set (~13k tokens) do not fit SmolLM2's 8k, so the test
trims them as a user of a small model would: a short ``--system-prompt`` and no tools. It always
sends ``max_tokens`` (128000 for its default model, so ``default_max_tokens`` never applies);
``CLAUDE_CODE_MAX_OUTPUT_TOKENS`` is the user's knob for that. Every request is
``POST /v1/messages?beta=true``, streamed, with ``anthropic-version``, ``anthropic-beta``,
``Authorization: Bearer`` and ``X-Claude-Code-Session-Id`` headers, ``system`` as text blocks
with ``cache_control`` under an ``x-anthropic-billing-header: cc_version=...; cc_entrypoint=...;``
line, ``metadata.user_id``, ``thinking`` (``adaptive``, or for Haiku 4.5 ``enabled`` with a
``budget_tokens`` above ``max_tokens``), ``context_management`` and ``output_config.effort``.

Without ``--bare`` it also sends, for its default model, a ``{"role": "system", "content":
[...], "output_config": ...}`` message after the user's (the environment section), and for
Haiku 4.5 ``<system-reminder>`` blocks in the user's message: SmolLM2 then writes on past any
limit, even at temperature 0. So the turns that must complete run ``--bare`` at temperature 0
(``CLAUDE_CODE_EXTRA_BODY``), and one full-shape turn shows that shape is served."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve
from tests.support import peer_cli, run_group

ROOT = Path(__file__).resolve().parents[3]
CLAUDE = ROOT / ".peers" / "claude" / "node_modules" / ".bin" / "claude"
#: What Claude Code sends for each model name (CLAUDE_VERSION in the Makefile): its default model
#: (``opus``; ``claude-opus-4-1`` is remapped to it by the client), the ``sonnet``, ``haiku`` and
#: ``fable`` aliases, and the names users type.
CLAUDE_MODELS = [
    "claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5", "claude-fable-5-2",
    "claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-1",
]  # fmt: skip
MAX_OUTPUT_TOKENS = 256
#: What Claude Code says when a reply is cut at max_tokens four times in a row (it asks the model
#: to resume after each), and exits 1 on.
OUTPUT_LIMIT = f"response exceeded the {MAX_OUTPUT_TOKENS} output token maximum"
SYSTEM_PROMPT = "You are a coding agent in a terminal. Answer briefly."
HAIKU = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def claude() -> Path:
    return peer_cli(CLAUDE, "Claude Code", "claude")


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    table = model_table(smol_path, kv_cache={"n_ctx_per_slot": 4096}, aliases=CLAUDE_MODELS)
    with serve({SMOL: table}) as srv:
        yield srv


def claude_print(
    claude: Path, base_url: str, home: Path, prompt: str, *options: str
) -> subprocess.CompletedProcess[str]:
    work = home / "work"
    work.mkdir(exist_ok=True)
    # the prompt first: ``--tools`` takes several values and would swallow a prompt after it
    command = [str(claude), "-p", prompt, "--tools", "", "--system-prompt", SYSTEM_PROMPT]
    command += ["--max-turns", "1", *options]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
    env |= {
        "HOME": str(home), "NO_COLOR": "1",
        "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_AUTH_TOKEN": "test",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
        "CLAUDE_CODE_EXTRA_BODY": '{"temperature": 0}',  # merged into each request's body
        # no update checks, telemetry or error reports (nothing but the gateway is reached)
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
    }  # fmt: skip
    return run_group(command, work, env, timeout_s=180)


def test_claude_print_completes_a_turn(
    claude: Path, server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Plain ``claude -p`` on Claude Code's default model name."""
    home = tmp_path_factory.mktemp("claude-home")
    done = claude_print(claude, server.base_url, home, "Say hello.", "--bare")
    log = f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    assert done.returncode == 0, log
    assert done.stdout.strip(), log  # the agent's answer


def test_claude_stream_json_completes_a_turn(
    claude: Path, server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``--output-format stream-json --verbose`` (what the Agent SDK and IDEs read) on the
    Haiku 4.5 name, whose requests carry ``thinking: {"type": "enabled", "budget_tokens": ...}``."""
    home = tmp_path_factory.mktemp("claude-home")
    options = ("--bare", "--output-format", "stream-json", "--verbose")
    done = claude_print(claude, server.base_url, home, "Say hello.", *options, "--model", HAIKU)
    log = f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    events: list[dict[str, Any]] = [json.loads(line) for line in done.stdout.splitlines() if line]
    inits = [e for e in events if e["type"] == "system" and e["subtype"] == "init"]
    assert len(inits) == 1 and inits[0]["model"] == HAIKU, log
    replies = [
        block["text"]
        for event in events if event["type"] == "assistant"
        for block in event["message"]["content"] if block["type"] == "text"
    ]  # fmt: skip
    assert "".join(replies).strip(), log  # the gateway's stream reached Claude Code
    result = events[-1]
    assert result["type"] == "result" and result["subtype"] == "success", log
    assert not result["is_error"] and result["result"].strip(), log
    assert result["usage"]["output_tokens"] > 0, log
    assert done.returncode == 0, log


def test_claude_print_full_request_is_served(
    claude: Path, server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Without ``--bare``: the system-role message after the user's, with its own
    ``output_config``, and the system reminders are accepted and answered."""
    home = tmp_path_factory.mktemp("claude-home")
    done = claude_print(claude, server.base_url, home, "Say hello.")
    log = f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    if done.returncode == 0:
        assert done.stdout.strip(), log
        return
    # SmolLM2 writes on past max_tokens, every time Claude Code asks it to resume (3 times):
    # Claude Code then reports it and exits 1. Any other error is the gateway's.
    assert done.returncode == 1 and OUTPUT_LIMIT in done.stdout, log
