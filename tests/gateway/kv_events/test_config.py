"""``[models.NAME.kv_events]``: refused for a backend that has no KV events, or without the
extra that publishes them; the default topic is llm-d's ``kv@HOST:PORT@MODEL``."""

from __future__ import annotations

import importlib.util

import pytest

from gateway.config import KVEventsConfig, ServerConfig, parse_config
from gateway.errors import ConfigError
from gateway.kv_events.hub import topic_for

pytestmark = pytest.mark.timeout(30)


def test_a_backend_without_kv_events_is_a_config_error() -> None:
    raw = {"models": {"m": {"backend": "scripted", "kv_events": {"endpoint": "tcp://*:5557"}}}}
    with pytest.raises(ConfigError, match=r"backend 'scripted' publishes no KV events"):
        parse_config(raw, "<test>")


def test_without_the_extra_the_config_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "zmq" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"llm-gateway\[kv-events\]"):
        parse_config({"models": {"m": {"backend": "scripted", "kv_events": {}}}}, "<test>")


def test_the_topic_names_this_server_as_llm_d_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_IP", raising=False)
    server = ServerConfig(host="10.1.2.3", port=8080)
    assert topic_for("smol", KVEventsConfig(), server) == "kv@10.1.2.3:8080@smol"
    monkeypatch.setenv("POD_IP", "192.168.0.7")  # Kubernetes' downward API
    assert topic_for("smol", KVEventsConfig(), server) == "kv@192.168.0.7:8080@smol"
    assert topic_for("smol", KVEventsConfig(topic="mine"), server) == "mine"


def test_a_bad_endpoint_is_refused() -> None:
    with pytest.raises(ConfigError, match="endpoint"):
        parse_config(
            {"models": {"m": {"backend": "scripted", "kv_events": {"endpoint": "http://x"}}}},
            "<test>",
        )
