"""Real ``gateway`` processes against the Hub stand-in: ``gateway serve --model org/repo:QUANT``
fetching its model into ``HF_HOME`` and answering the openai SDK under the name given and
``default``; two ``gateway pull`` processes started at once downloading the file once."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.gateway.hub.conftest import TINY_REPO, Hub, gateway_cli
from tests.gateway.hub.hub_server import Request
from tests.support import ServerProcess, free_port, openai_client, wait_for

pytestmark = pytest.mark.timeout(25)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_serve_model_process(hub: Hub, tiny_files: dict[str, Path], tmp_path: Path) -> None:
    """``python -m gateway serve --model org/repo:QUANT`` with no config: the model fetched
    into the Hugging Face cache under ``HF_HOME`` (the hub fixture's env), served as named and
    as ``default``, and the process exits 0 on SIGTERM."""
    if importlib.util.find_spec("llama_cpp") is None:  # the server imports it, not this test
        pytest.skip("llama_cpp is not installed")
    spec = f"{TINY_REPO}:q4_k_m"  # the tag as a user might type it: served under this name
    port = free_port()
    argv = [*gateway_cli(), "serve", "--model", spec, "--port", str(port)]
    server = ServerProcess(argv, port, tmp_path / "serve.log", "/ready")
    server.start(wait="ready", timeout=20)
    try:
        with openai_client(server.url) as client:
            assert {m.id for m in client.models.list()} == {spec, "default"}
            for model in (spec, "default"):
                answer = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "Say hello."}],
                    max_tokens=4,
                    temperature=0,
                )
                assert answer.model == model
                assert answer.choices[0].message.content
                assert answer.usage is not None and answer.usage.completion_tokens > 0
        server.terminate()
        assert server.wait(timeout=10) == 0, server.log_tail()
    finally:
        server.kill()
    repo = hub.cache / "models--test-org--Tiny-GGUF"
    [path] = repo.glob("snapshots/*/Tiny-Q4_K_M.gguf")
    assert path.is_symlink() and _sha256(path) == _sha256(tiny_files["Tiny-Q4_K_M.gguf"])
    assert (repo / "refs" / "main").read_text() == path.parent.name
    assert [p.rsplit("/", 1)[-1] for p in hub.gets()] == ["Tiny-Q4_K_M.gguf"]


def _file_requests(hub: Hub, name: str, method: str) -> list[Request]:
    return [
        r
        for r in hub.state.requests
        if r.method == method and "/resolve/" in r.path and r.path.endswith("/" + name)
    ]


def _from(request: Request, who: str) -> bool:
    return request.agent.endswith(f"origin/{who}")


def _start_pull(hub: Hub, spec: str, who: str) -> subprocess.Popen[str]:
    """``gateway pull SPEC``, its requests marked ``origin/WHO`` in their ``User-Agent``."""
    env = {
        **hub.env(),
        "HF_HUB_USER_AGENT_ORIGIN": who,
        # a held body is not a stalled one: the library's read timeout (10 s) is no limit here
        "HF_HUB_DOWNLOAD_TIMEOUT": "30",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    argv = [*gateway_cli(), "pull", spec]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_pull_processes_download_once(hub: Hub, tmp_path: Path) -> None:
    """Two ``gateway pull`` processes for one file, started at once: the first to take the
    library's lock on the blob downloads it (one GET, from byte 0, every byte); the other asks
    the Hub for the file's metadata while that download is under way, waits for the lock, finds
    the blob in place and makes no GET of it at all (not even a Range one). Both exit 0 with the
    same path to the whole file.

    The stand-in holds the file's body back until both processes have asked for the file, so
    they overlap however slowly the processes start; then it takes ~1 s."""
    data = os.urandom(4 << 20)
    big = tmp_path / "Big-Q4_0.gguf"
    big.write_bytes(data)
    hub.state.add_repo("test-org/Big-GGUF", {big.name: big})
    hub.state.rate = 4 << 20
    hub.state.hold = hold = threading.Event()
    procs = {who: _start_pull(hub, "test-org/Big-GGUF:Q4_0", who) for who in ("pull-a", "pull-b")}
    try:

        def both_asked() -> bool:
            for who, p in procs.items():
                assert p.poll() is None, f"{who} exited early: {p.communicate()[1]}"
            heads = _file_requests(hub, big.name, "HEAD")
            return all(any(_from(r, who) for r in heads) for who in procs)

        wait_for(both_asked, 20, "both processes asking the Hub for the file")
        hold.set()
        outs = {who: p.communicate(timeout=20) for who, p in procs.items()}
    finally:
        hold.set()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    for who, p in procs.items():
        assert p.returncode == 0, f"{who}: {outs[who][1]}"
    paths = {Path(out.strip().splitlines()[-1]) for out, _ in outs.values()}
    assert len(paths) == 1
    [path] = paths
    assert _sha256(path) == hashlib.sha256(data).hexdigest()

    [get] = _file_requests(hub, big.name, "GET")  # one download, of the whole file
    assert get.range is None and get.sent == len(data) and get.end is not None
    [downloader] = [who for who in procs if _from(get, who)]
    [waiter] = [who for who in procs if who != downloader]
    # the other asked for the file (then waited on the lock) while the download ran
    heads = [r for r in _file_requests(hub, big.name, "HEAD") if _from(r, waiter)]
    assert heads and heads[0].start < get.end
    blobs = hub.cache / "models--test-org--Big-GGUF" / "blobs"
    assert [p.name for p in blobs.iterdir()] == [path.resolve().name]
