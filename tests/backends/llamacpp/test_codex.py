"""Codex CLI (npm ``@openai/codex``, which speaks only the Responses API) completes a turn
against the gateway on the default model with an 8k context: ``codex exec`` with a custom
``model_providers`` entry (``wire_api = "responses"``), as README shows.

Codex's own instructions and tool set (~10k tokens) do not fit 8k, so the test trims them as
a user of a small model would: a short ``model_instructions_file`` and the optional features
off. What remains is what Codex sends every turn: developer and user messages as
``input_text`` items, function tools with ``strict``, ``store: false``, ``include``,
``reasoning.summary``, ``prompt_cache_key`` and its ``client_metadata``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing import ServerThread
from tests.backends.llamacpp.conftest import SMOL, model_table, serve
from tests.support import peer_cli, run_group

ROOT = Path(__file__).resolve().parents[3]
CODEX = ROOT / ".peers" / "codex" / "node_modules" / ".bin" / "codex"
#: What Codex prints when a response ends "incomplete" (cut at its output limit).
INCOMPLETE = "ERROR: Incomplete response returned, reason: max_output_tokens"
#: Codex features that add tools or instructions a 135M model with 8k tokens has no room for.
TRIMMED = ("multi_agent", "goals", "plugins", "skill_search", "apps", "view_image", "tool_suggest")


@pytest.fixture(scope="module")
def codex() -> Path:
    return peer_cli(CODEX, "Codex CLI", "codex")


@pytest.fixture(scope="module")
def server(smol_path: Path) -> Iterator[ServerThread]:
    # Codex sends no output limit; without a default a rambling 135M model may run to 8k tokens
    table = model_table(smol_path, kv_cache={"n_ctx_per_slot": 8192}, default_max_tokens=512)
    with serve({SMOL: table}) as srv:
        yield srv


def codex_exec(
    codex: Path, base_url: str, home: Path, prompt: str
) -> subprocess.CompletedProcess[str]:
    instructions = home / "instructions.md"
    instructions.write_text("You are a coding agent in a terminal. Answer briefly.\n")
    work = home / "work"
    work.mkdir(exist_ok=True)
    config = [
        "model_provider=gw", 'model_providers.gw.name="gateway"',
        f'model_providers.gw.base_url="{base_url}"', 'model_providers.gw.wire_api="responses"',
        f'model_instructions_file="{instructions}"', 'web_search="disabled"',
        "model_context_window=8192",
    ]  # fmt: skip
    command = [str(codex), "exec", "--skip-git-repo-check", "-m", SMOL, "--color", "never"]
    command += [arg for c in config for arg in ("-c", c)]
    command += [arg for f in TRIMMED for arg in ("--disable", f)]
    env = {**os.environ, "CODEX_HOME": str(home), "NO_COLOR": "1"}
    return run_group([*command, prompt], work, env, timeout_s=90)


def test_codex_exec_completes_a_turn(
    codex: Path, server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("codex-home")
    done = codex_exec(codex, server.base_url + "/v1", home, "Say hello.")
    log = done.stderr[-3000:]
    assert "tokens used" in done.stderr, log
    assert done.stderr.split("\ncodex\n", 1)[-1].strip(), log  # the agent's message streamed
    errors = {line for line in done.stderr.splitlines() if line.startswith("ERROR")}
    if not errors:
        assert done.returncode == 0, log
        assert done.stdout.strip(), log  # the agent's final message
        return
    # Codex samples at the model's default temperature and SmolLM2 sometimes writes on past
    # default_max_tokens (1 run in 7 here): the response is then "incomplete", which Codex
    # reports and exits 1 on. Any other error is the gateway's.
    assert errors == {INCOMPLETE}, log
    assert done.returncode == 1, log
