"""The repository's config.toml is a working example: it validates and serves."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI

from gateway.config import load_config
from gateway.testing import ServerThread

CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def test_config_toml_serves_both_models() -> None:
    config = load_config(CONFIG)
    assert set(config.models) == {"smollm2-135m-instruct", "smollm2-q8kv"}
    with ServerThread(config) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        for model in ("default", "smollm2-q8kv"):  # the second loads on demand
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Say hi"}],
                max_tokens=4,
                temperature=0,
            )
            assert r.model == model
            assert r.usage is not None
            assert r.usage.completion_tokens >= 1
        states = {m.id: (m.model_extra or {})["state"] for m in client.models.list()}
        assert states["smollm2-q8kv"] == "loaded"
