"""``gateway serve --config FILE --ray local`` as a user runs it: a Ray cluster started on this
machine, the gateway deployed on it, served through Ray Serve's proxy on ``--port``, gone
after SIGINT; a config Ray Serve cannot run is refused before any cluster starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.defaults import default_model_path
from tests.ray_serve.test_ray_serve import free_port

pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def write_config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "config.toml"
    path.write_text(
        f"""
[models.smol]
backend = "llamacpp"
model_path = "{default_model_path()}"
batching = {{ n_threads = 1, max_concurrent = 2 }}
kv_cache = {{ n_ctx_per_slot = 512 }}
{extra}
[responses]
path = "{tmp / "responses.sqlite3"}"

[ray]
num_cpus = 0.5
"""
    )
    return path


def gateway(config: Path, port: int, tmp: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
        "OMP_WAIT_POLICY": "PASSIVE",
    }  # fmt: skip
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    return subprocess.Popen(
        [*argv, "--ray", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_serve_on_a_local_ray_cluster_then_stop(tmp_path: Path) -> None:
    port = free_port()
    proc = gateway(write_config(tmp_path), port, tmp_path)
    try:
        deadline = time.monotonic() + 100
        body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "never served"
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert r.json()["choices"][0]["message"]["content"] is not None
        assert r.headers["x-gateway-replica"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out[-3000:]
    assert "gateway on Ray Serve at http://127.0.0.1:" in out


def test_a_config_ray_serve_cannot_run_is_refused_first(tmp_path: Path) -> None:
    extra = '[models.smol.kv_events]\nendpoint = "tcp://*:5599"\n'
    proc = gateway(write_config(tmp_path, extra), free_port(), tmp_path)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2
    assert "models.smol.kv_events: not served on Ray Serve" in out
    assert "Started a local Ray instance" not in out
