"""Whole-process checks: the missing extra's one-line error, and ``gateway serve`` with no
config serving the embedded default model end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from gateway.defaults import DEFAULT_MODEL_NAME
from tests.support import free_port

_NO_LLAMA_CPP = """
import asyncio, sys
sys.modules["llama_cpp"] = None  # as if the extra were not installed
from gateway.config import parse_config
from backends.llamacpp import factory
cfg = parse_config({"models": {"m": {"backend": "llamacpp", "model_path": sys.argv[1]}}}, "t")
try:
    asyncio.run(factory.create("m", cfg.models["m"]).start())
except Exception as err:
    print(f"{type(err).__name__}: {err}")
"""


def test_missing_extra_is_one_line_naming_it(tiny_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _NO_LLAMA_CPP, str(tiny_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("MissingExtra: ")
    assert "pip install 'llm-gateway[llamacpp]'" in lines[0]


def test_gateway_serve_without_config_serves_the_default_model(smol_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    gateway = Path(sys.executable).with_name("gateway")
    proc = subprocess.Popen(
        [str(gateway), "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the default model did not load"
            time.sleep(0.1)
        with OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
            assert DEFAULT_MODEL_NAME in [m.id for m in client.models.list()]
            r = client.chat.completions.create(
                model=DEFAULT_MODEL_NAME,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
            )
        assert r.model == DEFAULT_MODEL_NAME
        assert r.usage is not None and r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
